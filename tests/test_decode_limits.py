"""Decoding never hangs on a special file, and stays within a memory bound.

- Anything that is not a regular file (a FIFO, a character or block device, a socket, a
  directory) is refused with its own reason before it is opened, by the decoder and by the
  null model: opening a FIFO blocks until a writer comes, ``/dev/urandom`` never ends.
- One decode holds at most its estimate (``decode_memory``: the native pixels plus the RGB
  result, or the decoder's buffers), measured as peak RSS in a fresh process; a large image
  that the model needs smaller is reduced before it is converted; a process's decodes together
  stay within its budget (``PIXELMILL_DECODE_MEMORY_MB``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelmill.errors import BadInput
from pixelmill.models import images
from pixelmill.models.images import MB, DecodeBudget, decode_image
from pixelmill.models.null import NullRunner
from pixelmill.tasks.classify import ClassifyOptions

ROOT = Path(__file__).resolve().parents[1]


# ---- special files ----------------------------------------------------------------------------


def _decode_or_fail(path: Path, fifo: Path | None = None) -> BaseException | object:
    """decode_image(path) in a thread; a FIFO left blocking is released by opening its write end."""
    result: list[BaseException | object] = []

    def work() -> None:
        try:
            result.append(decode_image(path))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        if fifo is not None:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # unblock the reader
        pytest.fail(f"decoding {path} blocked")
    return result[0]


def _block_device() -> Path | None:
    for entry in sorted(Path("/dev").iterdir()):
        with contextlib.suppress(OSError):
            if stat.S_ISBLK(entry.stat().st_mode):
                return entry
    return None


def _special(kind: str, tmp_path: Path) -> Path:
    if kind == "fifo":
        path = tmp_path / "pipe.jpg"
        os.mkfifo(path)
        return path
    if kind == "character device":
        return Path("/dev/urandom")
    if kind == "block device":
        device = _block_device()
        if device is None:
            pytest.skip("no block device on this machine")
        return device
    if kind == "socket":
        path = tmp_path / "sock.png"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))  # the socket file stays
        return path
    path = tmp_path / "folder.jpg"
    path.mkdir()
    return path


REASONS = {
    "fifo": "is a FIFO (named pipe), not an image file",
    "character device": "is a character device, not an image file",
    "block device": "is a block device, not an image file",
    "socket": "is a socket, not an image file",
    "directory": "is a directory, not an image file",
}


@pytest.mark.parametrize("kind", list(REASONS))
def test_special_files_are_refused_with_their_reason_before_opening(tmp_path, kind):
    path = _special(kind, tmp_path)
    err = _decode_or_fail(path, path if kind == "fifo" else None)
    assert isinstance(err, BadInput), err
    assert str(err) == f"{path}: {REASONS[kind]}"
    # Through a symlink, the same reason, naming the link.
    link = tmp_path / "link.jpg"
    link.symlink_to(path)
    err = _decode_or_fail(link, path if kind == "fifo" else None)
    assert str(err) == f"{link}: {REASONS[kind]}"


@pytest.mark.parametrize("kind", list(REASONS))
def test_null_model_refuses_special_files_before_opening(tmp_path, kind):
    path = _special(kind, tmp_path)
    runner = NullRunner()
    done = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            runner.prepare(str(path), {}, ClassifyOptions())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)
        done.set()

    threading.Thread(target=work, daemon=True).start()
    if not done.wait(10):
        if kind == "fifo":
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"the null model blocked on {path}")
    assert len(errors) == 1 and isinstance(errors[0], BadInput), errors
    assert str(errors[0]) == f"{path}: {REASONS[kind]}"


def test_symlink_to_a_regular_file_is_fine_and_empty_stays_empty(tmp_path):
    real = tmp_path / "real.png"
    Image.new("RGB", (8, 6), (1, 2, 3)).save(real)
    link = tmp_path / "link.png"
    link.symlink_to(real)
    assert decode_image(link).size == (8, 6)
    assert NullRunner().prepare(str(link), {}, ClassifyOptions()) == real.stat().st_size
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match=r"empty file \(0 bytes\)"):
        decode_image(empty)
    with pytest.raises(BadInput, match="No such file or directory"):
        NullRunner().prepare(str(tmp_path / "missing.jpg"), {}, ClassifyOptions())


# ---- reducing and converting in tiles -----------------------------------------------------------


def _sample(mode: str, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(7)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5, 70000, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32) * 3)
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        im = rgba.convert("RGB").quantize(64)
        im.info["transparency"] = 3
        return im
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGBA", "LA", "P", "1", "L", "CMYK", "RGB"])
@pytest.mark.parametrize("factor", [1, 3])
def test_tiled_conversion_matches_the_whole_image_for_every_orientation(mode, factor):
    im = _sample(mode, (37, 23))
    for orientation in range(1, 9):
        method = images._ORIENTATION.get(orientation)
        whole = images.to_rgb(im)
        whole = whole.reduce(factor) if factor > 1 else whole
        expected = whole.transpose(method) if method is not None else whole
        got = images._upright_rgb(im, factor, method, tile=8)
        assert got.mode == "RGB" and got.size == expected.size, (orientation, got.size)
        assert np.array_equal(np.asarray(got), np.asarray(expected)), (mode, orientation)


def test_large_images_are_reduced_keeping_colour_alpha_and_orientation(tmp_path):
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((1000, 2000), 32768, dtype=np.uint16)).save(deep)
    out = decode_image(deep, min_side=256)
    assert min(out.size) >= 256 and out.size[0] < 2000
    assert 120 <= np.asarray(out)[5, 5, 0] <= 135  # scaled, not clipped
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (1600, 1200), (0, 0, 0, 0)).save(clear)
    assert tuple(np.asarray(decode_image(clear, min_side=256))[10, 10]) == images.BACKGROUND
    # EXIF orientation 6 (rotate 90 CW) on a PNG, applied to the reduced image.
    rotated = tmp_path / "rotated.png"
    im = Image.new("RGBA", (1200, 600), (0, 0, 255, 255))
    im.paste((255, 0, 0, 255), (0, 0, 600, 600))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(rotated, exif=exif)
    out = decode_image(rotated, min_side=256)
    assert out.size[1] > out.size[0] and min(out.size) >= 256
    arr = np.asarray(out)
    assert tuple(arr[5, out.size[0] // 2]) == (255, 0, 0)  # red on top
    assert tuple(arr[-5, out.size[0] // 2]) == (0, 0, 255)


# ---- the budget ---------------------------------------------------------------------------------


def test_budget_waits_first_come_first_served():
    budget = DecodeBudget(100)
    order: list[str] = []
    release_a = threading.Event()

    def take(name: str, nbytes: int, until: threading.Event | None = None) -> None:
        with budget.hold(nbytes):
            order.append(name)
            if until is not None:
                until.wait(10)

    a = threading.Thread(target=take, args=("a", 80, release_a))
    a.start()
    while budget.used != 80:
        time.sleep(0.01)
    b = threading.Thread(target=take, args=("b", 50))
    b.start()
    time.sleep(0.2)
    c = threading.Thread(target=take, args=("c", 10))  # would fit, but b asked first
    c.start()
    time.sleep(0.2)
    assert order == ["a"]
    release_a.set()
    for t in (a, b, c):
        t.join(10)
    assert order == ["a", "b", "c"] and budget.used == 0
    with pytest.raises(ValueError), budget.hold(101):
        pass


def test_an_image_over_the_budget_is_refused_naming_it(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGBA", (3000, 3000)).save(path)
    images.configure(32)
    try:
        with pytest.raises(BadInput) as err:
            decode_image(path)
    finally:
        images.configure(images.DEFAULT_DECODE_MEMORY_MB)
    message = str(err.value)
    assert message.startswith(f"{path}: image needs about ")
    assert "3000x3000 RGBA" in message and "32 MB (PIXELMILL_DECODE_MEMORY_MB)" in message


# ---- peak memory, measured ---------------------------------------------------------------------

N = 9400  # 88.4 M pixels, under Pillow's 89.5 M limit

# (PNG colour type, bit depth, Pillow mode once decoded)
KINDS = {"gray16": (0, 16, "I;16"), "rgba": (6, 8, "RGBA"), "bit1": (0, 1, "1")}


def _png(path: Path, color_type: int, depth: int) -> None:
    """An NxN PNG whose rows repeat the first (a gradient), written directly: the "Up" filter
    makes every later row zeros, so it compresses to a few hundred KB in about a second."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row_bytes = (N * channels * depth + 7) // 8
    first = (np.arange(row_bytes) % 251).astype(np.uint8).tobytes()
    z = zlib.compressobj(6)
    data = [z.compress(b"\x00" + first)]
    up = (b"\x02" + bytes(row_bytes)) * 100
    for _ in range((N - 1) // 100):
        data.append(z.compress(up))
    data.append(z.compress((b"\x02" + bytes(row_bytes)) * ((N - 1) % 100)))
    data.append(z.flush())

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", N, N, depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(data))
        + chunk(b"IEND", b"")
    )


_MEASURE = """
import resource, sys
from pixelmill.models import images
def grown():
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
path = sys.argv[1]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
small = images.decode_image(path, min_side=256)
print(small.size[0], small.size[1], grown())
del small
full = images.decode_image(path)
print(full.size[0], full.size[1], grown())
"""


def _run(script: str, *args: str) -> list[list[int]]:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [[int(x) for x in line.split()] for line in out.stdout.strip().splitlines()]


@pytest.mark.parametrize("kind", list(KINDS))
def test_decoding_a_9400_square_png_stays_within_its_bound(tmp_path, kind):
    """Before: a 16-bit grayscale PNG peaked 2.4 GB above the process's start, RGBA 2.0 GB,
    1-bit 0.5 GB (a float64 copy, exif_transpose's copy, RGBA and the composite at full size).
    Now: the native pixels and the RGB result, or, when the model needs 256 pixels, the native
    pixels and tiles."""
    color_type, depth, mode = KINDS[kind]
    path = tmp_path / f"{kind}.png"
    _png(path, color_type, depth)
    assert path.stat().st_size < 2 * MB
    (sw, sh, small_peak), (fw, fh, full_peak) = _run(_MEASURE, str(path))
    assert min(sw, sh) >= 256 and (sw, sh) != (N, N)
    assert (fw, fh) == (N, N)
    native = images.native_bytes(mode, (N, N))
    reduced = images.decode_memory(mode, (N, N), reduce=images.reduction((N, N), 256))
    full = images.decode_memory(mode, (N, N))
    # The documented bounds: reduced, the native pixels and ~20 MB; full, <= 8 bytes a pixel.
    assert reduced <= native + 32 * MB and full <= 8 * N * N + 32 * MB
    assert small_peak <= reduced, f"{kind}: reduced decode peaked {small_peak // MB} MB"
    assert full_peak <= full, f"{kind}: full decode peaked {full_peak // MB} MB"


_POOL = """
import resource, sys
from concurrent.futures import ThreadPoolExecutor
from pixelmill.models import images
images.configure(int(sys.argv[2]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def prepare(path):  # as a worker does: decode, then keep only what the model takes
    return images.decode_image(path).size
with ThreadPoolExecutor(4) as pool:
    sizes = list(pool.map(prepare, [sys.argv[1]] * 4))
assert sizes == [(9400, 9400)] * 4, sizes
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_four_decode_threads_together_stay_within_the_budget(tmp_path):
    """Four threads decoding the 16-bit PNG at once peak at 4 x 0.5 GB without a budget; with
    one that fits a single decode they take turns. What remains on top is the C allocator's
    per-thread reuse (documented: up to ALLOCATOR_SLACK_MB a decode thread)."""
    path = tmp_path / "gray16.png"
    _png(path, 0, 16)
    budget_mb = images.decode_memory("I;16", (N, N)) // MB + 16
    ((peak,),) = _run(_POOL, str(path), str(budget_mb))
    bound = (budget_mb + 4 * images.ALLOCATOR_SLACK_MB) * MB
    assert peak <= bound, f"4 threads peaked at {peak // MB} MB with a {budget_mb} MB budget"
    assert peak < 2 * images.decode_memory("I;16", (N, N))  # never two at once


def test_the_setting_and_the_module_default_agree(monkeypatch):
    from pixelmill.errors import ConfigError
    from pixelmill.settings import load_settings

    monkeypatch.delenv("PIXELMILL_DECODE_MEMORY_MB", raising=False)
    assert load_settings().decode_memory_mb == images.DEFAULT_DECODE_MEMORY_MB
    monkeypatch.setenv("PIXELMILL_DECODE_MEMORY_MB", "8")
    with pytest.raises(ConfigError, match="DECODE_MEMORY_MB"):
        load_settings()

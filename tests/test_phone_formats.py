"""Phone archives (issue 11): HEIC/HEIF and AVIF decode upright, the folder scan finds them (and
.jfif), and a camera RAW file fails its job as an unsupported format, naming the file.

Every file here is real: HEIC written by libheif's x265 encoder (pillow_heif), AVIF by libavif's
aom encoder (Pillow). How each applies the orientation differs: libheif turns a HEIF by its
irot/imir boxes as it decodes (pillow_heif writes them from the EXIF orientation, and resets
the EXIF tag to 1 on open); Pillow's AVIF plugin leaves the pixels as stored and restates
irot/imir as the EXIF orientation, which decode_image then applies.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image, TiffImagePlugin, TiffTags, features

from pixelmill.errors import BadInput
from pixelmill.models import images
from pixelmill.models.images import MB, decode_image
from pixelmill.producer.inputs import expand_inputs

ROOT = Path(__file__).resolve().parents[1]

RED = (255, 0, 0)
BLUE = (0, 0, 255)
ORIENTATION = 0x0112
# What each EXIF orientation asks for, to turn the stored picture upright.
UPRIGHT = {
    1: None,
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_270,  # "rotate 90 CW"
    8: Image.Transpose.ROTATE_90,
}

needs_avif = pytest.mark.skipif(not features.check("avif"), reason="Pillow built without AVIF")


def halves(w: int = 60, h: int = 30, mode: str = "RGB") -> Image.Image:
    """Left half red, right half blue: every turn and mirror of it looks different."""
    im = Image.new("RGB", (w, h), RED)
    im.paste(BLUE, (w // 2, 0, w, h))
    return im.convert(mode)


def exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[ORIENTATION] = orientation
    return e.tobytes()


def save(im: Image.Image, path: Path, orientation: int = 1, **kw: object) -> Path:
    """``im`` as HEIC (.heic) or AVIF (.avif), stored with the given EXIF orientation."""
    fmt = {".heic": "HEIF", ".avif": "AVIF"}[path.suffix]
    if orientation != 1:
        kw["exif"] = exif(orientation)
    im.save(path, format=fmt, **kw)
    return path


def close_to(out: Image.Image, expected: Image.Image, tolerance: float = 6.0) -> bool:
    """Same size and, away from the edge between the halves (chroma subsampling blurs it), the
    same colours (lossy, so within ``tolerance`` on average)."""
    if out.size != expected.size:
        return False
    a = np.asarray(out, dtype=np.float64)
    b = np.asarray(expected.convert("RGB"), dtype=np.float64)
    return float(np.abs(a - b).mean()) < tolerance


def pixel(im: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(im)[y, x])


def near(value: tuple[int, ...], colour: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(value, colour, strict=True))


# ---- orientation ------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("suffix", [".heic", pytest.param(".avif", marks=needs_avif)])
def test_exif_orientation_is_applied_exactly_once(tmp_path, suffix, orientation):
    src = halves()
    path = save(src, tmp_path / f"o{orientation}{suffix}", orientation, quality=95)
    method = UPRIGHT[orientation]
    expected = src.transpose(method) if method is not None else src

    out = decode_image(path)

    assert out.mode == "RGB"
    assert close_to(out, expected), f"{suffix} orientation {orientation}: {out.size}"
    if orientation == 6:  # rotate 90 CW: the left (red) half is now on top
        assert out.size == (30, 60)
        assert near(pixel(out, 15, 5), RED) and near(pixel(out, 15, 55), BLUE)
    if orientation == 8:  # rotate 90 CCW: the left half is now at the bottom
        assert near(pixel(out, 15, 5), BLUE) and near(pixel(out, 15, 55), RED)
    if orientation == 3:
        assert near(pixel(out, 5, 15), BLUE) and near(pixel(out, 55, 15), RED)


def test_who_turns_what_heif_in_libheif_avif_in_decode_image(tmp_path):
    """The reason the orientation is applied once: a HEIC opens already turned with its EXIF
    orientation reset to 1 (decode_image must not turn it again), an AVIF opens as stored with
    the orientation in its EXIF (decode_image turns it). decode_image does not read a HEIF's
    EXIF orientation at all, so a pillow_heif that stopped resetting the tag would not make it
    turn twice."""
    heic = save(halves(), tmp_path / "six.heic", 6, quality=95)
    with Image.open(heic) as im:
        assert im.format == "HEIF" and im.size == (30, 60)
        assert im.getexif().get(ORIENTATION, 1) == 1
        assert im.info.get("original_orientation") == 6
        assert images._transpose_method(im) is None
    if features.check("avif"):
        avif = save(halves(), tmp_path / "six.avif", 6, quality=95)
        with Image.open(avif) as im:
            assert im.format == "AVIF" and im.size == (60, 30)
            assert im.getexif().get(ORIENTATION) == 6
            assert images._transpose_method(im) is Image.Transpose.ROTATE_270


def _stored_exif(path: Path) -> Image.Exif:
    """The EXIF block as the file stores it (pillow_heif changes its copy on open)."""
    data = path.read_bytes()
    at = max(data.find(b"MM\x00*"), data.find(b"II*\x00"))
    assert at > 0, "no EXIF block found"
    stored = Image.Exif()
    stored.load(data[at:])
    return stored


def test_a_heic_turned_by_irot_whose_exif_restates_it_is_turned_once(tmp_path):
    """Phones store the turn in an irot box and restate it in the EXIF orientation; so does
    pillow_heif, which wrote this file. Decoding follows irot only."""
    path = save(halves(), tmp_path / "both.heic", 6, quality=95)
    assert b"irot" in path.read_bytes()
    assert _stored_exif(path).get(ORIENTATION) == 6
    out = decode_image(path)
    assert close_to(out, halves().transpose(Image.Transpose.ROTATE_270))
    assert near(pixel(out, 15, 5), RED) and near(pixel(out, 15, 55), BLUE)


def test_a_heic_with_a_damaged_exif_block_still_decodes(tmp_path):
    """Before: the unreadable EXIF (pillow_heif hands it over raw) failed the whole image,
    "corrupt or truncated image (not a TIFF file ...)", though its pixels were fine and a HEIF's
    orientation is never taken from its EXIF."""
    path = save(halves(), tmp_path / "bad-exif.heic", 6, quality=95)
    data = bytearray(path.read_bytes())
    at = max(data.find(b"MM\x00*"), data.find(b"II*\x00"))
    assert at > 0, "no EXIF block found"
    data[at : at + 8] = b"\x1f\x22\x33\x3c\x5a\x5a\x17\x17"
    path.write_bytes(bytes(data))
    with Image.open(path) as im, pytest.raises(SyntaxError):
        Image.Exif().load(im.info["exif"])  # the EXIF really is unreadable
    out = decode_image(path)
    assert close_to(out, halves().transpose(Image.Transpose.ROTATE_270))


# ---- alpha, depth, reduction -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".heic", pytest.param(".avif", marks=needs_avif)])
def test_alpha_is_composited_onto_the_background_after_turning(tmp_path, suffix):
    im = Image.new("RGBA", (40, 20), RED + (255,))
    im.paste(BLUE + (0,), (20, 0, 40, 20))  # right half fully transparent
    kw = {"quality": -1} if suffix == ".heic" else {"quality": 100}
    path = save(im, tmp_path / f"alpha{suffix}", 6, **kw)
    with Image.open(path) as opened:
        assert opened.mode == "RGBA"
    out = decode_image(path)
    assert out.size == (20, 40)
    assert near(pixel(out, 10, 5), RED)
    assert near(pixel(out, 10, 35), images.BACKGROUND)  # transparent: background, not blue


def test_ten_bit_heic_is_scaled_to_eight_bits_not_darkened_or_saturated(tmp_path):
    w, h = 60, 30
    arr = np.zeros((h, w, 3), np.uint16)
    arr[:, : w // 2, 0] = 65535  # red left half
    arr[:, w // 2 :, 2] = 65535  # blue right half
    arr[:, :, 1] = 32768  # mid green everywhere
    heif = pillow_heif.from_bytes(mode="RGB;16", size=(w, h), data=arr.tobytes())
    heif.info["exif"] = exif(6)
    path = tmp_path / "deep.heic"
    heif.save(path, quality=-1)
    with Image.open(path) as im:
        assert im.info["bit_depth"] == 10
    out = decode_image(path)
    assert out.size == (30, 60)
    assert near(pixel(out, 15, 5), (255, 128, 0), 4)
    assert near(pixel(out, 15, 55), (0, 128, 255), 4)

    gray = np.full((h, w), 32768, np.uint16)
    gray[:, : w // 2] = 65535
    heif = pillow_heif.from_bytes(mode="L;16", size=(w, h), data=gray.tobytes())
    path = tmp_path / "deep-gray.heic"
    heif.save(path, quality=-1)
    with Image.open(path) as im:
        assert im.mode == "I;16" and im.info["bit_depth"] == 10
    out = decode_image(path)
    assert near(pixel(out, 5, 5), (255, 255, 255), 2)
    assert near(pixel(out, 55, 5), (128, 128, 128), 2)


@pytest.mark.parametrize("suffix", [".heic", pytest.param(".avif", marks=needs_avif)])
def test_a_large_turned_photo_is_reduced_for_the_model_keeping_colours(tmp_path, suffix):
    src = halves(1200, 800)
    path = save(src, tmp_path / f"large{suffix}", 6, quality=80)
    out = decode_image(path, min_side=100)
    assert out.size == (100, 150)  # 800 // 100 = 8: 1200x800 turned and reduced by 8
    assert near(pixel(out, 50, 10), RED) and near(pixel(out, 50, 140), BLUE)
    full = decode_image(path)
    assert full.size == (800, 1200)
    assert close_to(out, full.reduce(8), 3.0)


# ---- the memory bound ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "fmt"), [(".heic", "HEIF"), pytest.param(".avif", "AVIF", marks=needs_avif)]
)
def test_the_decode_estimate_counts_each_decoder_and_is_enforced(tmp_path, suffix, fmt):
    path = save(halves(2000, 1500), tmp_path / f"budget{suffix}", 6, quality=60)
    file_size = path.stat().st_size
    with Image.open(path) as im:
        assert im.format == fmt
        assert fmt in images.DECODER_BUFFERS and fmt in images.READS_WHOLE_FILE
        native = images.native_bytes(im.mode, im.size)
        decoder = images.decoder_bytes(im, file_size)
        assert decoder == images.DECODER_SLACK + images.DECODER_BUFFERS[fmt] * native + file_size
        method = images._transpose_method(im)
        need = images.decode_memory(
            im.mode, im.size, decoder=decoder, transposed=method is not None
        )
    assert need >= native + images.DECODER_BUFFERS[fmt] * native
    images.configure(need // MB)  # one MB short
    try:
        with pytest.raises(BadInput) as err:
            decode_image(path)
        assert str(err.value).startswith(f"{path}: image needs about {-(-need // MB)} MB")
        images.configure(need // MB + 1)
        assert decode_image(path).size == (1500, 2000)
    finally:
        images.configure(images.DEFAULT_DECODE_MEMORY_MB)


# The peak as this process's own high-water mark (VmHWM): ru_maxrss would start from the
# parent's, which a child started by fork and exec inherits, and hide a peak below pytest's own.
_MEASURE = """
import sys
from pixelmill.models import images
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
images.decode_image(sys.argv[2])  # libheif, libde265 and their threads, loaded once
base = hwm()
out = images.decode_image(sys.argv[1])
print(out.size[0], out.size[1], hwm() - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_decoding_a_turned_rgba_heic_stays_within_its_estimate(tmp_path):
    """Before: HEIF counted its decoder at 1x the decoded image; libheif holds the YCbCr and
    alpha planes, a turned copy of them and the interleaved RGBA, and this 6000x4000 RGBA HEIC
    with irot peaked about 13 MB over its estimate (a noisy one 40 MB; 10-bit 75 MB)."""
    w, h = 6000, 4000
    im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    im.paste(RED, (0, 0, w // 2, h))
    im.putalpha(Image.linear_gradient("L").resize((w, h)))
    path = save(im, tmp_path / "big.heic", 6, quality=50)
    small = save(halves(40, 20, "RGBA"), tmp_path / "small.heic", 6)
    with Image.open(path) as opened:
        assert opened.mode == "RGBA" and opened.size == (h, w)
        decoder = images.decoder_bytes(opened, path.stat().st_size)
    bound = images.decode_memory("RGBA", (h, w), decoder=decoder, transposed=False)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(small)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    ow, oh, peak = (int(x) for x in out.stdout.split())
    assert (ow, oh) == (h, w)
    assert peak > images.native_bytes("RGBA", (h, w)), f"peaked {peak // MB} MB: not measured"
    assert peak <= bound, f"peaked {peak // MB} MB, estimate {bound // MB} MB"


# ---- which plugin opens what -------------------------------------------------------------------


def _mif1(path: Path) -> Path:
    """The same file with the generic major brand "mif1" (its compatible brands still say what
    it is), as some encoders write it."""
    data = bytearray(path.read_bytes())
    assert data[4:8] == b"ftyp"
    data[8:12] = b"mif1"
    out = path.with_name("mif1-" + path.name)
    out.write_bytes(bytes(data))
    return out


_FRESH = """
import sys
if sys.argv[2] == "heif-first":  # another module registered pillow_heif before pixelmill
    import pillow_heif
    pillow_heif.register_heif_opener()
from PIL import Image
from pixelmill.models.images import decode_image
out = decode_image(sys.argv[1])
print(out.size[0], out.size[1], *out.getpixel((15, 5)), *out.getpixel((15, 55)))
"""


@needs_avif
@pytest.mark.parametrize("order", ["plain", "heif-first"])
@pytest.mark.parametrize("suffix", [".avif", ".heic"])
def test_a_mif1_branded_file_opens_with_the_right_plugin_in_a_fresh_process(
    tmp_path, suffix, order
):
    """Before: in a fresh process pillow_heif (registered at import) came before Pillow's AVIF
    plugin and took an AVIF branded "mif1"; this libheif has no AV1 decoder, so it failed with
    a bare RuntimeError."""
    path = _mif1(save(halves(), tmp_path / f"x{suffix}", 6, quality=95))
    out = subprocess.run([sys.executable, "-c", _FRESH, str(path), order], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    w, h, *top_bottom = (int(x) for x in out.stdout.split())
    assert (w, h) == (30, 60)
    assert near(tuple(top_bottom[:3]), RED) and near(tuple(top_bottom[3:]), BLUE)


@needs_avif
def test_a_decoder_failure_inside_libheif_is_bad_input_naming_the_file(tmp_path, monkeypatch):
    """pillow_heif raises RuntimeError when libheif cannot decode (here: an AV1 picture, with
    pillow_heif tried first). Before: it escaped decode_image as a bare RuntimeError."""
    path = _mif1(save(halves(), tmp_path / "x.avif", quality=95))
    Image.init()
    heif_first = ["HEIF"] + [i for i in Image.ID if i != "HEIF"]
    monkeypatch.setattr(Image, "ID", heif_first)
    with pytest.raises(BadInput) as err:
        decode_image(path)
    assert str(err.value).startswith(f"{path}: corrupt or truncated image (")


# ---- damaged and unknown files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "kind"), [(".heic", "HEIF"), pytest.param(".avif", "AVIF", marks=needs_avif)]
)
def test_a_truncated_phone_photo_is_corrupt_not_unrecognised(tmp_path, suffix, kind):
    """Both plugins read the file as they open it, so Pillow reported a cut-off HEIC or AVIF as
    "not an image file (format not recognised)"."""
    whole = save(halves(), tmp_path / f"whole{suffix}", 6, quality=95)
    data = whole.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput) as err:
        decode_image(path)
    assert str(err.value) == (
        f"{path}: corrupt or truncated image ({kind} file that could not be read)"
    )


@pytest.mark.parametrize("name", ["noise.heic", "noise.avif", "noise.jpg", "noise.bin"])
def test_an_unrecognised_file_keeps_its_message(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(BadInput) as err:
        decode_image(path)
    assert str(err.value) == f"{path}: not an image file (format not recognised)"


# ---- camera RAW ---------------------------------------------------------------------------------


def _tiff(path: Path, tags: dict[int, object] | None = None) -> Path:
    info = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, value in (tags or {}).items():
        info[tag] = value
        info.tagtype[tag] = TiffTags.BYTE
    halves(64, 32).save(path, format="TIFF", tiffinfo=info)
    return path


def test_a_tiff_based_raw_fails_as_unsupported_instead_of_decoding_its_preview(tmp_path):
    path = _tiff(tmp_path / "x.nef")
    with Image.open(path) as im:  # what Pillow alone does: a TIFF, 64x32, decodable
        assert im.format == "TIFF" and im.size == (64, 32)
    with pytest.raises(BadInput) as err:
        decode_image(path)
    assert str(err.value) == (
        f"{path}: unsupported format (camera RAW .nef; convert it to JPEG/TIFF first)"
    )
    upper = _tiff(tmp_path / "DSC_0001.NEF")
    with pytest.raises(BadInput, match=r"DSC_0001\.NEF: unsupported format \(camera RAW \.nef;"):
        decode_image(upper)
    assert decode_image(_tiff(tmp_path / "x.tif")).size == (64, 32)  # a TIFF is still a TIFF


@pytest.mark.parametrize(
    "name", ["y.cr2", "y.cr3", "y.arw", "y.dng", "y.raf", "y.orf", "y.rw2", "y.pef", "y.srw",
             "y.raw"]
)  # fmt: skip
def test_raw_extensions_fail_as_unsupported_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(BadInput) as err:
        decode_image(path)
    message = str(err.value)
    assert message.startswith(f"{path}: unsupported format (camera RAW .{name[2:]};")
    assert "convert it to JPEG/TIFF first" in message


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"II*\x00\x10\x00\x00\x00CR\x02\x00", "Canon CR2"),
        (b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01", "Canon CR3"),
        (b"IIRO\x08\x00\x00\x00", "Olympus ORF"),
        (b"IIU\x00\x18\x00\x00\x00", "Panasonic RW2"),
        (b"FUJIFILMCCD-RAW 0201", "Fujifilm RAF"),
    ],
)
def test_a_renamed_raw_is_told_by_its_signature(tmp_path, head, kind):
    path = tmp_path / "renamed.jpg"
    path.write_bytes(head + bytes(2048))
    with pytest.raises(BadInput) as err:
        decode_image(path)
    assert str(err.value) == (
        f"{path}: unsupported format (camera RAW, {kind}; convert it to JPEG/TIFF first)"
    )


def test_a_renamed_dng_is_told_by_its_dng_version_tag(tmp_path):
    path = _tiff(tmp_path / "renamed.tif", {50706: b"\x01\x04\x00\x00"})
    with Image.open(path) as im:
        assert im.format == "TIFF" and 50706 in im.tag_v2
    with pytest.raises(BadInput) as err:
        decode_image(path)
    assert str(err.value) == (
        f"{path}: unsupported format (camera RAW, DNG; convert it to JPEG/TIFF first)"
    )


# ---- the folder scan ----------------------------------------------------------------------------


def test_the_folder_scan_picks_up_phone_formats_and_skips_raw_and_text(tmp_path):
    folder = tmp_path / "phone"
    (folder / "sub").mkdir(parents=True)
    made = {
        "a.heic": save(halves(), folder / "a.heic", 6, quality=90),
        "b.HEIC": (folder / "b.HEIC"),
        "c.heif": (folder / "c.heif"),
        "d.jfif": (folder / "d.jfif"),
        "sub/e.avif": (folder / "sub" / "e.avif"),
    }
    made["b.HEIC"].write_bytes(made["a.heic"].read_bytes())
    made["c.heif"].write_bytes(made["a.heic"].read_bytes())
    halves().save(made["d.jfif"], format="JPEG", quality=95)
    if features.check("avif"):
        save(halves(), made["sub/e.avif"], 6, quality=90)
    else:
        made["sub/e.avif"].write_bytes(made["a.heic"].read_bytes())
    (folder / "notes.txt").write_text("not a photo\n")
    _tiff(folder / "f.nef")
    (folder / "g.CR2").write_bytes(b"II*\x00\x10\x00\x00\x00CR\x02\x00")

    found = expand_inputs([folder])

    assert [os.path.relpath(p, folder) for p in found] == [
        "a.heic", "b.HEIC", "c.heif", "d.jfif", os.path.join("sub", "e.avif"),
    ]  # fmt: skip
    for p in found:  # every one decodes, upright
        out = decode_image(p)
        expected = halves() if p.endswith(".jfif") else halves().transpose(UPRIGHT[6])
        assert close_to(out, expected), p
    # A RAW named explicitly is submitted, and fails its own job with the reason.
    assert expand_inputs([folder / "f.nef"]) == [str((folder / "f.nef").absolute())]

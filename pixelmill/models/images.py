"""Decoding images the way a user expects: EXIF orientation applied, any mode to RGB correctly,
and every failure a ``BadInput`` that names the file. Pillow's decompression-bomb guard stays on."""

from __future__ import annotations

import io
import math
import os
import stat
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pillow_heif
from PIL import AvifImagePlugin, Image, ImageFile, TiffImagePlugin, UnidentifiedImageError

from pixelmill.errors import BadInput

# HEIC/HEIF (phone photos) through libheif; AVIF is Pillow's own. Both plugins claim a file whose
# major brand is the generic "mif1" or "msf1" (an AVIF may have one), and libheif here decodes
# no AV1: with pillow_heif tried first, such an AVIF failed. Pillow's AVIF plugin goes first,
# whatever registered first in this process; it passes a HEVC file on to pillow_heif.
pillow_heif.register_heif_opener()


def _avif_before_heif() -> None:
    ids, avif = Image.ID, AvifImagePlugin.AvifImageFile.format
    if avif in ids and "HEIF" in ids and ids.index("HEIF") < ids.index(avif):
        ids.remove(avif)
        ids.insert(ids.index("HEIF"), avif)


_avif_before_heif()

# Transparent pixels are composited onto this colour before the model sees them.
BACKGROUND = (255, 255, 255)

# A truncated file is an error, never a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MB = 1 << 20

# ---- the memory bound -----------------------------------------------------------------------
#
# Decoding one image holds its pixels as the file stores them ("native": 1 byte a pixel for
# 1-bit, grayscale and palette images, 2 for 16-bit grayscale, 4 for everything else, 16-bit
# RGB(A) included, which Pillow keeps as 8-bit) plus the RGB image handed to the model (4 bytes
# a pixel in Pillow, at the reduced size when the model needs fewer pixels) plus the
# temporaries of one conversion tile. ``decode_memory`` estimates that from the header, before
# any pixel is decoded; a process's decodes together stay within its budget
# (``PIXELMILL_DECODE_MEMORY_MB``): a decode waits until its share is free, and an image that
# alone needs more than the budget is refused.

#: The default of ``PIXELMILL_DECODE_MEMORY_MB``: what a worker's decoding threads may hold
#: together. Every image under Pillow's pixel limit (89.5 M) fits on its own: PNG, baseline JPEG,
#: GIF, BMP and TIFF need at most 8 bytes a pixel (about 720 MB at the limit), a progressive
#: JPEG 12, AVIF 12, HEIF 16, WebP 16 and JPEG 2000 20 (1.8 GB).
DEFAULT_DECODE_MEMORY_MB = 2048

# Conversion to RGB runs on tiles of this many pixels a side (rounded to a multiple of the
# reduction factor), so its temporaries (float64 for 16-bit scaling, RGBA for compositing) stay
# a few MB whatever the image's size: about 25 bytes a tile pixel at most; 64 are counted.
TILE = 512
TILE_BYTES_PER_PIXEL = 64

# Pillow allocates a large image in blocks, 16 MB by default. glibc serves blocks that size,
# once one is freed, from per-thread heaps and keeps them when they are freed again, so a pool
# of decode threads grows by about a whole image per thread, whatever the budget. Blocks over
# 32 MB are always mapped on their own and go back to the system when freed. (PILLOW_BLOCK_SIZE
# in the environment still wins.)
PILLOW_BLOCK_SIZE = 64 * MB
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(PILLOW_BLOCK_SIZE)  # type: ignore[attr-defined]  # C core, untyped
# What glibc still keeps per decode thread for reuse after large decodes (measured: 20 to 25 MB
# a thread), on top of the budget. MALLOC_ARENA_MAX=2 in a worker's environment removes most.
ALLOCATOR_SLACK_MB = 32

# Decoders that hold the whole image in buffers of their own while handing it to Pillow, in
# multiples of the decoded image (measured on 4000x4000 and 9400x9400 images), and that read the
# whole file into memory first. A progressive JPEG keeps the coefficients of the whole image at
# full scale, even when it is decoded at a reduced one: 2 bytes a sample. libheif (HEIF) holds
# the YCbCr planes, the alpha plane, a second copy of them for a turned (irot/imir) or filtered
# (SAO) picture, and the interleaved result: measured up to 2.3 times the decoded image (6000x4000,
# RGBA, 10 bits, turned), 1.2 without alpha; 1 was exceeded by every turned RGBA HEIC.
DECODER_BUFFERS = {"WEBP": 3, "JPEG2000": 4, "AVIF": 2, "HEIF": 3, "TIFF": 1}
READS_WHOLE_FILE = frozenset({"WEBP", "JPEG2000", "AVIF", "HEIF"})
# Row buffers, zlib and libjpeg state: a few MB whatever the image.
DECODER_SLACK = 16 * MB

_ONE_BYTE_MODES = frozenset({"1", "L", "P"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_SWAPS_SIDES = frozenset(
    {
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
    }
)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class DecodeBudget:
    """A weighted semaphore over bytes, first come first served: the decodes in flight in one
    process together hold at most ``total`` bytes."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    def resize(self, total: int) -> None:
        with self._cond:
            self.total = total
            self._cond.notify_all()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Wait until ``nbytes`` (at most ``total``) are free and the decodes that asked before
        have theirs; hold them for the ``with`` block."""
        if nbytes > self.total:
            raise ValueError(f"{nbytes} bytes asked of a budget of {self.total}")
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self.used + nbytes > self.total:
                    self._cond.wait()
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit as well
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


_budget = DecodeBudget(DEFAULT_DECODE_MEMORY_MB * MB)


def configure(decode_memory_mb: int) -> None:
    """Set this process's decode budget (``PIXELMILL_DECODE_MEMORY_MB``); a worker calls it
    once at start. Without it a process has ``DEFAULT_DECODE_MEMORY_MB``."""
    _budget.resize(decode_memory_mb * MB)


def decode_budget() -> DecodeBudget:
    return _budget


def reduction(size: tuple[int, int], min_side: int | None) -> int:
    """The integer factor an image of ``size`` is reduced by (box average) when the model needs
    only ``min_side`` pixels on the shorter side: the result keeps at least ``min_side``."""
    short = min(size)
    if not min_side or short < 2 * min_side:
        return 1
    return short // min_side


def native_bytes(mode: str, size: tuple[int, int]) -> int:
    """What Pillow holds for a decoded image of ``mode`` and ``size``."""
    bpp = 1 if mode in _ONE_BYTE_MODES else 2 if mode in _SIXTEEN_BIT_MODES else 4
    return size[0] * size[1] * bpp


def decoder_bytes(im: Image.Image, file_size: int = 0) -> int:
    """What the decoder of ``im`` (opened, not loaded; for a JPEG, before ``draft``) holds on
    top of the decoded image, from its header."""
    fmt = im.format or ""
    extra = DECODER_SLACK + DECODER_BUFFERS.get(fmt, 0) * native_bytes(im.mode, im.size)
    if fmt in READS_WHOLE_FILE:
        extra += file_size
    if fmt == "JPEG" and im.info.get("progressive"):
        extra += im.size[0] * im.size[1] * len(im.getbands()) * 2
    return extra


def decode_memory(
    mode: str,
    size: tuple[int, int],
    *,
    reduce: int = 1,
    decoder: int = DECODER_SLACK,
    transposed: bool | None = None,
) -> int:
    """Bytes decoding an image of ``mode`` and ``size`` (as its header says) takes at its peak:
    the native pixels, with either the decoder's own buffers (``decoder_bytes``, freed once it
    is done) or the RGB result reduced by ``reduce`` and one conversion tile. ``transposed``:
    whether EXIF orientation turns it (None: not known before its pixels are decoded)."""
    w, h = size
    native = native_bytes(mode, size)
    if mode == "RGB" and reduce == 1 and transposed is False:
        return native + decoder  # the decoded image is the result
    result = math.ceil(w / reduce) * math.ceil(h / reduce) * 4
    step = reduce * max(1, TILE // reduce)
    tile = 0 if mode == "RGB" else min(step, w) * min(step, h) * TILE_BYTES_PER_PIXEL
    return native + max(decoder, result + tile)


# ---- inputs ---------------------------------------------------------------------------------


def _not_regular(st_mode: int) -> str | None:
    if stat.S_ISREG(st_mode):
        return None
    if stat.S_ISDIR(st_mode):
        return "is a directory"
    if stat.S_ISFIFO(st_mode):
        return "is a FIFO (named pipe)"
    if stat.S_ISCHR(st_mode):
        return "is a character device"
    if stat.S_ISBLK(st_mode):
        return "is a block device"
    if stat.S_ISSOCK(st_mode):
        return "is a socket"
    return "is not a regular file"


def open_input(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading, and return the file and its size, only if it is a regular
    file (a symlink to one is fine). A FIFO, a device, a socket or a directory is refused with
    its reason before it is opened: opening a FIFO blocks until a writer comes, and a device
    such as ``/dev/urandom`` never ends (and says it has 0 bytes). Raises BadInput naming it."""
    name = os.fsdecode(path)
    try:
        reason = _not_regular(os.stat(path).st_mode)
    except OSError as exc:
        raise BadInput(f"{name}: cannot read the file ({exc.strerror or exc})") from None
    if reason:
        raise BadInput(f"{name}: {reason}, not an image file")
    # Non-blocking, so that a file swapped for a FIFO since the stat cannot block the open.
    nonblock = getattr(os, "O_NONBLOCK", 0)
    flags = os.O_RDONLY | nonblock | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise BadInput(f"{name}: cannot read the file ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        reason = _not_regular(st.st_mode)
        if reason:
            raise BadInput(f"{name}: {reason}, not an image file")
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except OSError as exc:
        os.close(fd)
        raise BadInput(f"{name}: cannot read the file ({exc.strerror or exc})") from None
    except BaseException:
        os.close(fd)
        raise


# ---- formats --------------------------------------------------------------------------------

# Camera RAW files need a demosaicing decoder, which pixelmill does not have. Many are TIFF
# inside (NEF, ARW, DNG, PEF, SRW, ...), and Pillow would decode their small embedded preview
# (or a strip of sensor data) as if it were the photograph, so they are refused by name. Job
# inputs are paths, so the extension is checked first; from the content only CR2, CR3, ORF,
# RW2 and RAF (by their signatures) and DNG (by its DNGVersion tag) are recognised: a NEF or
# ARW renamed to .tif is not told from a TIFF.
RAW_EXTENSIONS = frozenset(
    {".3fr", ".arw", ".cr2", ".cr3", ".crw", ".dcr", ".dng", ".erf", ".iiq", ".k25", ".kdc",
     ".mef", ".mos", ".mrw", ".nef", ".nrw", ".orf", ".pef", ".raf", ".raw", ".rw2", ".rwl",
     ".sr2", ".srf", ".srw", ".x3f"}
)  # fmt: skip
_DNG_VERSION = 50706  # the TIFF tag every DNG has in its first IFD
# Major brands of an ISO-BMFF ("ftyp") file: what a HEIF or AVIF file that fails to open is.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
                          b"mif1", b"msf1"})  # fmt: skip
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


def _unsupported(name: str, what: str) -> BadInput:
    return BadInput(f"{name}: unsupported format ({what}; convert it to JPEG/TIFF first)")


def _raw_signature(head: bytes) -> str | None:
    """The kind of camera RAW file whose first bytes are ``head``, if its signature says."""
    if head[:4] == b"II*\x00" and head[8:10] == b"CR":
        return "Canon CR2"
    if head[4:12] == b"ftypcrx ":
        return "Canon CR3"
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR"):
        return "Olympus ORF"
    if head[:4] == b"IIU\x00":
        return "Panasonic RW2"
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return "Fujifilm RAF"
    return None


def _container(head: bytes) -> str | None:
    """The container of a file whose first bytes are ``head``, by its major brand: "HEIF",
    "AVIF" or None."""
    if head[4:8] != b"ftyp":
        return None
    brand = head[8:12]
    return "AVIF" if brand in _AVIF_BRANDS else "HEIF" if brand in _HEIF_BRANDS else None


# ---- decoding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """An input already read into memory (an object fetched from S3 or the object store):
    ``name`` is what messages call it (its URI)."""

    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


def decode_image(
    path: str | os.PathLike[str] | Fetched, *, min_side: int | None = None
) -> Image.Image:
    """Open ``path`` (a file, or an input already fetched) and return an upright RGB image.

    ``min_side``: the model only needs this many pixels on the shorter side, so a large image
    is reduced before it is converted (a JPEG decoded at a reduced scale with Pillow ``draft``,
    which is several times faster; other formats averaged over boxes of whole pixels), keeping
    at least ``min_side``. Memory stays within ``decode_memory`` and this process's budget.
    """
    fp: BinaryIO
    if isinstance(path, Fetched):
        name, fp, size = path.name, io.BytesIO(path.data), len(path.data)
    else:
        name = os.fsdecode(path)
        fp, size = open_input(path)
    with fp:
        if size == 0:
            raise BadInput(f"{name}: empty file (0 bytes)")
        ext = os.path.splitext(name)[1].lower()
        if ext in RAW_EXTENSIONS:
            raise _unsupported(name, f"camera RAW {ext}")
        head = b""
        try:
            head = fp.read(16)
            fp.seek(0)
            raw = _raw_signature(head)
            if raw:
                raise _unsupported(name, f"camera RAW, {raw}")
            with Image.open(fp) as im:
                return _decode(im, name, min_side, size, in_memory=isinstance(path, Fetched))
        except BadInput:
            raise
        except Image.DecompressionBombError as exc:
            raise BadInput(f"{name}: refused as a possible decompression bomb ({exc})") from None
        except UnidentifiedImageError:
            # pillow_heif and Pillow's AVIF plugin read the file as they open it: a truncated
            # or corrupt one is "not theirs" to Pillow.
            kind = _container(head)
            if kind:
                raise BadInput(
                    f"{name}: corrupt or truncated image ({kind} file that could not be read)"
                ) from None
            raise BadInput(f"{name}: not an image file (format not recognised)") from None
        # RuntimeError: libheif's (pillow_heif) failures as it decodes, such as a codec
        # that this build lacks.
        except (OSError, SyntaxError, ValueError, EOFError, RuntimeError) as exc:
            raise BadInput(f"{name}: corrupt or truncated image ({exc})") from None


def _decode(
    im: ImageFile.ImageFile,
    name: str,
    min_side: int | None,
    file_size: int,
    *,
    in_memory: bool = False,
) -> Image.Image:
    if isinstance(im, TiffImagePlugin.TiffImageFile) and _DNG_VERSION in im.tag_v2:
        raise _unsupported(name, "camera RAW, DNG")
    w, h = im.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise BadInput(
            f"{name}: image too large ({w}x{h} = {w * h} pixels, limit {limit}); "
            "refused as a possible decompression bomb"
        )
    decoder = decoder_bytes(im, file_size)
    if in_memory and (im.format or "") not in READS_WHOLE_FILE:
        decoder += file_size  # the file's bytes are held while it decodes
    if min_side and im.format == "JPEG" and min(w, h) >= 2 * min_side:
        scale = min(w, h) / min_side
        im.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
    factor = reduction(im.size, min_side)
    # A PNG's EXIF may follow its pixels; other formats have theirs in the header.
    known = im.format != "PNG" or "exif" in im.info
    method = _transpose_method(im) if known else None
    need = decode_memory(
        im.mode,
        im.size,
        reduce=factor,
        decoder=decoder,
        transposed=(method is not None) if known else None,
    )
    budget = _budget.total
    if need > budget:
        raise BadInput(
            f"{name}: image needs about {math.ceil(need / MB)} MB to decode "
            f"({im.size[0]}x{im.size[1]} {im.mode}), more than this worker's decode memory "
            f"budget of {budget // MB} MB (PIXELMILL_DECODE_MEMORY_MB)"
        )
    with _budget.hold(need):
        im.load()
        if not known:
            method = _transpose_method(im)
        out = _upright_rgb(im, factor, method)
        if out is not im:
            im.close()  # the native pixels go before their share of the budget does
        return out


def _transpose_method(im: Image.Image) -> Image.Transpose | None:
    if im.format == "HEIF":
        # libheif has turned the picture (irot/imir, which a HEIF's EXIF orientation only
        # restates) and pillow_heif reset the EXIF tag to 1: never turn it twice, and do not
        # parse its EXIF, whose damage would otherwise fail an image whose pixels are fine.
        return None
    return _ORIENTATION.get(im.getexif().get(0x0112, 1))


def _upright_rgb(
    im: Image.Image, factor: int, method: Image.Transpose | None, tile: int = TILE
) -> Image.Image:
    """A loaded image to RGB, reduced by ``factor`` and transposed by ``method``, never holding
    more than the image, the result and one tile's temporaries."""
    if im.mode == "RGB":
        out = im.reduce(factor) if factor > 1 else im
        return out.transpose(method) if method is not None else out
    if (
        factor == 1
        and method is None
        and im.mode in ("1", "L", "CMYK", "YCbCr")
        and "transparency" not in im.info
    ):
        return im.convert("RGB")  # one step, no temporaries
    level = _white_level(im)
    w, h = im.size
    ow, oh = math.ceil(w / factor), math.ceil(h / factor)
    out = Image.new("RGB", (oh, ow) if method in _SWAPS_SIDES else (ow, oh))
    step = factor * max(1, tile // factor)
    for y in range(0, h, step):
        for x in range(0, w, step):
            part = to_rgb(im.crop((x, y, min(x + step, w), min(y + step, h))), level=level)
            if factor > 1:
                part = part.reduce(factor)
            x0, y0 = x // factor, y // factor
            box = (x0, y0, x0 + part.width, y0 + part.height)
            if method is not None:
                part = part.transpose(method)
            out.paste(part, _transposed_origin(box, (ow, oh), method))
    return out


def _transposed_origin(
    box: tuple[int, int, int, int], size: tuple[int, int], method: Image.Transpose | None
) -> tuple[int, int]:
    """Where the part at ``box`` of an image of ``size`` lands once the image is transposed."""
    x0, y0, x1, y1 = box
    w, h = size
    T = Image.Transpose
    return {
        None: (x0, y0),
        T.FLIP_LEFT_RIGHT: (w - x1, y0),
        T.FLIP_TOP_BOTTOM: (x0, h - y1),
        T.ROTATE_180: (w - x1, h - y1),
        T.ROTATE_90: (y0, w - x1),
        T.ROTATE_270: (h - y1, x0),
        T.TRANSPOSE: (y0, x0),
        T.TRANSVERSE: (h - y1, w - x1),
    }[method]


def _white_level(im: Image.Image) -> float | None:
    """The value that becomes 255 for an "I" or "F" image (from the whole image's maximum, so
    that every tile is scaled alike); None for other modes."""
    if im.mode == "I":
        return 65535.0 if im.getextrema()[1] > 255 else 255.0  # type: ignore[operator]
    if im.mode == "F":
        hi = float(im.getextrema()[1])  # type: ignore[arg-type]
        return hi if hi > 1.0 else 1.0
    return None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    np.rint(arr, out=arr)
    np.clip(arr, 0, 255, out=arr)
    return arr.astype(np.uint8)


def to_rgb(im: Image.Image, *, level: float | None = None) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited onto BACKGROUND, 16-bit scaled.

    ``level``: for "I" and "F" images, the value that becomes 255 (default: from this image's
    own maximum; a tile of a larger image passes the whole image's)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy() if im.readonly else im
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if mode != "I":
            peak = 65535.0
        elif level is not None:
            peak = level
        else:
            peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr *= 255.0 / peak  # in place: one float64 temporary, not four
        return Image.fromarray(_to_uint8(arr), mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im)
        if level is None:
            hi = float(arr.max(initial=1.0)) or 1.0
            level = hi if hi > 1.0 else 1.0
        scaled = arr / level
        scaled *= 255.0
        return Image.fromarray(_to_uint8(scaled), mode="L").convert("RGB")
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in im.info)
        or (mode in ("L", "RGB") and "transparency" in im.info)
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")

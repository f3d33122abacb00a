"""Decoding: upright RGB for every mode, and a BadInput naming the file for anything broken."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pixelmill.errors import BadInput
from pixelmill.models.images import BACKGROUND, decode_image


def test_exif_orientation_is_applied(tmp_path):
    # A 40x20 image, left half red, stored with "rotate 90 CW" (orientation 6).
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=95)
    out = decode_image(path)
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top


def test_rgba_is_composited_onto_the_background(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    out = decode_image(path)
    assert out.mode == "RGB"
    assert tuple(np.asarray(out)[0, 0]) == BACKGROUND


def test_palette_with_transparency_grayscale_and_cmyk_become_rgb(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "pal.png", transparency=0)
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert tuple(np.asarray(decode_image(tmp_path / "pal.png"))[0, 0]) == (10, 200, 30)
    assert tuple(np.asarray(decode_image(tmp_path / "gray.png"))[0, 0]) == (77, 77, 77)
    red = np.asarray(decode_image(tmp_path / "cmyk.jpg"))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    value = np.asarray(decode_image(path))[0, 0, 0]
    assert 120 <= value <= 135


def test_large_jpeg_decodes_at_reduced_scale_keeping_enough_pixels(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1600), (90, 90, 90)).save(path)
    out = decode_image(path, min_side=256)
    assert min(out.size) >= 256
    assert out.size[0] < 2400


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "corrupt"])
def test_bad_files_raise_bad_input_naming_the_file(bad_files, kind):
    path = bad_files[kind]
    with pytest.raises(BadInput) as err:
        decode_image(path)
    assert str(path) in str(err.value)


def test_directory_and_missing_file_are_bad_input(tmp_path):
    folder = tmp_path / "looks-like.jpg"
    folder.mkdir()
    with pytest.raises(BadInput, match="directory"):
        decode_image(folder)
    with pytest.raises(BadInput, match="cannot read"):
        decode_image(tmp_path / "missing.png")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200)
    with pytest.raises(BadInput, match="bomb"):
        decode_image(path)

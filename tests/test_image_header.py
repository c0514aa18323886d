"""Image dimensions read from headers, for every format the decoder accepts, and bombs in each
refused before decoding."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from ascension_cli.data.folder import ImageDecodeError, decode_image
from ascension_cli.data.image_header import image_format, image_size

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".tiff": "TIFF", ".webp": "WebP", ".bmp": "BMP",
           ".ppm": "PNM", ".pam": "PNM", ".pfm": "PNM", ".ras": "Sun raster",
           ".jp2": "JPEG 2000", ".hdr": "Radiance HDR", ".gif": "GIF", ".avif": "AVIF"}


def encoded(extension: str, width: int = 64, height: int = 48) -> bytes:
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    if extension in (".hdr", ".pfm"):
        image = image.astype(np.float32) / 255
    ok, buffer = cv2.imencode(extension, image)
    if not ok:
        pytest.skip(f"this OpenCV cannot write {extension}")
    return buffer.tobytes()


@pytest.mark.parametrize("extension", sorted(FORMATS))
def test_every_format_is_sized_from_its_header_and_decodes(extension):
    data = encoded(extension)
    assert image_size(data) == (FORMATS[extension], (64, 48))
    assert decode_image(data, "x").shape == (48, 64, 3)
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(data, "x", max_pixels=64 * 48 - 1)


def test_grayscale_pnm_and_a_bare_jpeg2000_codestream_and_os2_bmp():
    gray = cv2.imencode(".pgm", np.zeros((5, 7), np.uint8))[1].tobytes()
    assert image_size(gray) == ("PNM", (7, 5))
    commented = b"P5\n# a comment\n7 5\n255\n" + bytes(35)
    assert image_size(commented) == ("PNM", (7, 5))
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + (70).to_bytes(4, "big") + (40).to_bytes(4, "big") \
        + (6).to_bytes(4, "big") + (0).to_bytes(4, "big")
    assert image_size(siz) == ("JPEG 2000", (64, 40))
    os2 = b"BM" + bytes(12) + (12).to_bytes(4, "little") + (9).to_bytes(2, "little") \
        + (3).to_bytes(2, "little")
    assert image_size(os2) == ("BMP", (9, 3))


def tiff_claiming(width: int, height: int) -> bytes:
    """A real little TIFF whose header says it is width x height."""
    data = bytearray(encoded(".tiff", 8, 8))
    ifd = int.from_bytes(data[4:8], "little")
    for entry in range(int.from_bytes(data[ifd:ifd + 2], "little")):
        at = ifd + 2 + 12 * entry
        tag = int.from_bytes(data[at:at + 2], "little")
        if tag in (256, 257):
            data[at + 2:at + 4] = (4).to_bytes(2, "little")  # LONG
            data[at + 8:at + 12] = (width if tag == 256 else height).to_bytes(4, "little")
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """An extended-format (VP8X) WebP header announcing width x height."""
    chunk = b"VP8X" + (10).to_bytes(4, "little") + bytes(4) + (width - 1).to_bytes(3, "little") \
        + (height - 1).to_bytes(3, "little")
    return b"RIFF" + (4 + len(chunk)).to_bytes(4, "little") + b"WEBP" + chunk


@pytest.mark.parametrize("bomb", [tiff_claiming(11000, 11000), webp_claiming(12000, 12000)],
                         ids=["tiff-11000px", "webp-12000px"])
def test_bombs_of_other_formats_are_refused_before_decoding(bomb):
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(bomb, "bomb")
    assert time.perf_counter() - started < 0.1


@pytest.mark.parametrize("data", [b"\x00\x00\x00\x1cftypheic" + bytes(40),  # HEIF: no reader
                                  b"v/1\x01" + bytes(40),                     # OpenEXR
                                  b"just some text, not an image"],
                         ids=["heic", "exr", "text"])
def test_formats_without_a_size_reader_are_refused(data):
    assert image_format(data) is None
    with pytest.raises(ImageDecodeError, match="not an image format Ascension reads"):
        decode_image(data, "x")


@pytest.mark.parametrize("extension", [".png", ".jpg", ".tiff", ".webp", ".bmp", ".jp2"])
def test_headers_cut_short_are_refused_as_damaged(extension):
    data = encoded(extension)[:12]
    assert image_size(data) == (FORMATS[extension], None)
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(data, "x")

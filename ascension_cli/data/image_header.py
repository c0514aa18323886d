"""An image's format and dimensions read from its first bytes, without decoding it.

This is the decompression-bomb check: a few kilobytes can announce gigapixels, so the pixels are
counted before the decoder allocates them. Every format OpenCV decodes here has a reader (PNG,
JPEG, TIFF, WebP, BMP, GIF, PNM/PAM/PFM, Sun raster, JPEG 2000, Radiance HDR, AVIF); anything
else, or a header that does not parse, is unsized, and the caller refuses it rather than
decoding blind. Each reader is a small function of plain bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"

Size = tuple[int, int]  # (width, height)


def _u(data: bytes, start: int, length: int, order: str = "big") -> int:
    if start + length > len(data):
        raise ValueError("header cut short")
    return int.from_bytes(data[start:start + length], order)


def _png(data: bytes) -> Size:
    return _u(data, 16, 4), _u(data, 20, 4)


def _jpeg(data: bytes) -> Size:
    position = 2
    while position + 9 < len(data):
        if data[position] != 0xFF:
            raise ValueError("not a JPEG marker")
        marker = data[position + 1]
        if marker in (0xD8, 0x01, 0xFF) or 0xD0 <= marker <= 0xD7:  # no length field
            position += 1 if marker == 0xFF else 2
            continue
        # Start-of-frame markers (not DHT C4, JPG C8, DAC CC) carry the dimensions.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return _u(data, position + 7, 2), _u(data, position + 5, 2)
        position += 2 + _u(data, position + 2, 2)
    raise ValueError("no frame header")


def _gif(data: bytes) -> Size:
    return _u(data, 6, 2, "little"), _u(data, 8, 2, "little")


def _bmp(data: bytes) -> Size:
    if _u(data, 14, 4, "little") == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return _u(data, 18, 2, "little"), _u(data, 20, 2, "little")
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)  # negative: top-down rows
    return abs(width), abs(height)


def _webp(data: bytes) -> Size:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        return _u(data, 26, 2, "little") & 0x3FFF, _u(data, 28, 2, "little") & 0x3FFF
    if chunk == b"VP8L":
        bits = _u(data, 21, 4, "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return _u(data, 24, 3, "little") + 1, _u(data, 27, 3, "little") + 1
    raise ValueError("unknown WebP chunk")


def _tiff(data: bytes) -> Size:
    order = "little" if data[:2] == b"II" else "big"
    if _u(data, 2, 2, order) != 42:
        raise ValueError("BigTIFF or not TIFF")
    ifd = _u(data, 4, 4, order)
    found: dict[int, int] = {}
    for entry in range(min(_u(data, ifd, 2, order), 4096)):
        at = ifd + 2 + 12 * entry
        tag, kind = _u(data, at, 2, order), _u(data, at + 2, 2, order)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            found[tag] = _u(data, at + 8, 2 if kind == 3 else 4, order)
    return found[256], found[257]


def _pnm(data: bytes) -> Size:
    if data[:2] == b"P7":  # PAM: WIDTH and HEIGHT lines
        head = data[:4096]
        width = re.search(rb"\nWIDTH\s+(\d+)", head)
        height = re.search(rb"\nHEIGHT\s+(\d+)", head)
        return int(width.group(1)), int(height.group(1))
    fields = re.sub(rb"#[^\n]*", b" ", data[2:4096]).split()  # comments may sit between fields
    return int(fields[0]), int(fields[1])


def _sun_raster(data: bytes) -> Size:
    return _u(data, 4, 4), _u(data, 8, 4)


def _jpeg2000(data: bytes) -> Size:
    if data.startswith(b"\xff\x4f\xff\x51"):  # a bare codestream: the SIZ marker segment
        return _u(data, 8, 4) - _u(data, 16, 4), _u(data, 12, 4) - _u(data, 20, 4)
    at = data.find(b"ihdr", 0, 65536)  # the JP2 header box: height, then width
    if at < 0:
        raise ValueError("no ihdr box")
    return _u(data, at + 8, 4), _u(data, at + 4, 4)


def _radiance(data: bytes) -> Size:
    found = re.search(rb"\n\n([-+])([XY]) (\d+) ([-+])([XY]) (\d+)", data[:65536])
    if not found:
        raise ValueError("no resolution line")
    first, second = int(found.group(3)), int(found.group(6))
    return (second, first) if found.group(2) == b"Y" else (first, second)


def _avif(data: bytes) -> Size:
    # The largest 'ispe' (image spatial extents) property of the file: a grid's tiles and the
    # whole image each have one, so the whole image is never under-counted.
    sizes = [(_u(data, at + 8, 4), _u(data, at + 12, 4))
             for at in (m.start() for m in re.finditer(rb"ispe", data[:1 << 20]))]
    if not sizes:
        raise ValueError("no ispe box")
    return max(sizes, key=lambda size: size[0] * size[1])


# (format, test on the first bytes, reader), in the order OpenCV's decoders test signatures.
_READERS: tuple[tuple[str, Callable[[bytes], bool], Callable[[bytes], Size]], ...] = (
    ("PNG", lambda d: d.startswith(PNG_MAGIC), _png),
    ("JPEG", lambda d: d.startswith(JPEG_MAGIC), _jpeg),
    ("GIF", lambda d: d[:6] in (b"GIF87a", b"GIF89a"), _gif),
    ("BMP", lambda d: d.startswith(b"BM"), _bmp),
    ("WebP", lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", _webp),
    ("TIFF", lambda d: d[:4] in (b"II*\x00", b"MM\x00*"), _tiff),
    ("PNM", lambda d: re.match(rb"P[1-7Ff]\s", d[:3]) is not None, _pnm),
    ("Sun raster", lambda d: d.startswith(b"\x59\xa6\x6a\x95"), _sun_raster),
    ("JPEG 2000", lambda d: d.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n",
                                          b"\xff\x4f\xff\x51")), _jpeg2000),
    ("Radiance HDR", lambda d: d.startswith((b"#?RADIANCE", b"#?RGBE")), _radiance),
    ("AVIF", lambda d: d[4:12] in (b"ftypavif", b"ftypavis"), _avif),
)

FORMATS = tuple(name for name, _, _ in _READERS)
# The file extension Ascension gives an image of each format it writes (an added photo).
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WebP": ".webp",
              "TIFF": ".tif", "PNM": ".pnm", "Sun raster": ".ras", "JPEG 2000": ".jp2",
              "Radiance HDR": ".hdr", "AVIF": ".avif"}


def _reader(data: bytes) -> tuple[str, Callable[[bytes], Size]] | None:
    return next(((name, read) for name, matches, read in _READERS if matches(data)), None)


def image_format(data: bytes) -> str | None:
    """The format the first bytes announce, or None for one Ascension does not read."""
    found = _reader(data)
    return None if found is None else found[0]


def image_size(data: bytes) -> tuple[str, Size | None] | None:
    """(format, (width, height)) from the header; (format, None) when the header of a known
    format does not parse (cut short, malformed); None for an unknown format."""
    found = _reader(data)
    if found is None:
        return None
    name, read = found
    try:
        return name, read(data)
    except (ValueError, KeyError, AttributeError, IndexError):
        return name, None

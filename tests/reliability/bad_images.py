"""Broken, hostile and oversized image files for the bad-input corpus.

Every file starts from a real encoded photo (PIL) and is then damaged, or is a hand-built
header that lies about its size. The decompression bomb is a complete, valid 1-bit PNG of
30000 x 30000 pixels: about 110 KB on the wire, 900 MB once PIL decodes it.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

from PIL import Image

from tests.fixtures.models import tiny_image

BOMB_SIDE = 30_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode(fmt: str, index: int = 0, size: tuple[int, int] = (48, 40), **options: object) -> bytes:
    """A real photo crop encoded as ``fmt``."""
    buffer = io.BytesIO()
    img = tiny_image(index, seed=21, size=size)
    if fmt == "GIF":
        img = img.convert("P")
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_ihdr(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """An IHDR chunk (colour type 2 = RGB, 0 = greyscale)."""
    return png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    )


@cache
def png_bomb() -> bytes:
    """A valid 1-bit greyscale PNG of BOMB_SIDE x BOMB_SIDE zeros, compressed as deflate allows.

    Each row is a filter byte plus BOMB_SIDE/8 bytes; 112 MB of zero rows deflate to ~110 KB.
    PIL keeps mode "1" as one byte per pixel, so decoding it would allocate 900 MB.
    """
    row = b"\x00" * (1 + BOMB_SIDE // 8)
    compressor = zlib.compressobj(9)
    rows_per_piece = 1000
    piece = row * rows_per_piece
    body = bytearray()
    for _ in range(BOMB_SIDE // rows_per_piece):
        body += compressor.compress(piece)
    body += compressor.flush()
    return (
        PNG_SIGNATURE
        + png_ihdr(BOMB_SIDE, BOMB_SIDE, bit_depth=1, colour_type=0)
        + png_chunk(b"IDAT", bytes(body))
        + png_chunk(b"IEND", b"")
    )


def png_header_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A ~100-byte PNG whose header declares ``width`` x ``height`` RGB pixels."""
    return (
        PNG_SIGNATURE
        + png_ihdr(width, height)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def png_strip(width: int, height: int = 1) -> bytes:
    """A complete, valid PNG of a black ``width`` x ``height`` strip: a few hundred bytes whose
    resize to the model's short side would need gigabytes (100000 x 1: ~26 GB)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def tiled_tiff(width: int, height: int, tile: int) -> bytes:
    """A valid greyscale TIFF of ``width`` x ``height`` in one deflated ``tile`` x ``tile``
    tile of zeros (PIL does not write tiled TIFFs, so the file is built by hand)."""
    body = zlib.compress(b"\x00" * (tile * tile), 9)
    entries = [  # (tag, type: 3 SHORT / 4 LONG, value), in tag order
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),  # bits per sample
        (259, 3, 8),  # deflate
        (262, 3, 1),  # black is zero
        (277, 3, 1),  # samples per pixel
        (322, 4, tile),
        (323, 4, tile),
        (324, 4, 8 + 2 + 12 * 10 + 4),  # the tile's offset: right after the IFD
        (325, 4, len(body)),
    ]
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, value in entries:
        out += struct.pack("<HHI", tag, kind, 1)
        out += struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
    return bytes(out + struct.pack("<I", 0) + body)


def jpeg_scan_bomb(scans: int, side: int = 1024) -> bytes:
    """A real progressive JPEG of a flat ``side`` x ``side`` picture whose last scan (14 bytes)
    is repeated until it has ``scans`` scans: each costs libjpeg a pass over every block."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(
        buffer, format="JPEG", quality=90, progressive=True
    )
    data = buffer.getvalue()
    last, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    have = data.count(b"\xff\xda")
    return data[:end] + data[last:end] * (scans - have) + data[end:]


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to declare ``width`` x ``height``."""
    data = bytearray(encode("JPEG", 1))
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "baseline JPEG expected"
    # SOF0: marker(2) length(2) precision(1) height(2) width(2)
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_with_screen(width: int, height: int) -> bytes:
    """A real GIF whose logical screen descriptor declares ``width`` x ``height``."""
    data = bytearray(encode("GIF", 2))
    struct.pack_into("<HH", data, 6, width, height)
    return bytes(data)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` fraction of ``data``."""
    return data[: max(1, int(len(data) * keep))]


def png_corrupt_idat() -> bytes:
    """A real PNG with bytes inside its compressed pixel data flipped (bad deflate/CRC)."""
    data = bytearray(encode("PNG", 3))
    idat = data.find(b"IDAT")
    for offset in range(idat + 8, min(idat + 40, len(data) - 12)):
        data[offset] ^= 0xFF
    return bytes(data)


def jpeg_corrupt_header() -> bytes:
    """A real JPEG whose quantisation table marker is destroyed (headers no longer parse)."""
    data = bytearray(encode("JPEG", 4))
    dqt = data.find(b"\xff\xdb")
    data[dqt : dqt + 4] = b"\xff\xff\xff\xff"
    return bytes(data)


def png_zero_width() -> bytes:
    """A PNG whose header declares a width of 0."""
    return png_header_bomb(0, 16)


def big_noise_png(min_bytes: int) -> bytes:
    """A valid PNG of random pixels larger than ``min_bytes`` (noise does not compress)."""
    import numpy as np

    side = 64
    while True:
        pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        if buffer.tell() > min_bytes:
            return buffer.getvalue()
        side *= 2


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="32" height="32">'
    b'<image href="http://127.0.0.1:9/x.png" width="32" height="32"/></svg>'
)
HTML = b"<!doctype html><html><body><img src='http://127.0.0.1:9/x.png'></body></html>"

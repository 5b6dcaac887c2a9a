"""Decoding untrusted image bytes: limits before allocation, every failure names the image."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from server.engine.decode import decode_image, pixel_digest
from server.errors import ApiError
from tests.fixtures.models import tiny_image

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 20}


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares ``width`` x ``height`` RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def failure(data: bytes, index: int = 3, **limits: int) -> ApiError:
    with pytest.raises(ApiError) as err:
        decode_image(data, index, **{**LIMITS, **limits})
    return err.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    img = tiny_image(0, size=(40, 30))
    out = decode_image(encode(img, fmt), 0, **LIMITS)
    assert out.mode == "RGB"
    assert out.size == (40, 30)


def test_decompression_bomb_is_refused_from_its_header() -> None:
    # 20000 x 20000 declared in ~100 bytes: decoding it would allocate 1.2 GB.
    err = failure(png_declaring(20_000, 20_000))
    assert err.code == "image_too_large"
    assert err.status == 413
    assert err.extra == {"image": 3}


def test_pixel_limit_is_checked_before_decoding() -> None:
    # Under PIL's own bomb threshold: only our limit stands in the way, and it must act
    # before load() (the IDAT holds far fewer bytes than 3000 x 3000 would need).
    err = failure(png_declaring(3000, 3000), max_pixels=1_000_000)
    assert err.code == "image_too_large"
    assert "3000x3000" in err.detail


def test_byte_limit_is_checked_before_parsing() -> None:
    data = encode(tiny_image(1), "PNG")
    err = failure(data, max_bytes=len(data) - 1)
    assert err.code == "image_too_large"
    assert str(len(data)) in err.detail


def test_zero_bytes() -> None:
    err = failure(b"")
    assert (err.code, err.status, err.extra) == ("bad_image", 422, {"image": 3})
    assert "empty" in err.detail


def test_truncated_file() -> None:
    data = encode(tiny_image(2, size=(64, 64)), "PNG")
    err = failure(data[: len(data) // 2], index=1)
    assert err.code == "bad_image"
    assert err.extra == {"image": 1}
    assert "image 1" in err.detail


@pytest.mark.parametrize(
    "data",
    [
        b"definitely not an image",
        encode(tiny_image(0, size=(16, 16)), "ICO"),  # a real image, but not an allowed format
        b"%PDF-1.4\n",
    ],
)
def test_wrong_format(data: bytes) -> None:
    err = failure(data)
    assert err.code == "bad_image"
    assert "supported" in err.detail


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buffer.getvalue(), 0, **LIMITS)
    assert out.getpixel((4, 4)) == (255, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    out = np.asarray(decode_image(encode(Image.fromarray(ramp), "PNG"), 0, **LIMITS))
    assert out.shape == (64, 64, 3)
    # Clipping would saturate everything above 255 (most of the ramp) to white.
    assert (out == 255).mean() < 0.01
    assert out[-1, -1, 0] > 240


def test_digest_depends_on_pixels_not_encoding() -> None:
    img = tiny_image(4)
    png = decode_image(encode(img, "PNG"), 0, **LIMITS)
    webp = decode_image(encode(img, "WEBP", lossless=True), 0, **LIMITS)
    other = decode_image(encode(tiny_image(5), "PNG"), 0, **LIMITS)
    assert pixel_digest(png) == pixel_digest(webp)
    assert pixel_digest(png) != pixel_digest(other)

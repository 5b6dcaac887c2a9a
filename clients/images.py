"""Turn what a caller holds (a path, bytes, a PIL image, a numpy array) into encoded bytes.

The server decodes images itself, so files and bytes travel untouched; in-memory pixels are
encoded losslessly as PNG. Pillow and numpy are imported only when such an object is passed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | Any
"""A path, encoded bytes, a ``PIL.Image.Image`` or an HWC/HW ``uint8`` numpy array."""

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def content_type(data: bytes) -> str:
    """The image media type sniffed from magic bytes (``application/octet-stream`` if unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, media in _MAGIC:
        if data.startswith(magic):
            return media
    return "application/octet-stream"


def _png(pil_image: Any) -> bytes:
    buf = io.BytesIO()
    # Level 1: PNG is lossless at any level and the bytes only cross a network once.
    pil_image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _from_array(array: Any) -> bytes:
    from PIL import Image

    if str(array.dtype) != "uint8":
        raise ValueError(f"numpy images must be uint8 (got {array.dtype}); scale to 0..255 first")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"numpy images must be HxW or HxWx{{1,3,4}} (got shape {array.shape})")
    return _png(Image.fromarray(array))


def encode_image(image: ImageInput) -> tuple[bytes, str]:
    """Encoded bytes of one image and their media type.

    Paths are read as they are; bytes are sent as they are; PIL images and numpy arrays
    (HWC or HW, uint8) are PNG-encoded.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
    elif type(image).__module__.startswith("numpy"):
        data = _from_array(image)
    elif type(image).__module__.startswith("PIL.") and hasattr(image, "save"):
        data = _png(image)
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}: pass a path, bytes, "
            "a PIL image or a uint8 numpy array"
        )
    return data, content_type(data)


def image_name(image: ImageInput, index: int) -> str:
    """A file name for the multipart part (the path's name when there is one)."""
    if isinstance(image, str | os.PathLike):
        return Path(image).name or f"image{index}"
    return f"image{index}"

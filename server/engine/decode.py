"""Untrusted image bytes -> an RGB ``PIL.Image``, with every size checked before it costs memory.

Order matters for decompression bombs: the byte size is checked before parsing, and the
declared width x height (read from the header by ``Image.open``) before ``load()`` allocates
the pixel buffer. PIL's own bomb guard (``DecompressionBombError``) is a second line; its
warning is irrelevant because our limit is checked first.

EXIF orientation is not applied, on purpose: training reads images the same way
(``Image.open(...).convert("RGB")``), and the two must see the same pixels.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from server.errors import ApiError

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
"""Formats PIL may try, in this order. Anything else is ``bad_image``."""

# PIL reports multi-picture JPEGs (phone cameras) as MPO; they are JPEGs to a user.
_ACCEPTED_REPORTED = frozenset(ALLOWED_FORMATS) | {"MPO"}


def open_checked(data: bytes, index: int, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Image number ``index`` of a request parsed up to its header, every limit checked.

    Nothing is decoded yet: the byte size is checked before parsing, the format and the
    declared width x height after it (``image_too_large`` / ``bad_image`` as for
    :func:`decode_image`). The caller closes the returned image (``with``).
    """
    if not data:
        raise ApiError("bad_image", f"image {index} is empty (0 bytes)", image=index)
    if len(data) > max_bytes:
        raise ApiError(
            "image_too_large",
            f"image {index} is {len(data)} bytes; the limit is {max_bytes}",
            image=index,
        )
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ApiError(
            "image_too_large", f"image {index} declares too many pixels: {exc}", image=index
        ) from exc
    except UnidentifiedImageError as exc:
        raise ApiError(
            "bad_image",
            f"image {index} is not a supported image (allowed: {', '.join(ALLOWED_FORMATS)})",
            image=index,
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ApiError(
            "bad_image", f"image {index} has a corrupt header: {exc}", image=index
        ) from exc
    try:
        if img.format not in _ACCEPTED_REPORTED:
            raise ApiError(
                "bad_image", f"image {index} has unsupported format {img.format}", image=index
            )
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ApiError(
                "bad_image", f"image {index} has no pixels ({width}x{height})", image=index
            )
        if width * height > max_pixels:
            raise ApiError(
                "image_too_large",
                f"image {index} is {width}x{height} = {width * height} pixels; "
                f"the limit is {max_pixels}",
                image=index,
            )
    except ApiError:
        img.close()
        raise
    return img


def decode_image(data: bytes, index: int, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode image number ``index`` of a request to RGB, or raise an ``ApiError`` naming it.

    ``image_too_large`` (413) when the bytes exceed ``max_bytes`` or the declared pixels exceed
    ``max_pixels``; ``bad_image`` (422) for empty, truncated, corrupt or unsupported input.
    Animated GIFs and multi-page TIFFs give their first frame.
    """
    with open_checked(data, index, max_bytes=max_bytes, max_pixels=max_pixels) as img:
        try:
            img.seek(0)  # first frame of an animation / first page of a TIFF
            img.load()
            return _to_rgb(img)
        except Image.DecompressionBombError as exc:
            raise ApiError(
                "image_too_large", f"image {index} decodes to too many pixels: {exc}", image=index
            ) from exc
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            # Truncated files surface here ("image file is truncated"), after the header parsed.
            raise ApiError(
                "bad_image", f"image {index} could not be decoded: {exc}", image=index
            ) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of a loaded image; 16-bit and float grey levels are scaled, not clipped."""
    if img.mode.startswith("I") or img.mode == "F":
        # convert("RGB") would clip values above 255: a 16-bit scan would come out white.
        grey = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            grey = grey - float(grey.min())
            top = max(float(grey.max()), 1e-12)
        else:
            peak = float(grey.max()) if grey.size else 0.0
            top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        scaled = np.clip(np.rint(grey * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    return img.convert("RGB")


def pixel_digest(img: Image.Image) -> str:
    """sha256 of size, mode and raw pixels: the feature cache key of an image.

    The same pixels sent as PNG or as lossless WebP give the same digest; re-encoding with
    loss (JPEG) gives different pixels and so a different digest, as it must.
    """
    h = hashlib.sha256()
    h.update(f"{img.width}x{img.height}:{img.mode}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()

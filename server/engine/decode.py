"""Untrusted image bytes -> the backbone's input, with every size checked before it costs memory.

Order matters for decompression bombs: the byte size is checked before parsing, and the
declared width x height and aspect ratio (read from the header by ``Image.open``) before
``load()`` allocates the pixel buffer. PIL's own bomb guard (``DecompressionBombError``) is a
second line; its warning is irrelevant because our limit is checked first.

After the checks the image goes straight to :func:`restuning.preprocess.crop_pixels`, which
never allocates with the resized size: memory is the decoded image (at most 4 bytes a declared
pixel; a JPEG in ``fast`` mode only at its reduced DCT scale), one RGB copy of the crop window
and the output. The aspect-ratio limit keeps strips (a 100000 x 1 PNG is 376 bytes) out of
every path, including the GPU decoder that resizes whole images.

EXIF orientation is not applied, on purpose: training reads images the same way
(``Image.open(...).convert("RGB")``), and the two must see the same pixels.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from PIL import Image, UnidentifiedImageError

from restuning.preprocess import PreprocessMode, crop_pixels, normalise, to_rgb
from restuning.presets import DataConfig
from server.errors import ApiError
from server.settings import DEFAULT_MAX_ASPECT_RATIO

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
"""Formats PIL may try, in this order. Anything else is ``bad_image``."""

# PIL reports multi-picture JPEGs (phone cameras) as MPO; they are JPEGs to a user.
_ACCEPTED_REPORTED = frozenset(ALLOWED_FORMATS) | {"MPO"}


def open_checked(
    data: bytes,
    index: int,
    *,
    max_bytes: int,
    max_pixels: int,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Image number ``index`` of a request parsed up to its header, every limit checked.

    Nothing is decoded yet: the byte size is checked before parsing, the format, the
    declared width x height and the aspect ratio after it (``image_too_large`` /
    ``bad_image`` / ``image_aspect_ratio`` as for :func:`decode_image`). The caller closes
    the returned image (``with``).
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
        _check_tiff_tiles(img, index)
        _check_jpeg_scans(img, data, index)
        if max(width, height) > max_aspect_ratio * min(width, height):
            raise ApiError(
                "image_aspect_ratio",
                f"image {index} is {width}x{height}, an aspect ratio of "
                f"{max(width, height) / min(width, height):.4g}; the limit is {max_aspect_ratio:g}",
                image=index,
            )
    except ApiError:
        img.close()
        raise
    return img


TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 322, 323
MIN_TILE_PIXELS_ALLOWED = 256 * 256
"""Tiles up to this many pixels always pass (a thumbnail in one 256 x 256 tile is normal)."""


def _check_tiff_tiles(img: Image.Image, index: int) -> None:
    """Refuse TIFF tiles larger than the image could need (``image_too_large``).

    libtiff allocates one whole tile per read, whatever the image's declared size: a 65 KB
    file declaring 16 x 16 pixels in one 8192 x 8192 deflated tile costs 64 MB, and a 2 MB
    one 2 GB. A tile may overhang the image (tiles come in multiples of 16), so tiles up to
    4x the image's pixels, or 256 x 256, pass. Strips need no check: libtiff clamps a strip's
    rows to the image's.
    """
    if img.format != "TIFF":
        return
    tags = getattr(img, "tag_v2", {})
    tile_w, tile_h = tags.get(TIFF_TILE_WIDTH), tags.get(TIFF_TILE_LENGTH)
    if not isinstance(tile_w, int) or not isinstance(tile_h, int):
        return
    width, height = img.size
    if tile_w * tile_h > max(4 * width * height, MIN_TILE_PIXELS_ALLOWED):
        raise ApiError(
            "image_too_large",
            f"image {index} is {width}x{height} pixels stored in {tile_w}x{tile_h} TIFF tiles; "
            f"tiles may hold at most {max(4 * width * height, MIN_TILE_PIXELS_ALLOWED)} pixels",
            image=index,
        )


MAX_JPEG_SCANS = 64
"""Scans a JPEG may have: progressive encoders write ~10, mozjpeg's tuned ones a few more.
At 64 a 40 MP image costs at most ~1.5 s of decoding (measured: a 2000 x 2000 JPEG of
14-byte scans takes 2.3 ms a scan)."""

_JPEG_SOS = b"\xff\xda"


def _check_jpeg_scans(img: Image.Image, data: bytes, index: int) -> None:
    """Refuse JPEGs with more scans than any encoder writes (``image_too_large``).

    libjpeg passes over every coefficient block of a component once per progressive scan,
    and a scan can be 14 bytes: 31 KB of them (500 scans at 2000 x 2000) cost 1.2 s of CPU,
    16 MB of them most of an hour. Entropy-coded data
    escapes 0xFF, so counting start-of-scan markers counts scans (an EXIF thumbnail adds its
    own; MPO's extra pictures theirs).
    """
    if img.format not in ("JPEG", "MPO"):
        return
    scans = data.count(_JPEG_SOS)
    if scans > MAX_JPEG_SCANS:
        raise ApiError(
            "image_too_large",
            f"image {index} has {scans} JPEG scans; at most {MAX_JPEG_SCANS} are decoded",
            image=index,
        )


@contextmanager
def _decode_errors(index: int) -> Iterator[None]:
    """Decoder failures after the header parsed, as the ``ApiError`` naming image ``index``."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise ApiError(
            "image_too_large", f"image {index} decodes to too many pixels: {exc}", image=index
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        # Truncated files surface here ("image file is truncated"), after the header parsed.
        raise ApiError(
            "bad_image", f"image {index} could not be decoded: {exc}", image=index
        ) from exc


@contextmanager
def _first_frame(
    data: bytes, index: int, max_bytes: int, max_pixels: int, max_aspect_ratio: float
) -> Iterator[Image.Image]:
    """Image ``index`` opened with every limit checked, on its first frame (an animation's,
    a TIFF's first page), with decoding errors turned into ``bad_image``."""
    with (
        open_checked(
            data,
            index,
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            max_aspect_ratio=max_aspect_ratio,
        ) as img,
        _decode_errors(index),
    ):
        img.seek(0)
        yield img


def decode_image(
    data: bytes,
    index: int,
    *,
    max_bytes: int,
    max_pixels: int,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Decode image number ``index`` of a request to a whole RGB image, or raise an
    ``ApiError`` naming it.

    ``image_too_large`` (413) when the bytes exceed ``max_bytes`` or the declared pixels exceed
    ``max_pixels``; ``image_aspect_ratio`` (422) past ``max_aspect_ratio``; ``bad_image``
    (422) for empty, truncated, corrupt or unsupported input. Animated GIFs and multi-page
    TIFFs give their first frame. The server's path is :func:`prepare_image`, which never
    holds the whole image in RGB.
    """
    with _first_frame(data, index, max_bytes, max_pixels, max_aspect_ratio) as img:
        img.load()
        return to_rgb(img)


def prepare_image(
    data: bytes,
    index: int,
    data_config: DataConfig,
    *,
    max_bytes: int,
    max_pixels: int,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    mode: PreprocessMode = "exact",
) -> torch.Tensor:  # (3, H, W) float32
    """Image number ``index`` of a request as the backbone's normalised input.

    The limits and errors of :func:`decode_image`; then the crop is resampled from the
    image as decoded, without a whole-image RGB copy or a whole-image resize (``fast``: a
    JPEG decodes at its smallest sufficient DCT scale).
    """
    with _first_frame(data, index, max_bytes, max_pixels, max_aspect_ratio) as img:
        pixels = crop_pixels(img, data_config, mode)  # (H, W, 3) uint8
    return normalise(pixels, data_config)


def input_digest(pixels: torch.Tensor) -> str:
    """Feature-cache key of one backbone input (3, H, W): sha256 of shape + float32 bytes.

    Features are a function of the input tensor and the backbone (whose fingerprint is the
    other part of the key), so keying on the input is exact whatever the encoding, and costs
    a hash of 600 KB at 224 x 224 instead of the full-resolution pixels. The same image sent
    as bytes or as the preprocessed tensor gets the same key.
    """
    h = hashlib.sha256(b"tensor:")
    h.update(repr(tuple(pixels.shape)).encode())
    h.update(pixels.to(torch.float32).contiguous().numpy().data)  # hashed in place, no copy
    return h.hexdigest()

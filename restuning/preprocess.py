"""Image -> normalised tensor, the way timm's eval transform prepares its weights' inputs.

timm resizes the shorter side to floor(H / crop_pct) with the data config's filter (PIL,
which antialiases when shrinking, as torchvision does on PIL images), center-crops H x W,
scales to [0, 1] and normalises. Here the center crop is computed first, in source
coordinates, and only that window is resampled (``Image.resize(..., box=...)``): PIL maps
every output pixel to the same source position and filter window either way, so the pixels
equal the resize-then-crop ones (a rare grey level of float rounding apart) while the work
and memory no longer grow with the resized image: a 100000 x 1 strip would otherwise be
resized to ~6.5 gigapixels before 224 x 224 of it are kept.

Two modes (:data:`PreprocessMode`):

- ``exact``: the full-resolution pixels, resampled with the backbone's filter: timm's pixels.
- ``fast``: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose image still
  covers the resize (``Image.draft``), and large shrinks first average pixel blocks
  (``reducing_gap``): a 12 MP JPEG costs 16 ms of CPU instead of 112; pixels move by a few grey
  levels (bench/ingest.py measures by how much, and what it does to features).

PIL + numpy only; the per-pixel work happens in C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from restuning.presets import DataConfig

PreprocessMode = Literal["exact", "fast"]
"""``exact``: timm's pixels; ``fast``: reduced-scale JPEG decode and block-averaged shrink."""

PREPROCESS_MODES: tuple[PreprocessMode, ...] = ("exact", "fast")

FAST_REDUCING_GAP = 3.0
"""``fast`` mode: shrinks by more than 3x first average integer blocks down to at most 3x
(PIL's ``reducing_gap``; at 3 the result is within ~2 grey levels of the exact filter)."""

_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}
"""Filter radius in output pixels: the source margin a window needs around the crop."""

Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in source pixel coordinates, fractional."""


def resized_size(width: int, height: int, data_config: DataConfig) -> tuple[int, int]:
    """(width, height) after timm's resize step."""
    _, out_h, out_w = data_config.input_size
    if out_h != out_w:
        # timm resizes non-square targets to the scaled target itself, aspect not kept.
        return math.floor(out_w / data_config.crop_pct), math.floor(out_h / data_config.crop_pct)
    short = math.floor(out_h / data_config.crop_pct)
    # torchvision's rule: the long side is truncated, not rounded.
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def crop_box(width: int, height: int, data_config: DataConfig) -> Box:
    """The center crop of the resized image, in the source image's coordinates.

    timm crops at ``round((resized - out) / 2)`` in resized pixels; one resized pixel spans
    ``source / resized`` source pixels per axis. The crop never leaves the resized image:
    ``crop_pct <= 1`` makes the resized image at least the output size on both axes.
    """
    _, out_h, out_w = data_config.input_size
    new_w, new_h = resized_size(width, height, data_config)
    left = round((new_w - out_w) / 2.0)
    top = round((new_h - out_h) / 2.0)
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)


def _window(
    box: Box, width: int, height: int, out: tuple[int, int], support: float
) -> tuple[int, int, int, int]:
    """Integer source window holding ``box`` and every pixel its filter taps, clipped.

    PIL's filter spans ``support`` output pixels, i.e. ``support * scale`` source pixels on a
    shrink and ``support`` on an enlargement; two pixels more absorb rounding.
    """
    mx = math.ceil(support * max((box[2] - box[0]) / out[0], 1.0)) + 2
    my = math.ceil(support * max((box[3] - box[1]) / out[1], 1.0)) + 2
    return (
        max(0, math.floor(box[0]) - mx),
        max(0, math.floor(box[1]) - my),
        min(width, math.ceil(box[2]) + mx),
        min(height, math.ceil(box[3]) + my),
    )


_NO_EXTREMA_MODES = frozenset({"I;16B", "I;16L", "I;16N"})
"""16-bit grey modes PIL decodes (a big-endian TIFF opens as ``I;16B``) but whose extrema it
cannot compute ("image has wrong mode"); numpy reads them."""


def to_rgb(img: Image.Image, window: tuple[int, int, int, int] | None = None) -> Image.Image:
    """RGB pixels of ``window`` (default: all) of a loaded image; 16-bit and float grey
    levels are scaled (by the whole image's range, so a crop keeps them), not clipped."""
    if window is None:
        window = (0, 0, img.width, img.height)
    if img.mode == "RGB":
        # Already RGB: resampling reads the window from the image itself, no copy needed.
        return img if window == (0, 0, img.width, img.height) else img.crop(window)
    if img.mode.startswith("I") or img.mode == "F":
        lo: object
        hi: object
        if img.mode in _NO_EXTREMA_MODES:
            values = np.asarray(img)  # (H, W) uint16: PIL's getextrema refuses these modes
            lo, hi = int(values.min()), int(values.max())
        else:
            lo, hi = img.getextrema()
        assert isinstance(lo, int | float)
        assert isinstance(hi, int | float)
        # convert("RGB") would clip values above 255: a 16-bit scan would come out white.
        grey = np.array(img.crop(window), dtype=np.float32)  # (h, w), writable: the float copy
        if img.mode == "F":
            grey -= np.float32(lo)
            top = max(float(hi) - float(lo), 1e-12)
        else:
            peak = float(hi)
            top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        grey *= np.float32(255.0 / top)
        np.nan_to_num(grey, copy=False, nan=0.0)  # a float TIFF may hold NaN: black, not junk
        np.rint(grey, out=grey)
        np.clip(grey, 0, 255, out=grey)
        return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    return img.crop(window).convert("RGB")


def crop_pixels(
    img: Image.Image, data_config: DataConfig, mode: PreprocessMode = "exact"
) -> np.ndarray:  # (H, W, 3) uint8
    """The backbone's H x W center crop of ``img``, resized, as RGB pixels.

    ``img`` may be freshly opened and not loaded yet: ``fast`` mode then lets a JPEG decode
    at a reduced scale. Memory is the decoded image (at most 4 bytes a pixel in PIL), one
    RGB copy of the crop window plus the filter's margin (none for RGB images in ``fast``
    mode), and the output: nothing scales with the resized size. Animated and multi-page
    files give their current frame.
    """
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; use one of {PREPROCESS_MODES}")
    _, out_h, out_w = data_config.input_size
    width, height = img.size
    box = crop_box(width, height, data_config)
    if mode == "fast":
        # JPEG only (a no-op elsewhere, and once loaded): the largest 1/2^k scale whose
        # image still covers the resized size, so the filter below still shrinks.
        drafted = img.draft("RGB", resized_size(width, height, data_config))
        if drafted is not None and img.size != (width, height):
            scale = drafted[1][2] / width  # the draft's extent of the original image
            box = (box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale)
    img.load()
    if img.mode == "RGB" and mode == "fast":
        rgb = img  # resampled in place, no copy; see below for what exact mode pays for
    else:
        # PIL takes the box in float32: far from the origin its corners move by ~1e-5 pixel,
        # enough to flip a fixed-point weight and a grey level on ~7% of the values. Relative
        # to a window cut just around the box they stay within ~1e-6 (a flip on ~0.01%).
        window = _window(
            box, img.width, img.height, (out_w, out_h), _SUPPORT[data_config.interpolation]
        )
        rgb = to_rgb(img, window)
        box = (box[0] - window[0], box[1] - window[1], box[2] - window[0], box[3] - window[1])
    out = rgb.resize(
        (out_w, out_h),
        _FILTERS[data_config.interpolation],
        box=box,
        reducing_gap=FAST_REDUCING_GAP if mode == "fast" else None,
    )
    return np.array(out, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants


def normalise(pixels: np.ndarray, data_config: DataConfig) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32, (x / 255 - mean) / std.

    In numpy, single-threaded: torch would split a 224 x 224 image over its intra-op threads,
    which decode threads running beside the backbone's forward only oversubscribe (measured:
    3 ms of CPU with one thread, ~25 ms with two on a busy 2-core machine).
    """
    mean = np.asarray(data_config.mean, dtype=np.float32) * np.float32(255.0)
    inv_std = np.float32(1.0) / (np.asarray(data_config.std, dtype=np.float32) * np.float32(255.0))
    out = pixels.astype(np.float32)  # (..., H, W, 3)
    out -= mean
    out *= inv_std
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, -1, -3)))


def preprocess(
    img: Image.Image, data_config: DataConfig, mode: PreprocessMode = "exact"
) -> torch.Tensor:  # (3, H, W)
    """One PIL image as the backbone's normalised float32 input."""
    return normalise(crop_pixels(img, data_config, mode), data_config)


def preprocess_batch(
    images: Sequence[Image.Image], data_config: DataConfig, mode: PreprocessMode = "exact"
) -> torch.Tensor:  # (B, 3, H, W)
    """Several PIL images as one normalised float32 batch."""
    if not images:
        raise ValueError("preprocess_batch needs at least one image")
    pixels = np.stack([crop_pixels(img, data_config, mode) for img in images])  # (B, H, W, 3)
    return normalise(pixels, data_config)

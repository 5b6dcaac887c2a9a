"""Image -> normalised tensor, the way timm's eval transform prepares its weights' inputs.

Resize the shorter side to floor(H / crop_pct) with the data config's filter (PIL, which
antialiases when shrinking, as torchvision does on PIL images), center-crop H x W, scale to
[0, 1], normalise. PIL + numpy only; the per-pixel work happens in C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from restuning.presets import DataConfig

_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _resized_size(width: int, height: int, data_config: DataConfig) -> tuple[int, int]:
    """(width, height) after the resize step."""
    _, out_h, out_w = data_config.input_size
    if out_h != out_w:
        # timm resizes non-square targets to the scaled target itself, aspect not kept.
        return math.floor(out_w / data_config.crop_pct), math.floor(out_h / data_config.crop_pct)
    short = math.floor(out_h / data_config.crop_pct)
    # torchvision's rule: the long side is truncated, not rounded.
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _crop_array(img: Image.Image, data_config: DataConfig) -> np.ndarray:  # (H, W, 3) uint8
    """Resized and center-cropped RGB pixels."""
    rgb = img.convert("RGB")
    size = _resized_size(rgb.width, rgb.height, data_config)
    if size != rgb.size:
        rgb = rgb.resize(size, _FILTERS[data_config.interpolation])
    _, out_h, out_w = data_config.input_size
    left = round((rgb.width - out_w) / 2.0)
    top = round((rgb.height - out_h) / 2.0)
    # PIL pads with black if the crop leaves the image, as torchvision's center_crop does.
    cropped = rgb.crop((left, top, left + out_w, top + out_h))
    return np.array(cropped, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants


def _normalise(pixels: torch.Tensor, data_config: DataConfig) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32, (x / 255 - mean) / std."""
    mean = torch.tensor(data_config.mean, dtype=torch.float32) * 255.0
    inv_std = 1.0 / (torch.tensor(data_config.std, dtype=torch.float32) * 255.0)
    out = (pixels.to(torch.float32) - mean) * inv_std  # (..., H, W, 3)
    return out.movedim(-1, -3).contiguous()


def preprocess(img: Image.Image, data_config: DataConfig) -> torch.Tensor:  # (3, H, W)
    """One PIL image as the backbone's normalised float32 input."""
    return _normalise(torch.from_numpy(_crop_array(img, data_config)), data_config)


def preprocess_batch(
    images: Sequence[Image.Image], data_config: DataConfig
) -> torch.Tensor:  # (B, 3, H, W)
    """Several PIL images as one normalised float32 batch."""
    if not images:
        raise ValueError("preprocess_batch needs at least one image")
    pixels = np.stack([_crop_array(img, data_config) for img in images])  # (B, H, W, 3)
    return _normalise(torch.from_numpy(pixels), data_config)

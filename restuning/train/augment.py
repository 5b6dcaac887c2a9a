"""Augmented training features, recomputed every epoch (``restune train --augment``).

The cache holds features of the unaugmented image; augmentation changes the pixels, so with it
the training images go through the backbone once per epoch (the validation images still come
from the cache), batch by batch as the loop asks for them: nothing of an epoch's features is
kept beyond its batch. Each image gets a random resized crop (area and aspect ratio drawn as
in Inception-style training) and a horizontal flip with probability 1/2, then the backbone's
own preprocessing resizes it to the input size. Draws are seeded per (seed, epoch, image), so
they do not depend on which batch an image lands in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from restuning.features import FeatureSpec
from restuning.preprocess import preprocess
from restuning.train.data import ImageRef
from restuning.train.feature_cache import DEFAULT_BATCH_SIZE, FeatureBackbone

CROP_ATTEMPTS = 10
"""Draws of (area, ratio) before falling back to the largest centred crop."""


@dataclass(frozen=True)
class AugmentOptions:
    """Random resized crop + flip parameters."""

    scale: tuple[float, float] = (0.35, 1.0)
    """Range of the crop's area as a share of the image's."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's width / height (drawn log-uniformly)."""
    flip: bool = True
    """Mirror left-right with probability 1/2."""

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")


def crop_box(
    width: int, height: int, options: AugmentOptions, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop of a ``width`` x ``height`` image."""
    area = width * height
    log_lo, log_hi = math.log(options.ratio[0]), math.log(options.ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(options.scale[0], options.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # No draw fitted (extreme aspect): the whole image, clipped to the ratio range.
    aspect = min(max(width / height, options.ratio[0]), options.ratio[1])
    w = min(width, round(height * aspect))
    h = min(height, round(w / aspect))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def augment_image(
    img: Image.Image, options: AugmentOptions, rng: np.random.Generator
) -> Image.Image:
    """One random resized crop (+ flip) of ``img``, before the backbone's preprocessing."""
    out = img.crop(crop_box(img.width, img.height, options, rng))
    if options.flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


class AugmentedRows:
    """The loop's ``FeatureRows`` over freshly augmented training images: ``read(index,
    epoch)`` augments and runs the backbone on those images only."""

    def __init__(
        self,
        backbone: FeatureBackbone,
        images: Sequence[ImageRef],
        spec: FeatureSpec,
        *,
        seed: int,
        options: AugmentOptions | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        row_shape: tuple[int, int, int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.backbone = backbone
        self.images = list(images)
        self.spec = spec
        self._row_shape = row_shape
        """(L', N', D) when the caller knows it (the cached validation rows have it)."""
        self.seed = seed
        self.options = options or AugmentOptions()
        self.batch_size = batch_size
        # Preprocessing resizes the crop's shorter side straight to the input size (no centre
        # crop margin): the random crop already chose what the backbone sees.
        self._data_config = dataclasses.replace(backbone.data_config, crop_pct=1.0)
        self.forwards = 0

    def __len__(self) -> int:
        return len(self.images)

    @property
    def row_shape(self) -> tuple[int, int, int]:
        """(L', N', D), from the first batch read (or one image's forward before any)."""
        if self._row_shape is None:
            self.read(torch.zeros(1, dtype=torch.long))
        assert self._row_shape is not None
        return self._row_shape

    def read(self, index: Tensor, epoch: int = 0) -> Tensor:  # (L', b, N', D) float32
        """Augmented features of the images at ``index``, in backbone batches of at most
        ``batch_size``."""
        positions = [int(i) for i in index]
        parts: list[Tensor] = []
        for start in range(0, len(positions), self.batch_size):
            chunk = positions[start : start + self.batch_size]
            pixels = torch.stack(
                [
                    preprocess(
                        augment_image(
                            self.images[i].open(),
                            self.options,
                            np.random.default_rng([self.seed, epoch, i]),
                        ),
                        self._data_config,
                    )
                    for i in chunk
                ]
            )  # (b, 3, H, W)
            feats = self.backbone.forward_features(pixels, self.spec)
            parts.append(feats.data.to(device="cpu", dtype=torch.float32))  # (L', b, N', D)
            self.forwards += 1
        self._row_shape = (parts[0].shape[0], parts[0].shape[2], parts[0].shape[3])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

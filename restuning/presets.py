"""Named backbones: architecture plus the data config that travels with their weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from restuning.vit import ViTConfig

Interpolation = Literal["bicubic", "bilinear"]

# timm's constants: ImageNet statistics, and the "inception" 0.5/0.5 used by AugReg weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for a backbone (timm's ``pretrained_cfg`` data part)."""

    input_size: tuple[int, int, int]
    """(C, H, W) of the tensor the backbone is served with."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: tuple[float, float, float]
    """Per-channel standard deviation divided by after the mean."""
    interpolation: Interpolation = "bicubic"
    """Resampling filter of the resize."""
    crop_pct: float = 0.875
    """Center-crop fraction: resize the shorter side to H / crop_pct, then crop H x W."""

    def __post_init__(self) -> None:
        channels, height, width = self.input_size
        if channels != 3 or height <= 0 or width <= 0:
            raise ValueError(f"input_size must be (3, H, W) with H, W > 0, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per channel")
        if min(self.std) <= 0:
            raise ValueError("std must be positive")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {self.crop_pct}")


@dataclass(frozen=True)
class Preset:
    """A backbone name's architecture and data config."""

    vit: ViTConfig
    """Architecture (must match the checkpoint's tensors)."""
    data: DataConfig
    """Preprocessing the weights expect."""


class UnknownPresetError(ValueError):
    """A backbone name that is not in ``PRESETS``."""


def _augreg(embed_dim: int, num_heads: int) -> Preset:
    # timm's AugReg ViTs (ImageNet-21k pretraining): 224 px, patch 16, 0.5/0.5 normalisation.
    return Preset(
        ViTConfig(img_size=224, patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads),
        DataConfig((3, 224, 224), mean=HALF, std=HALF, interpolation="bicubic", crop_pct=0.9),
    )


def _dinov2(embed_dim: int, num_heads: int) -> Preset:
    # timm's vit_*_patch14_dinov2: native 518 px (37 x 37 grid, CLS inside pos_embed), layer
    # scale 1e-5. Served at 224 (16 x 16 grid): pos_embed is resampled once per grid size.
    return Preset(
        ViTConfig(
            img_size=518,
            patch_size=14,
            embed_dim=embed_dim,
            depth=12,
            num_heads=num_heads,
            init_values=1e-5,
        ),
        DataConfig(
            (3, 224, 224),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bicubic",
            crop_pct=0.875,
        ),
    )


PRESETS: dict[str, Preset] = {
    "vit_tiny_patch16_224": _augreg(192, 3),
    "vit_small_patch16_224": _augreg(384, 6),
    "vit_base_patch16_224": _augreg(768, 12),
    "vit_small_patch14_dinov2": _dinov2(384, 6),
    "vit_base_patch14_dinov2": _dinov2(768, 12),
    # For tests: milliseconds per forward on a CPU.
    "vit_test_tiny": Preset(
        ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
        DataConfig((3, 32, 32), mean=HALF, std=HALF, interpolation="bicubic", crop_pct=0.875),
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; UnknownPresetError names the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise UnknownPresetError(f"unknown backbone {name!r}; known: {known}") from None

"""restuning: the model library behind restune.

A frozen ViT backbone (timm parameter names) runs once per batch and hands its detached
intermediate features to many small Res-Tuning bypass tuners. This package holds the backbone,
its presets and preprocessing, the tuners and everything else that computes on tensors; it has
no HTTP and no storage beyond files.

The names below are imported on first use, so importing a light submodule (``restuning.cli``
for ``restune --help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from restuning.backbone import BackboneLoadError, TorchBackbone, load_backbone
    from restuning.features import Features, FeatureSpec
    from restuning.preprocess import preprocess, preprocess_batch
    from restuning.presets import PRESETS, DataConfig, Preset, UnknownPresetError, get_preset
    from restuning.vit import VisionTransformer, ViTConfig

_EXPORTS: dict[str, str] = {
    "BackboneLoadError": "restuning.backbone",
    "TorchBackbone": "restuning.backbone",
    "load_backbone": "restuning.backbone",
    "Features": "restuning.features",
    "FeatureSpec": "restuning.features",
    "preprocess": "restuning.preprocess",
    "preprocess_batch": "restuning.preprocess",
    "PRESETS": "restuning.presets",
    "DataConfig": "restuning.presets",
    "Preset": "restuning.presets",
    "UnknownPresetError": "restuning.presets",
    "get_preset": "restuning.presets",
    "VisionTransformer": "restuning.vit",
    "ViTConfig": "restuning.vit",
}

__all__ = [
    "PRESETS",
    "BackboneLoadError",
    "DataConfig",
    "FeatureSpec",
    "Features",
    "Preset",
    "TorchBackbone",
    "UnknownPresetError",
    "ViTConfig",
    "VisionTransformer",
    "get_preset",
    "load_backbone",
    "preprocess",
    "preprocess_batch",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'restuning' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

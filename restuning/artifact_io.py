"""Task modules to and from artifact bytes (safetensors; never a pickle).

The header is validated by ``tuners_store`` before any tensor is read, so the bytes that
reach ``safetensors.torch.load`` already have the right names, shapes, dtypes and finite
values.
"""

from __future__ import annotations

import torch
from safetensors.torch import load, save
from torch import nn

from restuning.tuners.task import TaskModule, build_task
from tuners_store.artifact import DEFAULT_MAX_ARTIFACT_BYTES, artifact_metadata, validate_artifact


def save_task(module: TaskModule) -> bytes:
    """The module's tensors and config as artifact bytes (tensors in the module's dtype)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    return bytes(save(tensors, metadata=artifact_metadata(module.config)))


def load_task(
    data: bytes,
    final_norm: nn.LayerNorm,
    *,
    expect_fingerprint: str | None = None,
    dtype: torch.dtype = torch.float32,
    max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
) -> TaskModule:
    """Validate ``data`` (header, shapes, dtypes, finiteness, backbone) and build its module.

    Raises ``tuners_store.artifact.ArtifactError`` for an invalid artifact. The module is
    cast to ``dtype`` and lives on ``final_norm``'s device.
    """
    header = validate_artifact(data, expect_fingerprint=expect_fingerprint, max_bytes=max_bytes)
    tensors = {name: t.to(dtype) for name, t in load(data).items()}
    return build_task(header.config, tensors, final_norm)

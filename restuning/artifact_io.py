"""Task modules to and from artifact bytes (safetensors; never a pickle).

The header is validated by ``tuners_store`` before any tensor is read, so the bytes that
reach ``safetensors.torch.load`` already have the right names, shapes, dtypes and finite
values.
"""

from __future__ import annotations

import torch
from safetensors.torch import load
from torch import nn

from restuning.tuners.task import TaskModule, build_task
from tuners_store.artifact import (
    DEFAULT_MAX_ARTIFACT_BYTES,
    ArtifactHeader,
    RawTensor,
    pack_raw,
    validate_artifact,
)

# torch dtype -> (safetensors dtype name, same-width integer view for the raw bytes)
_RAW_DTYPES: dict[torch.dtype, tuple[str, torch.dtype]] = {
    torch.float32: ("F32", torch.int32),
    torch.float16: ("F16", torch.int16),
    torch.bfloat16: ("BF16", torch.int16),
}


def save_task(module: TaskModule) -> bytes:
    """The module's tensors and config as artifact bytes (tensors in the module's dtype).

    Written by ``tuners_store``'s deterministic packer, so saving the same module twice gives
    the same bytes and the same sha256 (versions are content-addressed).
    """
    raw: dict[str, RawTensor] = {}
    for name, t in module.state_dict().items():
        dtype_name, int_view = _RAW_DTYPES[t.dtype]
        flat = t.detach().cpu().contiguous().view(int_view).numpy()  # little-endian on x86/arm
        raw[name] = RawTensor(dtype_name, tuple(t.shape), flat.tobytes())
    return pack_raw(module.config, raw)


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
    return build_validated(header, data, final_norm, dtype=dtype)


def build_validated(
    header: ArtifactHeader,
    data: bytes,
    final_norm: nn.LayerNorm,
    *,
    dtype: torch.dtype = torch.float32,
) -> TaskModule:
    """The module of ``data``, whose ``header`` came from ``validate_artifact`` (not re-checked).

    For callers that validated the bytes already and kept the header (the server's admission):
    validating twice costs as much as the first time, on every registration.
    """
    tensors = {name: t.to(dtype) for name, t in load(data).items()}
    # Freshly read and owned here: they become the parameters (no second copy).
    return build_task(header.config, tensors, final_norm, assign=True)

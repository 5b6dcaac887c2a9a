"""Torch-free artifact factories for the store tests: valid artifacts and hand-made broken ones."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from tuners_store import artifact
from tuners_store.artifact import pack_artifact, random_arrays
from tuners_store.config import TunerConfig

FINGERPRINT = "fp-test-0001"
ARCH = "vit_test_tiny"


def tiny_config(name: str = "cats", **overrides: Any) -> TunerConfig:
    """A tiny classification tuner (D=8, depth 2, r=4); ``bypass``/``backbone`` keys merge."""
    doc: dict[str, Any] = {
        "name": name,
        "task": "classification",
        "labels": ["cat", "dog", "fox"],
        "backbone": {"arch": ARCH, "fingerprint": FINGERPRINT, "dim": 8, "depth": 2},
        "bypass": {"layers": [1, 2], "bottleneck": 4},
        # Fixed, so that equal seeds give equal bytes in every process.
        "created_at": "2026-01-01T00:00:00+00:00",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return TunerConfig.model_validate(doc)


def make_artifact(
    config: TunerConfig | None = None, *, seed: int = 0, dtype: type[np.floating[Any]] = np.float32
) -> bytes:
    """A valid artifact with seeded random values."""
    config = config or tiny_config()
    return pack_artifact(config, random_arrays(config, seed=seed, dtype=dtype))


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """An artifact's header dict and its data buffer."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict[str, Any], payload: bytes) -> bytes:
    """Serialise a header dict and a data buffer the way safetensors does (space-padded)."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def bf16_bits(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Round-toward-zero bfloat16 bit patterns of a float32 array (uint16)."""
    return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def pack_raw(config: TunerConfig, arrays: dict[str, np.ndarray[Any, Any]], dtype: str) -> bytes:
    """Write an artifact whose tensors all claim ``dtype``, from raw values (uint16 for BF16)."""
    return artifact.pack_raw(
        config,
        {
            n: artifact.RawTensor(dtype, a.shape, a.astype(a.dtype.newbyteorder("<")).tobytes())
            for n, a in arrays.items()
        },
    )


def bf16_artifact(
    config: TunerConfig | None = None, *, seed: int = 0
) -> tuple[bytes, dict[str, np.ndarray[Any, Any]]]:
    """A valid BF16 artifact (numpy has no bfloat16, so it is written by hand) and its bits."""
    config = config or tiny_config()
    bits = {k: bf16_bits(v) for k, v in random_arrays(config, seed=seed).items()}
    return pack_raw(config, bits, "BF16"), bits

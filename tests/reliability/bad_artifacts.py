"""Hostile and broken tuner uploads for the bad-input corpus.

Valid artifacts come from the store's own writer (:func:`tuners_store.artifact.pack_artifact`)
for the live server's backbone; each broken one changes exactly one thing. The pickles carry a
payload whose unpickling would create a directory, so a test can prove nothing unpickled them.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.fixtures.tuners import BackboneLike, FakeBackboneRef, make_config
from tests.tuners_store.artifact_factory import join, split
from tuners_store.artifact import pack_artifact, random_arrays
from tuners_store.config import TunerConfig


class MkdirOnUnpickle:
    """Unpickling this calls ``os.mkdir(path)``: the classic pickle code-execution payload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def evil_pickle(sentinel: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    """A pickled dict holding the mkdir payload (what ``torch.save`` users might upload)."""
    return pickle.dumps({"head.weight": MkdirOnUnpickle(sentinel)}, protocol=protocol)


def evil_torch_save(sentinel: Path) -> bytes:
    """``torch.save`` of the payload: a zip archive wrapping the same pickle."""
    buffer = io.BytesIO()
    torch.save({"state_dict": MkdirOnUnpickle(sentinel)}, buffer)
    return buffer.getvalue()


def config_for(name: str, backbone: BackboneLike, **overrides: Any) -> TunerConfig:
    """A classification tuner on ``backbone`` (every block, bottleneck 4)."""
    return make_config(name, backbone, **overrides)


def valid(name: str, backbone: BackboneLike, seed: int = 0) -> bytes:
    """A valid artifact for ``backbone``."""
    config = config_for(name, backbone)
    return pack_artifact(config, random_arrays(config, seed=seed))


def _arrays(
    name: str, backbone: BackboneLike
) -> tuple[TunerConfig, dict[str, np.ndarray[Any, Any]]]:
    config = config_for(name, backbone)
    return config, random_arrays(config, seed=1)


def wrong_shape(name: str, backbone: BackboneLike) -> bytes:
    """``head.weight`` one row short."""
    config, arrays = _arrays(name, backbone)
    arrays["head.weight"] = arrays["head.weight"][:-1]
    return pack_artifact(config, arrays)


def missing_tensor(name: str, backbone: BackboneLike) -> bytes:
    config, arrays = _arrays(name, backbone)
    del arrays["head.bias"]
    return pack_artifact(config, arrays)


def unexpected_tensor(name: str, backbone: BackboneLike) -> bytes:
    config, arrays = _arrays(name, backbone)
    arrays["extra.payload"] = np.zeros(4, np.float32)
    return pack_artifact(config, arrays)


def non_finite(name: str, backbone: BackboneLike, value: float) -> bytes:
    """One weight set to ``value`` (NaN or +-Inf)."""
    config, arrays = _arrays(name, backbone)
    arrays["head.weight"][1, 2] = value
    return pack_artifact(config, arrays)


def foreign_fingerprint(name: str, backbone: BackboneLike) -> bytes:
    """Same architecture and shapes, trained on other weights (another fingerprint)."""
    other = FakeBackboneRef(
        dim=backbone.dim, depth=backbone.depth, arch=backbone.arch, fingerprint="0" * 16
    )
    config = make_config(name, other)
    return pack_artifact(config, random_arrays(config, seed=2))


def int_dtype(name: str, backbone: BackboneLike) -> bytes:
    """``head.bias`` declared as I32 (same byte size, so only the dtype is wrong)."""
    header, payload = split(valid(name, backbone))
    header["head.bias"]["dtype"] = "I32"
    return join(header, payload)


def overlapping_offsets(name: str, backbone: BackboneLike) -> bytes:
    """Two tensors pointing at the same bytes."""
    header, payload = split(valid(name, backbone))
    header["head.bias"]["data_offsets"] = header["bypass.lateral.1.b1"]["data_offsets"][:]
    begin, _ = header["head.bias"]["data_offsets"]
    header["head.bias"]["data_offsets"] = [begin, begin + 4 * header["head.bias"]["shape"][0]]
    return join(header, payload)


def bad_config(name: str, backbone: BackboneLike) -> bytes:
    """A restune config with a negative bottleneck."""
    header, payload = split(valid(name, backbone))
    meta = header["__metadata__"]
    meta["restune.config"] = meta["restune.config"].replace('"bottleneck":4', '"bottleneck":-4')
    assert '"bottleneck":-4' in meta["restune.config"]
    return join(header, payload)


def no_restune_metadata(name: str, backbone: BackboneLike) -> bytes:
    """A plain safetensors file: tensors, no restune header."""
    header, payload = split(valid(name, backbone))
    del header["__metadata__"]
    return join(header, payload)


def header_length(declared: int, rest: bytes = b'{"__metadata__": {}}') -> bytes:
    """A safetensors length prefix declaring ``declared`` header bytes, then ``rest``."""
    return struct.pack("<Q", declared) + rest


def header_of(raw: bytes) -> bytes:
    """A file that is just a length prefix and ``raw`` as its header."""
    return struct.pack("<Q", len(raw)) + raw


def header_not_json() -> bytes:
    return header_of(b"{this is not json}")


def sized(backbone: BackboneLike, name: str, total: int) -> bytes:
    """A valid artifact padded past ``total`` bytes (trailing bytes; the size check comes first)."""
    data = valid(name, backbone)
    return data + b"\x00" * max(0, total - len(data))

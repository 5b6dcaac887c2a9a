"""Hostile and broken tuner uploads for the bad-input corpus.

Valid artifacts come from the store's own writer (:func:`tuners_store.artifact.pack_artifact`)
for the live server's backbone; each broken one changes exactly one thing. The pickles carry a
payload whose unpickling would create a directory, so a test can prove nothing unpickled them.
"""

from __future__ import annotations

import io
import json
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


# -- artifacts that are well-formed but lie about the backbone, or carry bad numbers ---------


def lying_depth(name: str, backbone: BackboneLike, depth: int = 20) -> bytes:
    """The server's fingerprint (as ``/readyz`` shows it) with a config claiming ``depth``
    blocks and a bypass over all of them: self-consistent tensors, wrong backbone."""
    liar = FakeBackboneRef(
        dim=backbone.dim, depth=depth, arch=backbone.arch, fingerprint=backbone.fingerprint
    )
    config = make_config(name, liar)
    return pack_artifact(config, random_arrays(config, seed=3))


def lying_dim(name: str, backbone: BackboneLike, dim: int = 8) -> bytes:
    """The server's fingerprint with a config (and tensors) of width ``dim``."""
    liar = FakeBackboneRef(
        dim=dim, depth=backbone.depth, arch=backbone.arch, fingerprint=backbone.fingerprint
    )
    config = make_config(name, liar)
    return pack_artifact(config, random_arrays(config, seed=4))


def config_value(name: str, backbone: BackboneLike, path: tuple[str, ...], raw: str) -> bytes:
    """A valid artifact whose ``restune.config`` has the JSON text ``raw`` at ``path`` (e.g.
    ``("bypass", "scale")`` and ``"NaN"``): written by hand, since the config model refuses it."""
    header, payload = split(valid(name, backbone))
    meta = header["__metadata__"]
    doc = json.loads(meta["restune.config"])
    marker = "__raw_value__"
    node = doc
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = marker
    meta["restune.config"] = json.dumps(doc).replace(f'"{marker}"', raw)
    return join(header, payload)


def overflowing(name: str, backbone: BackboneLike) -> bytes:
    """Every value finite and under the value bound, scale at its bound: the bypass's
    activations still overflow float32 on the first input (only a dry run shows it)."""
    config = make_config(name, backbone, scale=1000.0)
    arrays = {k: np.full_like(v, 1e6) for k, v in random_arrays(config, seed=1).items()}
    return pack_artifact(config, arrays)


def raw_header_edit(name: str, backbone: BackboneLike, old: str, new: str) -> bytes:
    """A valid artifact whose header text has ``old`` replaced by ``new`` once (for what a JSON
    writer would not produce: 5000-digit integers, ``NaN``, lone surrogate escapes)."""
    header, payload = split(valid(name, backbone))
    text = json.dumps(header)
    assert old in text, old
    raw = text.replace(old, new, 1).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def huge_shape_list(name: str, backbone: BackboneLike, dims: int = 40_000) -> bytes:
    """``head.bias`` with a shape of ``dims`` dimensions of 10**18 each (~780 KB of header)."""
    header, payload = split(valid(name, backbone))
    header["head.bias"]["shape"] = [10**18] * dims
    return join(header, payload)


def many_tensors(name: str, backbone: BackboneLike, count: int = 5000) -> bytes:
    """``count`` extra zero-size tensors (each entry is valid on its own)."""
    header, payload = split(valid(name, backbone))
    end = len(payload)
    for i in range(count):
        header[f"extra.{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    return join(header, payload)


def deep_header(depth: int = 100_000) -> bytes:
    """A header object whose one value is ``depth`` nested arrays."""
    return header_of(b'{"__metadata__": ' + b"[" * depth + b"]" * depth + b"}")

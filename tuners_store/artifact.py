"""The tuner artifact: a safetensors file whose header carries a :class:`TunerConfig`.

Validation reads the header by hand (bounded, never unpickling anything), checks every
tensor's name, shape, dtype and byte range against :func:`tensor_specs`, and scans the raw
bytes for NaN/Inf with numpy. No torch: the stores and the upload route run this.

Layout (safetensors): 8-byte little-endian header length ``n``; ``n`` bytes of JSON
``{"__metadata__": {...}, "<tensor>": {"dtype", "shape", "data_offsets": [begin, end]}}``;
then the data buffer, to which ``data_offsets`` are relative.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from tuners_store.config import FORMAT_VERSION, TunerConfig, tensor_specs
from tuners_store.errors import StoreError

FORMAT_KEY = "restune.format"
CONFIG_KEY = "restune.config"

DEFAULT_MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
"""Largest artifact accepted unless the caller says otherwise (a ViT-B bypass is ~5 MB)."""
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest JSON header: 10k labels of 200 characters, escaped twice, fit with room to spare."""

ITEMSIZE: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
"""Allowed dtypes and their widths in bytes."""

# Exponent masks: a float is NaN or Inf exactly when all its exponent bits are set. Reading
# the raw bits handles BF16, which numpy has no type for, the same way as F16 and F32.
_EXPONENT_MASK: dict[str, tuple[type[np.unsignedinteger[Any]], int]] = {
    "F32": (np.uint32, 0x7F80_0000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
}

_PICKLE_PROTO = 0x80
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_ERRORS_SHOWN = 5


class ArtifactError(StoreError):
    """An upload that is not a valid restune artifact; ``code`` names the first problem found.

    Codes: ``artifact_too_large``, ``artifact_bad_format``, ``artifact_header_too_large``,
    ``artifact_bad_header``, ``artifact_bad_config``, ``artifact_missing_tensor``,
    ``artifact_unexpected_tensor``, ``artifact_bad_shape``, ``artifact_bad_dtype``,
    ``artifact_bad_offsets``, ``artifact_non_finite``, ``backbone_mismatch``.
    """


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the header; ``begin``/``end`` are offsets into the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of scalars."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class RawTensor:
    """A tensor to write: safetensors dtype name, shape, little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class ArtifactHeader:
    """What the header says, plus the digest and size of the whole file."""

    config: TunerConfig
    tensors: dict[str, TensorInfo]
    sha256: str
    size: int
    data_start: int
    """Absolute offset of the data buffer: 8 + header length."""

    @property
    def dtype(self) -> str | None:
        """The tensors' common dtype (``None`` for an artifact without tensors)."""
        return next(iter(self.tensors.values())).dtype if self.tensors else None

    def tensor_bytes(self, data: bytes, name: str) -> memoryview:
        """The raw little-endian bytes of tensor ``name`` inside ``data`` (no copy)."""
        info = self.tensors[name]
        return memoryview(data)[self.data_start + info.begin : self.data_start + info.end]


def _fail(code: str, message: str) -> ArtifactError:
    return ArtifactError(code, message)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two entries with one key would make readers disagree on which tensor is meant.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _fail("artifact_bad_header", f"header has the key {key!r} twice")
        out[key] = value
    return out


def _sniff_format(data: bytes) -> None:
    """Refuse files that are clearly something else, saying what they look like."""
    if len(data) >= 2 and data[0] == _PICKLE_PROTO and 2 <= data[1] <= 5:
        raise _fail(
            "artifact_bad_format",
            "this is a Python pickle (e.g. torch.save of a state dict); pickles are never "
            "loaded. Save the tuner as safetensors (restune train / save_task).",
        )
    if data.startswith(_ZIP_MAGIC):
        raise _fail(
            "artifact_bad_format",
            "this is a zip archive (torch.save's default format wraps a pickle); pickles are "
            "never loaded. Save the tuner as safetensors (restune train / save_task).",
        )
    if len(data) < 9:
        raise _fail("artifact_bad_format", f"not a safetensors file: only {len(data)} bytes long")
    if data[8:9] != b"{":
        raise _fail(
            "artifact_bad_format",
            "not a safetensors file: expected an 8-byte header length followed by a JSON "
            f"header starting with '{{', got byte {data[8:9]!r} at offset 8",
        )


def _summarise(err: ValidationError) -> str:
    parts = []
    for item in err.errors()[:_MAX_ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in item["loc"]) or "(config)"
        parts.append(f"{loc}: {item['msg']}")
    more = err.error_count() - _MAX_ERRORS_SHOWN
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def _parse_config(metadata: object) -> TunerConfig:
    if not isinstance(metadata, dict):
        raise _fail(
            "artifact_bad_header",
            "header has no __metadata__ object; this is a safetensors file but not a restune "
            "artifact",
        )
    if not all(isinstance(v, str) for v in metadata.values()):
        raise _fail("artifact_bad_header", "__metadata__ values must all be strings")
    fmt = metadata.get(FORMAT_KEY)
    if fmt is None:
        raise _fail(
            "artifact_bad_header",
            f"__metadata__ has no {FORMAT_KEY!r}; this is a safetensors file but not a restune "
            "artifact",
        )
    if fmt != FORMAT_VERSION:
        raise _fail(
            "artifact_bad_header",
            f"artifact format {fmt!r} is not supported (this version reads {FORMAT_VERSION!r})",
        )
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        raise _fail("artifact_bad_header", f"__metadata__ has no {CONFIG_KEY!r}")
    try:
        return TunerConfig.model_validate_json(raw)
    except ValidationError as exc:
        raise _fail("artifact_bad_config", f"invalid {CONFIG_KEY}: {_summarise(exc)}") from None


def _parse_tensor(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(
            "artifact_bad_header",
            f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets",
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise _fail("artifact_bad_header", f"tensor {name!r}: dtype must be a string")
    if dtype not in ITEMSIZE:
        raise _fail(
            "artifact_bad_dtype",
            f"tensor {name!r} has dtype {dtype}; allowed: {', '.join(ITEMSIZE)}",
        )
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise _fail(
            "artifact_bad_header", f"tensor {name!r}: shape must be a list of integers >= 0"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise _fail(
            "artifact_bad_offsets",
            f"tensor {name!r}: data_offsets must be two integers >= 0, got {offsets!r}",
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _check_offsets(tensors: Mapping[str, TensorInfo], buffer_len: int) -> None:
    """Tensors must tile the data buffer exactly: no overlap, no gap, nothing after."""
    for name, info in tensors.items():
        expected = info.numel * ITEMSIZE[info.dtype]
        if info.end < info.begin or info.end - info.begin != expected:
            raise _fail(
                "artifact_bad_offsets",
                f"tensor {name!r} ({info.dtype}, shape {list(info.shape)}) needs {expected} "
                f"bytes but data_offsets [{info.begin}, {info.end}] span {info.end - info.begin}",
            )
        if info.end > buffer_len:
            raise _fail(
                "artifact_bad_offsets",
                f"tensor {name!r} ends at byte {info.end} of a {buffer_len}-byte data buffer",
            )
    cursor = 0
    previous = None
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin < cursor:
            raise _fail(
                "artifact_bad_offsets",
                f"tensor {name!r} [{info.begin}, {info.end}] overlaps {previous!r} "
                f"(which ends at {cursor})",
            )
        if info.begin > cursor:
            raise _fail(
                "artifact_bad_offsets",
                f"gap of {info.begin - cursor} bytes before tensor {name!r} (at {cursor})",
            )
        cursor, previous = info.end, name
    if cursor != buffer_len:
        raise _fail(
            "artifact_bad_offsets",
            f"{buffer_len - cursor} trailing bytes after the last tensor (data buffer is "
            f"{buffer_len} bytes, tensors cover {cursor})",
        )


def read_header(data: bytes, *, max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> ArtifactHeader:
    """Parse and sanity-check an artifact's header; the tensor bytes are not inspected.

    Checks the size limit, the safetensors framing, the restune metadata and config, each
    tensor's dtype, and that the tensors tile the data buffer exactly. Raises
    :class:`ArtifactError`.
    """
    if len(data) > max_bytes:
        raise _fail(
            "artifact_too_large", f"artifact is {len(data)} bytes; the limit is {max_bytes}"
        )
    _sniff_format(data)
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise _fail(
            "artifact_header_too_large",
            f"header declares {header_len} bytes; the limit is {MAX_HEADER_BYTES}",
        )
    if 8 + header_len > len(data):
        raise _fail(
            "artifact_bad_format",
            f"header declares {header_len} bytes but the file has only {len(data) - 8} after "
            "the length prefix (truncated upload?)",
        )
    try:
        header = json.loads(
            data[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=_no_duplicates
        )
    # RecursionError: a header of "[[[[..." nests deeper than the parser recurses.
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail("artifact_bad_header", f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _fail("artifact_bad_header", "header must be a JSON object")
    config = _parse_config(header.pop("__metadata__", None))
    tensors = {name: _parse_tensor(name, entry) for name, entry in header.items()}
    data_start = 8 + header_len
    _check_offsets(tensors, len(data) - data_start)
    return ArtifactHeader(
        config=config,
        tensors=tensors,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        data_start=data_start,
    )


def _check_backbone(config: TunerConfig, expect_fingerprint: str, expect_arch: str | None) -> None:
    ref = config.backbone
    if ref.fingerprint == expect_fingerprint:
        return
    server = f"{expect_arch} " if expect_arch else ""
    raise _fail(
        "backbone_mismatch",
        f"tuner {config.name!r} was trained on backbone {ref.arch} (fingerprint "
        f"{ref.fingerprint}) but this server runs {server}(fingerprint {expect_fingerprint}); "
        "retrain it on this backbone or serve it with the matching weights",
    )


def _check_tensors(header: ArtifactHeader) -> None:
    specs = tensor_specs(header.config)
    tensors = header.tensors
    missing = [n for n in specs if n not in tensors]
    if missing:
        shown = ", ".join(missing[:_MAX_ERRORS_SHOWN])
        extra = len(missing) - _MAX_ERRORS_SHOWN
        more = f" and {extra} more" if extra > 0 else ""
        raise _fail(
            "artifact_missing_tensor",
            f"{len(missing)} tensor(s) required by the config are missing: {shown}{more}",
        )
    unexpected = [n for n in tensors if n not in specs]
    if unexpected:
        shown = ", ".join(unexpected[:_MAX_ERRORS_SHOWN])
        raise _fail(
            "artifact_unexpected_tensor",
            f"{len(unexpected)} tensor(s) not described by the config: {shown}",
        )
    for name, spec in specs.items():
        got = tensors[name].shape
        if got != spec.shape:
            raise _fail(
                "artifact_bad_shape",
                f"tensor {name!r} has shape {list(got)}; the config implies {list(spec.shape)}",
            )
    dtypes = sorted({info.dtype for info in tensors.values()})
    if len(dtypes) > 1:
        raise _fail(
            "artifact_bad_dtype", f"all tensors must share one dtype; found {', '.join(dtypes)}"
        )


def _check_finite(header: ArtifactHeader, data: bytes) -> None:
    for name, info in header.tensors.items():
        uint, mask = _EXPONENT_MASK[info.dtype]
        bits = np.frombuffer(
            header.tensor_bytes(data, name), dtype=np.dtype(uint).newbyteorder("<")
        )
        bad = np.flatnonzero((bits & mask) == mask)
        if bad.size:
            raise _fail(
                "artifact_non_finite",
                f"tensor {name!r} has {bad.size} NaN/Inf value(s) (first at flat index "
                f"{int(bad[0])})",
            )


def validate_artifact(
    data: bytes,
    *,
    expect_fingerprint: str | None = None,
    expect_arch: str | None = None,
    max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
) -> ArtifactHeader:
    """Fully validate an upload without loading it: header, backbone, tensors, finiteness.

    ``expect_fingerprint`` (the server's backbone fingerprint) refuses tuners trained on another
    backbone; ``expect_arch`` only improves that message. Raises :class:`ArtifactError`.
    """
    header = read_header(data, max_bytes=max_bytes)
    if expect_fingerprint is not None:
        _check_backbone(header.config, expect_fingerprint, expect_arch)
    _check_tensors(header)
    _check_finite(header, data)
    return header


def artifact_metadata(config: TunerConfig) -> dict[str, str]:
    """The safetensors ``__metadata__`` a writer must store for ``config``."""
    return {FORMAT_KEY: FORMAT_VERSION, CONFIG_KEY: config.model_dump_json()}


def pack_raw(config: TunerConfig, tensors: Mapping[str, RawTensor]) -> bytes:
    """Serialise raw tensors and ``config`` into artifact bytes, deterministically; no validation.

    Tensors are laid out in name order and the header is written with sorted keys, so equal
    inputs give equal bytes (and so equal sha256: content addressing depends on it). The
    safetensors library writes ``__metadata__`` in hash-map order, which is why this does not
    use it.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(artifact_metadata(config).items()))}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        header[name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(t.data)],
        }
        chunks.append(t.data)
        offset += len(t.data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned, as safetensors does
    return b"".join([struct.pack("<Q", len(raw)), raw, *chunks])


_NUMPY_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def pack_artifact(config: TunerConfig, arrays: Mapping[str, np.ndarray[Any, Any]]) -> bytes:
    """Serialise numpy arrays (float32 or float16) and ``config`` into artifact bytes."""
    tensors: dict[str, RawTensor] = {}
    for name, a in arrays.items():
        dtype = _NUMPY_DTYPES.get(a.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} is not float32 or float16")
        raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        tensors[name] = RawTensor(dtype, tuple(a.shape), raw)
    return pack_raw(config, tensors)


def random_arrays(
    config: TunerConfig, *, seed: int = 0, dtype: type[np.floating[Any]] = np.float32
) -> dict[str, np.ndarray[Any, Any]]:
    """Small random values of the right shapes for ``config`` (tests, benchmarks, demos)."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(spec.shape) * 0.02).astype(dtype)
        for name, spec in tensor_specs(config).items()
    }

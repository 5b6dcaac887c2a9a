"""The tuner artifact: a safetensors file whose header carries a :class:`TunerConfig`.

Validation reads the header by hand (bounded, never unpickling anything), checks every
tensor's name, shape, dtype and byte range against :func:`tensor_specs`, and scans the raw
bytes for NaN/Inf and out-of-range values with numpy. No torch: the stores and the upload route
run this.

Every number and size in the header is bounded before it is used: the header's byte size, the
digits of each JSON integer (checked by the parser's hook before conversion: Python refuses to
convert more than 4300 and would raise), the number of tensors and metadata entries, each
shape's rank and dimensions, and the element count (multiplied one dimension at a time, stopping
as soon as it passes what the file can hold). Nesting is bounded twice: the parser stops at the
interpreter's recursion limit (a 422, not a crash), and every entry's type is checked (a header
is three levels deep: the object, a tensor entry, its lists of integers; metadata values are
strings, and the config inside one is parsed by pydantic, which bounds its own depth). Strings
must be valid Unicode (no lone surrogate escapes, which could not be written back as UTF-8).

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
MAX_TENSORS = 4096
"""Most tensors in one artifact: the largest config (256 blocks, 2 sides, 7 tensors per
Res-Tuner, plus the head's 2) needs 3586."""
MAX_RANK = 4
"""Most dimensions of one tensor's shape (the contract uses 1 and 2)."""
MAX_DIM = 1 << 24
"""Largest single dimension (the contract's largest is 16384)."""
MAX_TENSOR_NAME_CHARS = 256
"""Longest tensor name (``bypass.vertical.256.prompt`` is 27)."""
MAX_METADATA_ENTRIES = 64
"""Most ``__metadata__`` entries (restune writes 2; other writers add a few)."""
MAX_METADATA_KEY_CHARS = 256
"""Longest ``__metadata__`` key."""
MAX_INT_DIGITS = 20
"""Digits of a JSON integer in the header: enough for any 64-bit offset."""
MAX_ABS_VALUE_EXPONENT = 20
"""Tensor values must be below 2**20 (~1e6) in magnitude: trained tuner weights are orders of
magnitude smaller, and larger ones overflow float16 and bfloat16 activations on real inputs."""

# (raw integer type, exponent mask, exponent shift, exponent bias) per dtype. A float is NaN or
# Inf exactly when all its exponent bits are set, and its magnitude is below 2**e exactly when
# its biased exponent is below bias + e. Reading the raw bits handles BF16, which numpy has no
# type for, the same way as F16 and F32.
_EXPONENT: dict[str, tuple[type[np.unsignedinteger[Any]], int, int, int]] = {
    "F32": (np.uint32, 0x7F80_0000, 23, 127),
    "F16": (np.uint16, 0x7C00, 10, 15),
    "BF16": (np.uint16, 0x7F80, 7, 127),
}

_PICKLE_PROTO = 0x80
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_ERRORS_SHOWN = 5


class ArtifactError(StoreError):
    """An upload that is not a valid restune artifact; ``code`` names the first problem found.

    Codes: ``artifact_too_large``, ``artifact_bad_format``, ``artifact_header_too_large``,
    ``artifact_bad_header``, ``artifact_bad_config``, ``artifact_missing_tensor``,
    ``artifact_unexpected_tensor``, ``artifact_bad_shape``, ``artifact_bad_dtype``,
    ``artifact_bad_offsets``, ``artifact_non_finite``, ``artifact_value_out_of_range``,
    ``backbone_mismatch``; and, from admission against a running backbone
    (``server.engine.admission``), ``artifact_incompatible`` and ``artifact_dry_run_failed``.
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
            raise _fail("artifact_bad_header", f"header has the key {_shown(key)} twice")
        out[key] = value
    return out


def _bounded_int(text: str) -> int:
    # Called by the JSON parser for every integer literal, before it becomes an int: Python
    # refuses (ValueError) to convert more than 4300 digits, and needs no more than 20 here.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _fail(
            "artifact_bad_header",
            f"header has a {len(text)}-digit integer; at most {MAX_INT_DIGITS} digits",
        )
    return int(text)


def _no_constant(text: str) -> Any:
    raise _fail("artifact_bad_header", f"header has the non-JSON number {text}")


def _shown(text: str, limit: int = 80) -> str:
    """``repr`` of a name from the header, cut short (messages stay small and ASCII-safe)."""
    return ascii(text if len(text) <= limit else text[:limit] + "...")


def _valid_unicode(text: str) -> bool:
    # A JSON escape of a lone surrogate ("\ud800") decodes to a str that cannot be encoded
    # back to UTF-8; anything that later writes it (a log line, a JSON answer) would fail.
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _sniff_format(data: bytes) -> None:
    """Refuse files that are clearly something else, saying what they look like."""
    if data[8:9] == b"{":
        # The shape of a safetensors file. Its first bytes are a little-endian length, so a
        # header of 640 bytes starts 0x80 0x02, a pickle's PROTO opcode: only a file that is
        # not safetensors-shaped is named after what else it looks like.
        return
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
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise _fail(
            "artifact_bad_header",
            f"__metadata__ has {len(metadata)} entries; at most {MAX_METADATA_ENTRIES}",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS or not _valid_unicode(key):
            raise _fail(
                "artifact_bad_header",
                f"__metadata__ key {_shown(key)} is not 1..{MAX_METADATA_KEY_CHARS} characters "
                "of valid Unicode",
            )
        if not isinstance(value, str):
            raise _fail("artifact_bad_header", "__metadata__ values must all be strings")
        if not _valid_unicode(value):
            raise _fail(
                "artifact_bad_header",
                f"__metadata__ value of {_shown(key)} is not valid Unicode (lone surrogate)",
            )
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
            f"artifact format {_shown(fmt)} is not supported (this version reads "
            f"{FORMAT_VERSION!r})",
        )
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        raise _fail("artifact_bad_header", f"__metadata__ has no {CONFIG_KEY!r}")
    try:
        return TunerConfig.model_validate_json(raw)
    except ValidationError as exc:
        raise _fail("artifact_bad_config", f"invalid {CONFIG_KEY}: {_summarise(exc)}") from None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_tensor(name: str, entry: object, max_numel: int) -> TensorInfo:
    """One tensor entry, bounded: rank, each dimension, and the element count against
    ``max_numel`` (what the data buffer could hold at the smallest item size)."""
    if len(name) > MAX_TENSOR_NAME_CHARS or not name or not _valid_unicode(name):
        raise _fail(
            "artifact_bad_header",
            f"tensor name {_shown(name)} is not 1..{MAX_TENSOR_NAME_CHARS} characters of valid "
            "Unicode",
        )
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(
            "artifact_bad_header",
            f"tensor {_shown(name)}: entry must have exactly dtype, shape and data_offsets",
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise _fail("artifact_bad_header", f"tensor {_shown(name)}: dtype must be a string")
    if dtype not in ITEMSIZE:
        raise _fail(
            "artifact_bad_dtype",
            f"tensor {_shown(name)} has dtype {_shown(dtype, 16)}; allowed: {', '.join(ITEMSIZE)}",
        )
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise _fail(
            "artifact_bad_header",
            f"tensor {_shown(name)}: shape must be a list of at most {MAX_RANK} dimensions",
        )
    numel = 1
    for size in shape:
        if not _is_count(size) or size > MAX_DIM:
            raise _fail(
                "artifact_bad_header",
                f"tensor {_shown(name)}: every dimension must be an integer in 0..{MAX_DIM}",
            )
        numel *= size
        if numel > max_numel:
            raise _fail(
                "artifact_bad_header",
                f"tensor {_shown(name)}: shape {shape} holds more values than the file can",
            )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _fail(
            "artifact_bad_offsets",
            f"tensor {_shown(name)}: data_offsets must be two integers >= 0",
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


def read_header(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES, sha256: str | None = None
) -> ArtifactHeader:
    """Parse and sanity-check an artifact's header; the tensor bytes are not inspected.

    Checks the size limit, the safetensors framing, the header's bounds (see the module
    docstring), the restune metadata and config, each tensor's dtype and shape, and that the
    tensors tile the data buffer exactly. ``sha256``: the digest of ``data`` when the caller
    already has it (it is not computed again). Raises :class:`ArtifactError`.
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
            data[8 : 8 + header_len].decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_int=_bounded_int,
            parse_constant=_no_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(
            "artifact_bad_header", f"header is not valid UTF-8 JSON: {str(exc)[:200]}"
        ) from None
    except RecursionError:
        # "[[[[...": the parser recurses once per level and stops at the recursion limit.
        raise _fail("artifact_bad_header", "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _fail("artifact_bad_header", "header must be a JSON object")
    config = _parse_config(header.pop("__metadata__", None))
    if len(header) > MAX_TENSORS:
        raise _fail(
            "artifact_bad_header", f"header lists {len(header)} tensors; at most {MAX_TENSORS}"
        )
    data_start = 8 + header_len
    buffer_len = len(data) - data_start
    max_numel = buffer_len // min(ITEMSIZE.values())
    tensors = {name: _parse_tensor(name, entry, max_numel) for name, entry in header.items()}
    _check_offsets(tensors, buffer_len)
    return ArtifactHeader(
        config=config,
        tensors=tensors,
        sha256=sha256 if sha256 is not None else hashlib.sha256(data).hexdigest(),
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


def _check_values(header: ArtifactHeader, data: bytes) -> None:
    """Every value finite and below 2**MAX_ABS_VALUE_EXPONENT in magnitude (from the bits).

    One masked pass and one comparison per tensor; only a failing tensor is scanned again to
    say which kind of value it holds and where."""
    for name, info in header.tensors.items():
        uint, mask, shift, bias = _EXPONENT[info.dtype]
        bits = np.frombuffer(
            header.tensor_bytes(data, name), dtype=np.dtype(uint).newbyteorder("<")
        )
        exponent = bits & mask
        # NaN/Inf have every exponent bit set, so they are above any lower limit too.
        limit = min((bias + MAX_ABS_VALUE_EXPONENT) << shift, mask)
        if not (exponent >= limit).any():
            continue
        bad = np.flatnonzero(exponent == mask)
        if bad.size:
            raise _fail(
                "artifact_non_finite",
                f"tensor {_shown(name)} has {bad.size} NaN/Inf value(s) (first at flat index "
                f"{int(bad[0])})",
            )
        big = np.flatnonzero(exponent >= limit)
        raise _fail(
            "artifact_value_out_of_range",
            f"tensor {_shown(name)} has {big.size} value(s) of magnitude >= "
            f"2**{MAX_ABS_VALUE_EXPONENT} (first at flat index {int(big[0])})",
        )


def validate_artifact(
    data: bytes,
    *,
    expect_fingerprint: str | None = None,
    expect_arch: str | None = None,
    max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    sha256: str | None = None,
) -> ArtifactHeader:
    """Fully validate an upload without loading it: header, backbone, tensors, values.

    ``expect_fingerprint`` (the server's backbone fingerprint) refuses tuners trained on another
    backbone; ``expect_arch`` only improves that message. ``sha256``: the digest of ``data``
    if the caller has it. Raises :class:`ArtifactError`.
    """
    header = read_header(data, max_bytes=max_bytes, sha256=sha256)
    if expect_fingerprint is not None:
        _check_backbone(header.config, expect_fingerprint, expect_arch)
    _check_tensors(header)
    _check_values(header, data)
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

"""Open Inference Protocol (KServe v2) REST codec: JSON and the binary tensor extension.

A request body is a JSON header, optionally followed by raw tensor bytes; the header's length is
in the ``Inference-Header-Content-Length`` HTTP header. An input whose ``parameters`` carry
``binary_data_size`` takes that many bytes from the tail, inputs in order. Numeric tensors are
little-endian, row-major; a BYTES tensor in binary is its elements one after the other, each a
4-byte little-endian length and then the bytes. Responses use the same layout for outputs asked
for in binary (``parameters.binary_data`` on the output, or ``binary_data_output`` on the
request).

Only numpy here: the routes turn decoded arrays into service calls.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

HEADER_LENGTH = "Inference-Header-Content-Length"
"""HTTP header carrying the JSON part's length when binary tensors follow it."""

NUMERIC_DTYPES: dict[str, str] = {
    "BOOL": "|b1",
    "UINT8": "|u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "|i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
"""Wire datatype -> little-endian numpy dtype (BYTES is handled apart)."""

_LEN = struct.Struct("<I")


class OipCodecError(ValueError):
    """A request that does not follow the protocol (answered 400)."""


@dataclass(frozen=True)
class InferInput:
    """One decoded input tensor."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: npt.NDArray[Any]
    """Shaped array; dtype ``object`` holding ``bytes`` for BYTES."""
    binary: bool
    """True when it came in the binary tail, False when it was JSON ``data``."""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of the request's ``outputs``."""

    name: str
    binary: bool | None
    """``parameters.binary_data`` when given."""
    classification: int
    """``parameters.classification``: top-k as BYTES ``"score:index:label"`` (0 = off)."""


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request."""

    id: str | None
    parameters: dict[str, Any]
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None
    """None when the request names no outputs (all of them are returned)."""

    @property
    def binary_output_default(self) -> bool:
        """``parameters.binary_data_output``: outputs in binary unless an output says otherwise."""
        return bool(self.parameters.get("binary_data_output", False))

    def input(self, name: str) -> InferInput | None:
        """The input called ``name``, if sent."""
        return next((i for i in self.inputs if i.name == name), None)


@dataclass(frozen=True)
class OutputTensor:
    """One output to encode."""

    name: str
    datatype: str
    data: npt.NDArray[Any]
    """Shaped array; dtype ``object`` holding ``bytes`` or ``str`` for BYTES."""


# --- BYTES elements ------------------------------------------------------------------------


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements as 4-byte little-endian lengths each followed by the bytes."""
    return b"".join(_LEN.pack(len(e)) + e for e in elements)


def deserialize_bytes(buf: bytes) -> list[bytes]:
    """Inverse of :func:`serialize_bytes`; refuses truncated elements."""
    out: list[bytes] = []
    offset = 0
    view = memoryview(buf)
    while offset < len(buf):
        if offset + 4 > len(buf):
            raise OipCodecError("BYTES tensor: truncated element length")
        (length,) = _LEN.unpack_from(view, offset)
        offset += 4
        if offset + length > len(buf):
            raise OipCodecError("BYTES tensor: element longer than the data")
        out.append(bytes(view[offset : offset + length]))
        offset += length
    return out


def _element_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("utf-8")


def _object_array(elements: Sequence[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    arr = np.empty(len(elements), dtype=object)
    arr[:] = list(elements)
    return arr.reshape(shape)


# --- requests ------------------------------------------------------------------------------


_END = object()


def _flatten(data: Any) -> list[Any]:
    """Row-major elements of JSON ``data``, flat or nested lists both allowed by the spec."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise OipCodecError(f"input '{name}': shape must be a list of non-negative integers")
    return tuple(raw)


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _decode_input(raw: Any, tail: memoryview, offset: int) -> tuple[InferInput, int]:
    if not isinstance(raw, dict):
        raise OipCodecError("each input must be an object")
    name = raw.get("name")
    datatype = raw.get("datatype")
    if not isinstance(name, str) or not name:
        raise OipCodecError("input without a name")
    if datatype != "BYTES" and datatype not in NUMERIC_DTYPES:
        raise OipCodecError(f"input '{name}': unsupported datatype {datatype!r}")
    shape = _shape(raw.get("shape"), name)
    count = _count(shape)
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise OipCodecError(f"input '{name}': parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OipCodecError(f"input '{name}': binary_data_size must be an integer >= 0")
        if offset + size > len(tail):
            raise OipCodecError(f"input '{name}': binary_data_size runs past the request body")
        chunk = bytes(tail[offset : offset + size])
        offset += size
        if datatype == "BYTES":
            elements = deserialize_bytes(chunk)
            if len(elements) != count:
                raise OipCodecError(
                    f"input '{name}': {len(elements)} BYTES elements for shape {list(shape)}"
                )
            data = _object_array(elements, shape)
        else:
            dtype = np.dtype(NUMERIC_DTYPES[datatype])
            if size != count * dtype.itemsize:
                raise OipCodecError(
                    f"input '{name}': {size} bytes for {datatype} shape {list(shape)} "
                    f"(expected {count * dtype.itemsize})"
                )
            data = np.frombuffer(chunk, dtype=dtype).reshape(shape)
        return InferInput(name, datatype, shape, data, True, params), offset
    if "data" not in raw:
        raise OipCodecError(f"input '{name}': no data and no binary_data_size")
    flat = _flatten(raw["data"])
    if len(flat) != count:
        raise OipCodecError(f"input '{name}': {len(flat)} elements for shape {list(shape)}")
    if datatype == "BYTES":
        data = _object_array([_element_bytes(v) for v in flat], shape)
    else:
        if not all(isinstance(v, int | float) for v in flat):
            raise OipCodecError(f"input '{name}': {datatype} data must be numbers")
        try:
            data = np.asarray(flat, dtype=np.dtype(NUMERIC_DTYPES[datatype])).reshape(shape)
        except (OverflowError, ValueError) as exc:
            raise OipCodecError(f"input '{name}': {exc}") from exc
    return InferInput(name, datatype, shape, data, False, params), offset


def _decode_output(raw: Any) -> RequestedOutput:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise OipCodecError("each requested output must be an object with a name")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise OipCodecError(f"output '{raw['name']}': parameters must be an object")
    binary = params.get("binary_data")
    classification = params.get("classification", 0)
    if not isinstance(classification, int) or isinstance(classification, bool):
        raise OipCodecError(f"output '{raw['name']}': classification must be an integer")
    if classification < 0:
        raise OipCodecError(f"output '{raw['name']}': classification must be >= 0")
    return RequestedOutput(
        raw["name"], binary if isinstance(binary, bool) else None, classification
    )


def decode_request(body: bytes, header_length: str | int | None) -> InferRequest:
    """Parse an infer request; ``header_length`` is the ``Inference-Header-Content-Length``."""
    if header_length is None or header_length == "":
        head, tail = body, b""
    else:
        try:
            n = int(header_length)
        except (TypeError, ValueError):
            raise OipCodecError(f"{HEADER_LENGTH} must be an integer") from None
        if n < 0 or n > len(body):
            raise OipCodecError(f"{HEADER_LENGTH} {n} is outside the body ({len(body)} bytes)")
        head, tail = body[:n], body[n:]
    try:
        doc = json.loads(head)
    # RecursionError: a few hundred kB of "[[[[..." nest deeper than the parser recurses.
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise OipCodecError(f"request JSON is invalid: {exc}") from None
    if not isinstance(doc, dict):
        raise OipCodecError("request must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise OipCodecError("request needs a non-empty 'inputs' list")
    view = memoryview(tail)
    offset = 0
    inputs = []
    for raw in raw_inputs:
        decoded, offset = _decode_input(raw, view, offset)
        inputs.append(decoded)
    if offset != len(tail):
        raise OipCodecError(f"{len(tail) - offset} bytes of binary data belong to no input")
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise OipCodecError("input names must be unique")
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None and not isinstance(raw_outputs, list):
        raise OipCodecError("'outputs' must be a list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise OipCodecError("'parameters' must be an object")
    request_id = doc.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        parameters=params,
        inputs=inputs,
        outputs=[_decode_output(o) for o in raw_outputs] if raw_outputs is not None else None,
    )


# --- responses -----------------------------------------------------------------------------


def classification_strings(
    scores: npt.NDArray[np.float32], labels: Sequence[str], k: int
) -> npt.NDArray[Any]:
    """Triton's classification extension: top-``k`` of each row as ``"score:index:label"``.

    ``scores`` is (B, C); the result is a (B, min(k, C)) object array of bytes.
    """
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (B, k)
    rows = [
        [f"{scores[b, c]:f}:{c}:{labels[c] if c < len(labels) else ''}".encode() for c in row]
        for b, row in enumerate(order)
    ]
    return _object_array([e for row in rows for e in row], (scores.shape[0], k))


def _json_data(t: OutputTensor) -> list[Any]:
    flat = t.data.reshape(-1)
    if t.datatype == "BYTES":
        return [
            e.decode("utf-8", errors="replace") if isinstance(e, bytes) else str(e) for e in flat
        ]
    values: list[Any] = flat.tolist()
    return values


def _binary_data(t: OutputTensor) -> bytes:
    if t.datatype == "BYTES":
        return serialize_bytes([_element_bytes(e) for e in t.data.reshape(-1)])
    return np.ascontiguousarray(t.data, dtype=np.dtype(NUMERIC_DTYPES[t.datatype])).tobytes()


def encode_response(
    request: InferRequest,
    *,
    model_name: str,
    model_version: str,
    outputs: Sequence[OutputTensor],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (content type, and the header length when binary)."""
    wanted = {o.name: o for o in request.outputs} if request.outputs is not None else None
    head: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for t in outputs:
        asked = wanted.get(t.name) if wanted is not None else None
        binary = request.binary_output_default
        if asked is not None and asked.binary is not None:
            binary = asked.binary
        entry: dict[str, Any] = {
            "name": t.name,
            "datatype": t.datatype,
            "shape": list(t.data.shape),
        }
        if binary:
            raw = _binary_data(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = _json_data(t)
        head.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = head
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not tail:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(tail), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }

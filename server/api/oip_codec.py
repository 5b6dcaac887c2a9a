"""Open Inference Protocol (KServe v2) REST codec: JSON and the binary tensor extension.

A request body is a JSON header, optionally followed by raw tensor bytes; the header's length is
in the ``Inference-Header-Content-Length`` HTTP header. An input whose ``parameters`` carry
``binary_data_size`` takes that many bytes from the tail, inputs in order. Numeric tensors are
little-endian, row-major; a BYTES tensor in binary is its elements one after the other, each a
4-byte little-endian length and then the bytes. Responses use the same layout for outputs asked
for in binary (``parameters.binary_data`` on the output, or ``binary_data_output`` on the
request).

Every size in a request is bounded before any arithmetic or allocation uses it: the rank,
each dimension and the element count of a shape, the counts of inputs, outputs and
parameters, name and id lengths, the header length, each BYTES element's length. A request
past a bound is an :class:`OipCodecError` (400), never an exception of numpy or Python.

Only numpy here: the routes turn decoded arrays into service calls.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from server.api.json_body import JsonBodyError, load_json

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

MAX_RANK = 8
"""Most dimensions of a tensor (an image batch is 4)."""
MAX_DIM = 2**31 - 1
"""Largest single dimension."""
MAX_ELEMENTS = 2**28
"""Most elements of one tensor (the body size limit bounds real tensors far lower)."""
MAX_BYTES_ELEMENTS = 65_536
"""Most elements of one BYTES tensor (each is decoded into its own Python object)."""
MAX_INPUTS = 16
MAX_OUTPUTS = 16
MAX_PARAMETERS = 64
"""Most entries of one ``parameters`` object."""
MAX_NAME_CHARS = 256
"""Longest tensor name, and longest request ``id``."""
MAX_CLASSIFICATION = 1_000_000
"""Largest ``classification`` k (the route caps it again by the labels and ``max_top_k``)."""
_HEADER_LENGTH_RE = re.compile(r"[0-9]{1,12}")


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


def deserialize_bytes(buf: bytes, max_elements: int = MAX_BYTES_ELEMENTS) -> list[bytes]:
    """Inverse of :func:`serialize_bytes`; refuses truncated elements and more than
    ``max_elements`` of them (the count the shape allows), stopping at the first extra one."""
    out: list[bytes] = []
    offset = 0
    view = memoryview(buf)
    while offset < len(buf):
        if len(out) >= max_elements:
            raise OipCodecError(f"BYTES tensor: more than {max_elements} elements")
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


def _flatten(data: Any, limit: int) -> list[Any] | None:
    """Row-major elements of JSON ``data``, flat or nested lists both allowed by the spec;
    None as soon as there are more than ``limit`` or the nesting is deeper than a shape."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) >= MAX_RANK:
                return None
            stack.append(iter(item))
        else:
            if len(flat) >= limit:
                return None
            flat.append(item)
    return flat


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    """The shape, refused unless rank and every dimension are within bounds (checked in this
    order, so a huge list or a huge integer costs nothing)."""
    if not isinstance(raw, list):
        raise OipCodecError(f"input '{name}': shape must be a list of non-negative integers")
    if len(raw) > MAX_RANK:
        raise OipCodecError(f"input '{name}': shape has {len(raw)} dimensions; at most {MAX_RANK}")
    for d in raw:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_DIM:
            raise OipCodecError(
                f"input '{name}': shape must be a list of integers between 0 and {MAX_DIM}"
            )
    return tuple(raw)


def _count(shape: tuple[int, ...], limit: int, name: str) -> int:
    """Elements of ``shape`` (bounded dims, so the product is at most 8 x 31 bits), refused
    past ``limit``."""
    n = 1
    for d in shape:
        n *= d
    if n > limit:
        raise OipCodecError(f"input '{name}': shape {list(shape)} has more than {limit} elements")
    return n


def _parameters(raw: Any, what: str) -> dict[str, Any]:
    params = raw if raw is not None else {}
    if not isinstance(params, dict):
        raise OipCodecError(f"{what}: parameters must be an object")
    if len(params) > MAX_PARAMETERS:
        raise OipCodecError(f"{what}: {len(params)} parameters; at most {MAX_PARAMETERS}")
    return params


def _name(raw: Any, what: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise OipCodecError(f"{what} without a name")
    if len(raw) > MAX_NAME_CHARS:
        raise OipCodecError(f"{what} name of {len(raw)} characters; at most {MAX_NAME_CHARS}")
    return raw


def _decode_input(raw: Any, tail: memoryview, offset: int) -> tuple[InferInput, int]:
    if not isinstance(raw, dict):
        raise OipCodecError("each input must be an object")
    name = _name(raw.get("name"), "input")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in NUMERIC_DTYPES):
        shown = datatype[:32] if isinstance(datatype, str) else type(datatype).__name__
        raise OipCodecError(f"input '{name}': unsupported datatype {shown!r}")
    shape = _shape(raw.get("shape"), name)
    count = _count(shape, MAX_BYTES_ELEMENTS if datatype == "BYTES" else MAX_ELEMENTS, name)
    params = _parameters(raw.get("parameters"), f"input '{name}'")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OipCodecError(f"input '{name}': binary_data_size must be an integer >= 0")
        if size > len(tail) - offset:
            raise OipCodecError(f"input '{name}': binary_data_size runs past the request body")
        chunk = tail[offset : offset + size]
        offset += size
        if datatype == "BYTES":
            elements = deserialize_bytes(bytes(chunk), max_elements=count)
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
    flat = _flatten(raw["data"], count)
    if flat is None or len(flat) != count:
        got = "more" if flat is None else str(len(flat))
        raise OipCodecError(f"input '{name}': {got} elements for shape {list(shape)}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise OipCodecError(f"input '{name}': BYTES data in JSON must be strings")
        try:
            data = _object_array([v.encode("utf-8") for v in flat], shape)
        except UnicodeEncodeError:
            raise OipCodecError(f"input '{name}': BYTES data is not valid Unicode") from None
    else:
        if not all(isinstance(v, int | float) for v in flat):
            raise OipCodecError(f"input '{name}': {datatype} data must be numbers")
        try:
            data = np.asarray(flat, dtype=np.dtype(NUMERIC_DTYPES[datatype])).reshape(shape)
        except (OverflowError, ValueError):
            raise OipCodecError(
                f"input '{name}': a value does not fit the datatype {datatype}"
            ) from None
    return InferInput(name, datatype, shape, data, False, params), offset


def _decode_output(raw: Any) -> RequestedOutput:
    if not isinstance(raw, dict):
        raise OipCodecError("each requested output must be an object with a name")
    name = _name(raw.get("name"), "requested output")
    params = _parameters(raw.get("parameters"), f"output '{name}'")
    binary = params.get("binary_data")
    classification = params.get("classification", 0)
    if not isinstance(classification, int) or isinstance(classification, bool):
        raise OipCodecError(f"output '{name}': classification must be an integer")
    if not 0 <= classification <= MAX_CLASSIFICATION:
        raise OipCodecError(
            f"output '{name}': classification must be between 0 and {MAX_CLASSIFICATION}"
        )
    return RequestedOutput(name, binary if isinstance(binary, bool) else None, classification)


class OipTooLargeError(OipCodecError):
    """A JSON header over the JSON limits (answered 413): the tensors belong in the binary
    tail."""


def load_oip_json(raw: bytes) -> Any:
    """A request's JSON (the whole body, or the header before the binary tail)."""
    try:
        return load_json(raw)
    except JsonBodyError as exc:
        if exc.too_large:
            raise OipTooLargeError(str(exc)) from None
        raise OipCodecError(f"request JSON is invalid: {exc}") from None


def decode_request(body: bytes, header_length: str | int | None) -> InferRequest:
    """Parse an infer request; ``header_length`` is the ``Inference-Header-Content-Length``.

    Pure and CPU-bound (a large body takes milliseconds): the route runs it in a worker
    thread when the body is large.
    """
    if header_length is None or header_length == "":
        head, tail = body, b""
    else:
        text = str(header_length).strip()
        if not _HEADER_LENGTH_RE.fullmatch(text):
            raise OipCodecError(f"{HEADER_LENGTH} must be a non-negative integer")
        n = int(text)
        if n > len(body):
            raise OipCodecError(f"{HEADER_LENGTH} {n} is outside the body ({len(body)} bytes)")
        head, tail = body[:n], body[n:]
    doc = load_oip_json(head)
    if not isinstance(doc, dict):
        raise OipCodecError("request must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise OipCodecError("request needs a non-empty 'inputs' list")
    if len(raw_inputs) > MAX_INPUTS:
        raise OipCodecError(f"{len(raw_inputs)} inputs; at most {MAX_INPUTS}")
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
    if raw_outputs is not None and len(raw_outputs) > MAX_OUTPUTS:
        raise OipCodecError(f"{len(raw_outputs)} outputs; at most {MAX_OUTPUTS}")
    params = _parameters(doc.get("parameters"), "request")
    request_id = doc.get("id")
    if request_id is not None and (
        not isinstance(request_id, str) or len(request_id) > MAX_NAME_CHARS
    ):
        raise OipCodecError(f"'id' must be a string of at most {MAX_NAME_CHARS} characters")
    return InferRequest(
        id=request_id,
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

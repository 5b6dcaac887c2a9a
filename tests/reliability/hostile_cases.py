"""Seeded generators of hostile requests: every case a client mistake the server must answer 4xx.

:func:`generate` yields ``n`` cases from one ``random.Random(seed)``, cycling through the
families below, so a run is the same every time and a larger ``n`` explores further. Each
family aims at one class of input the edge must bound or refuse before doing work with it:

* task references: unicode look-alike digits (``"²"``, ``"٣"``), lone surrogates, versions of
  thousands of digits, names far over the length limit, in JSON and in multipart fields;
* integers: ``top_k`` and counts from 1 to 5,000 digits, past Python's int parsing limit;
* JSON framing: truncation, random bytes, nesting up to the body limit, wrong types, BOMs;
* multipart framing: boundaries, part counts and sizes, headers, names, mutated bytes;
* OIP tensors: shape rank (up to 400,000 dimensions), dimensions (``2**63``, negative,
  floats), datatypes, data length against the shape, parameters, outputs, ids;
* OIP binary extension: the header-length header, ``binary_data_size``, BYTES element
  lengths;
* paths and headers: version segments, names, content types, request ids, tokens.

Nothing here asserts: the test sends the cases to a live server and checks every answer.
"""

from __future__ import annotations

import base64
import json
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote

from tests.reliability.raw_http import (
    BOUNDARY,
    Part,
    RawRequest,
    field_part,
    file_part,
    multipart_body,
)

MiB = 1024 * 1024


@dataclass(frozen=True)
class Target:
    """What the cases aim at: registered task names, a valid image, the body limit."""

    classification: str
    embedding: str
    image: bytes
    max_request_bytes: int
    admin_token: str


@dataclass(frozen=True)
class HostileCase:
    """One generated request and the family that made it (for the report)."""

    family: str
    request: RawRequest


# --- building blocks ---------------------------------------------------------------------

_ODD_CHARS = [
    "\ud800",  # lone high surrogate
    "\udfff",  # lone low surrogate
    "²",
    "³",
    "¹",
    "٣",
    "０",
    "\u202e",  # right-to-left override
    "\u0301",  # combining accent
    "\x00",
    "\n",
    "\t",
    " ",
    "@",
    "/",
    ",",
    "%",
    "..",
    "é",
    "😀",
    "\uffff",
]
_PLAIN = "abcdefghijklmnopqrstuvwxyz0123456789-_."


def odd_text(rng: random.Random, max_len: int = 40) -> str:
    """A short string mixing plain name characters with everything a name must not hold."""
    n = rng.randint(0, max_len)
    return "".join(
        rng.choice(_ODD_CHARS) if rng.random() < 0.3 else rng.choice(_PLAIN) for _ in range(n)
    )


def digits(rng: random.Random) -> str:
    """An integer literal of 1 to 5,000 digits (Python refuses to parse more than 4,300)."""
    n = rng.choice([1, 2, 9, 10, 19, 20, 39, 64, 300, 4300, 4301, 5000])
    first = rng.choice("123456789")
    return first + "".join(rng.choice("0123456789") for _ in range(n - 1))


def odd_int_literal(rng: random.Random) -> str:
    """A JSON number that is a client's mistake somewhere: huge, negative, float, exponent."""
    return rng.choice(
        [
            digits(rng),
            "-" + digits(rng),
            "0",
            "-1",
            "1.5",
            "1e400",
            "-1e400",
            "1E2",
            str(2**63),
            str(2**64),
            "true",
            "null",
            '"5"',
            '"²"',
            "[]",
            "{}",
        ]
    )


def task_ref(rng: random.Random, target: Target) -> str:
    """A task reference that is wrong in one way (or, now and then, right)."""
    name = rng.choice([target.classification, target.embedding, odd_text(rng), "x" * 300])
    kind = rng.randrange(9)
    if kind == 0:
        return name
    if kind == 1:
        return f"{name}@{rng.choice(['²', '³', '٣', '０', '1²', '¹'])}"
    if kind == 2:
        return f"{name}@{digits(rng)}"
    if kind == 3:
        return f"{name}@{rng.choice(['0', '-1', '1.0', '', '@', ' 1', '1 ', '0x1', '1_0'])}"
    if kind == 4:
        return name + "\ud800" * rng.randint(1, 3)
    if kind == 5:
        return "a" * rng.choice([65, 257, 5000, 100_000])
    if kind == 6:
        return odd_text(rng, 200)
    if kind == 7:
        return f"{name}@1"
    return ",".join(odd_text(rng, 8) for _ in range(rng.randint(2, 50)))


def q(text: str) -> str:
    """``text`` as one percent-encoded path segment; lone surrogates become the invalid
    UTF-8 bytes they would be (``%ED%A0%80``)."""
    return quote(text, safe="", errors="surrogatepass")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json(doc: object) -> bytes:
    # ensure_ascii (the default) writes lone surrogates as \ud800 escapes: valid JSON text.
    return json.dumps(doc).encode()


def _post_json(target_path: str, body: bytes, **headers: str) -> RawRequest:
    return RawRequest("POST", target_path, body, {"Content-Type": "application/json", **headers})


# --- families ----------------------------------------------------------------------------


def predict_json_tasks(rng: random.Random, t: Target) -> RawRequest:
    tasks: object
    if rng.random() < 0.3:
        tasks = task_ref(rng, t)  # the comma-separated string form
    else:
        tasks = []
        budget = t.max_request_bytes // 2  # under the body limit: the checks are the point
        for _ in range(rng.choice([1, 2, 3, 17, 70, 2000])):
            tasks.append(task_ref(rng, t))
            budget -= len(tasks[-1]) + 4
            if budget < 0:
                tasks.pop()
                break
    return _post_json(
        "/v1/predict", _json({"images": [{"b64": b64(t.image)}], "tasks": tasks, "top_k": 3})
    )


def predict_json_integers(rng: random.Random, t: Target) -> RawRequest:
    image = json.dumps({"b64": b64(t.image)})
    field = rng.choice(["top_k", "extra", "tasks", "images"])
    value = odd_int_literal(rng)
    if field == "top_k":
        text = f'{{"images":[{image}],"tasks":["{t.classification}"],"top_k":{value}}}'
    elif field == "extra":
        text = f'{{"images":[{image}],"tasks":["{t.classification}"],"n":{value}}}'
    elif field == "tasks":
        text = f'{{"images":[{image}],"tasks":[{value}]}}'
    else:
        text = f'{{"images":[{{"b64":{value}}}],"tasks":["{t.classification}"]}}'
    return _post_json("/v1/predict", text.encode())


def _valid_predict_json(t: Target) -> bytes:
    return _json({"images": [{"b64": b64(t.image)}], "tasks": [t.classification], "top_k": 2})


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` truncated, with bytes flipped, inserted or repeated."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(out) + 1)
        if op == 0:
            del out[pos:]
        elif op == 1 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 2:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            chunk = bytes(out[pos : pos + rng.randint(1, 64)])
            out[pos:pos] = chunk * rng.randint(1, 50)
    return bytes(out)


def predict_json_framing(rng: random.Random, t: Target) -> RawRequest:
    kind = rng.randrange(8)
    if kind == 0:
        body = mutate(rng, _valid_predict_json(t))
    elif kind == 1:
        depth = rng.choice([33, 100, 1000, 50_000, t.max_request_bytes // 2 - 10])
        body = b"[" * depth + b"]" * depth if rng.random() < 0.5 else b'{"a":' * depth
    elif kind == 2:
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 512)))
    elif kind == 3:
        body = rng.choice([b"null", b"[]", b'"x"', b"1", b"NaN", b"Infinity", b"{}", b""])
    elif kind == 4:
        body = b"\xef\xbb\xbf" + _valid_predict_json(t)
    elif kind == 5:
        body = _valid_predict_json(t).decode().encode("utf-16")
    elif kind == 6:
        body = _json({"images": [{"b64": odd_text(rng, 64)}] * rng.randint(1, 9), "tasks": "x"})
    else:
        body = _json({"images": [{"url": "http://127.0.0.1/x"}], "tasks": ["a"], "z": [[[]]]})
    return _post_json("/v1/predict", body)


def predict_multipart(rng: random.Random, t: Target) -> RawRequest:
    kind = rng.randrange(7)
    boundary = BOUNDARY
    content_type = f"multipart/form-data; boundary={boundary}"
    if kind == 0:  # odd task field bytes (lone surrogates pass as invalid UTF-8)
        value = task_ref(rng, t).encode("utf-8", "surrogatepass")
        parts = [file_part(t.image), Part(rng.choice(["tasks", "task"]), value)]
        body = multipart_body(parts)
    elif kind == 1:  # odd top_k
        parts = [file_part(t.image), field_part("tasks", t.classification)]
        parts.append(Part("top_k", odd_int_literal(rng).encode() + rng.choice([b"", "²".encode()])))
        body = multipart_body(parts)
    elif kind == 2:  # many parts
        n = rng.choice([10, 70, 500, 3000])
        name = rng.choice(["task", "image", "tasks", "top_k", "zz"])
        parts = [Part(name, b"a") for _ in range(n)] + [file_part(t.image)]
        body = multipart_body(parts)
    elif kind == 3:  # odd part names and headers
        disposition = rng.choice(
            [
                b"form-data",
                b'form-data; name=""',
                b'form-data; name="' + odd_text(rng).encode("utf-8", "surrogatepass") + b'"',
                b"form-data; name=" + b"x" * 5000,
                b'form-data; name="image"; filename="' + b"\xff" * 300 + b'"',
            ]
        )
        extra = b"X-" + b"h" * rng.choice([1, 10_000]) + b": v\r\n"
        body = (
            b"--"
            + boundary.encode()
            + b"\r\nContent-Disposition: "
            + disposition
            + b"\r\n"
            + extra
            + b"\r\ndata\r\n--"
            + boundary.encode()
            + b"--\r\n"
        )
    elif kind == 4:  # the boundary in the header does not fit the body, or is odd
        body = multipart_body([file_part(t.image), field_part("tasks", t.classification)])
        content_type = rng.choice(
            [
                "multipart/form-data",
                "multipart/form-data; boundary=",
                "multipart/form-data; boundary=other",
                "multipart/form-data; boundary=" + "b" * 2000,
                'multipart/form-data; boundary="' + BOUNDARY + '"; boundary=x',
                "multipart/form-data; boundary=" + BOUNDARY + "; charset=\u00ff",
            ]
        )
    elif kind == 5:  # a valid form, mutated
        body = mutate(
            rng, multipart_body([file_part(t.image), field_part("tasks", t.classification)])
        )
    else:  # an image part over the image limit, or empty
        size = rng.choice([0, 1, 300 * 1024])
        body = multipart_body([file_part(b"\x89PNG" * (size // 4)), field_part("tasks", "a")])
    return RawRequest("POST", "/v1/predict", body, {"Content-Type": content_type})


_DATATYPES: list[object] = [
    "FP32",
    "BYTES",
    "INT64",
    "BOOL",
    "fp32",
    "FP32 ",
    "FP128",
    "",
    "BF16",
    None,
    5,
    [],
    {},
    "x" * 3000,
]


def odd_shape(rng: random.Random, t: Target) -> object:
    kind = rng.randrange(9)
    if kind == 0:  # a rank of hundreds of thousands: each "1," is two bytes
        return [1] * rng.choice([9, 100, 10_000, min(400_000, t.max_request_bytes // 3)])
    if kind == 1:
        return [2**63, 0]
    if kind == 2:
        return [rng.choice([2**31, 2**63, 2**64, 10**300]), rng.randint(0, 3)]
    if kind == 3:
        return [rng.choice([-1, -(2**63), 1.5, True, None, "3", [], 1e308]) for _ in range(2)]
    if kind == 4:
        return [2**31 - 1] * rng.randint(2, 8)
    if kind == 5:
        return rng.choice([None, 3, "1,3", {}, []])
    if kind == 6:
        return [0] * rng.randint(1, 8)
    if kind == 7:
        return [rng.randint(0, 4) for _ in range(rng.randint(0, 9))]
    return [1, 3, 8, 8]


def odd_data(rng: random.Random) -> object:
    kind = rng.randrange(7)
    if kind == 0:
        return [rng.random() for _ in range(rng.randint(0, 300))]
    if kind == 1:
        return [[[[0.0]]]] * rng.randint(1, 3)
    if kind == 2:
        return [odd_text(rng, 20) for _ in range(rng.randint(1, 4))]
    if kind == 3:
        return [10 ** rng.choice([20, 39, 400]), -1, 0.5]
    if kind == 4:
        nested: object = 0.0
        for _ in range(rng.choice([5, 9, 30])):
            nested = [nested]
        return nested
    if kind == 5:
        return {"a": 1}
    return "x"


def _oip_input(rng: random.Random, t: Target) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": rng.choice(["image", "pixels", odd_text(rng), "", "i" * 1000]),
        "datatype": rng.choice(_DATATYPES),
        "shape": odd_shape(rng, t),
    }
    if rng.random() < 0.8:
        entry["data"] = odd_data(rng)
    if rng.random() < 0.3:
        entry["parameters"] = rng.choice(
            [
                {"binary_data_size": rng.choice([0, -1, 2**63, 10**30])},
                {f"p{i}": i for i in range(rng.choice([1, 65, 5000]))},
                [],
                "x",
            ]
        )
    return entry


def oip_infer_path(rng: random.Random, t: Target) -> str:
    task = rng.choice([t.classification, t.embedding])
    if rng.random() < 0.3:
        version = rng.choice(["²", "٣", "0", "-1", "1.0", digits(rng), "1", "%00", "1²"])
        return f"/v2/models/{task}/versions/{q(version)}/infer"
    return f"/v2/models/{task}/infer"


def oip_json(rng: random.Random, t: Target) -> RawRequest:
    doc: dict[str, object] = {
        "inputs": [_oip_input(rng, t) for _ in range(rng.choice([1, 1, 2, 20]))]
    }
    if rng.random() < 0.4:
        doc["outputs"] = [
            {
                "name": rng.choice(["scores", "labels", odd_text(rng)]),
                "parameters": {
                    "classification": rng.choice([1, 0, -1, 2**63, 10**50, True, "3", 1.5]),
                    "binary_data": rng.choice([True, False, "yes", None]),
                },
            }
            for _ in range(rng.choice([1, 2, 17]))
        ]
    if rng.random() < 0.3:
        doc["id"] = rng.choice(["r", 5, None, [[[]]], {"a": 1}, "i" * 1000, odd_text(rng)])
    if rng.random() < 0.2:
        doc["parameters"] = rng.choice([{"binary_data_output": True}, [], 3])
    return _post_json(oip_infer_path(rng, t), _json(doc))


def bytes_tail(rng: random.Random, t: Target) -> bytes:
    """A BYTES tensor in binary: element lengths that fit, or lie."""
    kind = rng.randrange(4)
    if kind == 0:
        return struct.pack("<I", len(t.image)) + t.image
    if kind == 1:
        return struct.pack("<I", 0xFFFFFFFF) + b"x" * rng.randint(0, 16)
    if kind == 2:
        return struct.pack("<I", 0) * rng.choice([2, 1000, 100_000])
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 7)))


def oip_binary(rng: random.Random, t: Target) -> RawRequest:
    datatype = rng.choice(["BYTES", "FP32", "FP16", "INT8", "UINT64"])
    if datatype == "BYTES":
        tail = bytes_tail(rng, t)
        shape: object = rng.choice([[1], [2], [0], [100_000], [2**63, 0], odd_shape(rng, t)])
    else:
        shape = rng.choice([[1, 3, 8, 8], [2**63, 0], [0, 3], odd_shape(rng, t)])
        tail = bytes(rng.randrange(256) for _ in range(rng.choice([0, 4, 768, 777])))
    size: object = rng.choice([len(tail), len(tail) + 1, 0, -5, 2**63, "4", None])
    head = _json(
        {
            "inputs": [
                {
                    "name": rng.choice(["image", "pixels"]),
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    )
    header_length = rng.choice(
        [
            str(len(head)),
            str(len(head) + 1),
            str(len(head) + len(tail) + 10),
            "-1",
            "1\u00b2",
            digits(rng),
            f" {len(head)}",
            "0x10",
            "1_0",
            "",
        ]
    )
    headers = {"Content-Type": "application/octet-stream"}
    headers["Inference-Header-Content-Length"] = header_length
    return RawRequest("POST", oip_infer_path(rng, t), head + tail, headers)


def oip_paths(rng: random.Random, t: Target) -> RawRequest:
    task = rng.choice([t.classification, q(odd_text(rng, 20)), "a" * 300])
    version = rng.choice(["²", "٣", "0", "-1", "1.0", digits(rng), "1", "99999999999", "1²"])
    suffix = rng.choice(["", "/ready"])
    return RawRequest("GET", f"/v2/models/{task}/versions/{q(version)}{suffix}")


def repository(rng: random.Random, t: Target) -> RawRequest:
    path = rng.choice(
        [
            "/v2/repository/index",
            f"/v2/repository/models/{t.classification}/load",
            f"/v2/repository/models/{t.embedding}/unload",
        ]
    )
    body = rng.choice(
        [
            b"",
            b"[" * 40_000,
            _json({"ready": True}),
            _json({"parameters": {"config": odd_text(rng)}}),
            b'{"ready": ' + digits(rng).encode() + b"}",
            mutate(rng, _json({"parameters": {"a": [1, 2]}})),
        ]
    )
    headers = {"Content-Type": "application/json"}
    if "/models/" in path and rng.random() < 0.5:
        headers["Authorization"] = rng.choice(
            ["Bearer ", "Bearer x", "Basic a", "Bearer " + "t" * 9000]
        )
    return RawRequest("POST", path, body, headers)


def headers_family(rng: random.Random, t: Target) -> RawRequest:
    headers = {
        "Content-Type": rng.choice(
            [
                "application/json",
                "APPLICATION/JSON; charset=latin-1",
                "text/plain",
                "application/json;;;",
                "",
                "multipart/form-data; boundary=\u00ff",
                "a" * 5000,
            ]
        ),
        "X-Request-ID": rng.choice(["ok-1", "x" * 5000, "\u00ff\u00fe", "a b", ""]),
    }
    if rng.random() < 0.5:
        headers["Authorization"] = rng.choice(["Bearer", "Bearer  ", "x" * 8000, "Bearer \u00ff"])
    if rng.random() < 0.3:
        headers["Content-Encoding"] = rng.choice(["gzip", "br", "identity", "x"])
    return RawRequest("POST", "/v1/predict", _valid_predict_json(t), headers)


def traffic(rng: random.Random, t: Target) -> RawRequest:
    key = rng.choice(["1", "0", "-1", "²", digits(rng), "\ud800", "1.0", ""])
    value = odd_int_literal(rng)
    body = f'{{"traffic": {{{json.dumps(key)}: {value}}}}}'.encode()
    return RawRequest(
        "PUT",
        f"/v1/tuners/{t.classification}/traffic",
        body,
        {"Content-Type": "application/json", "Authorization": f"Bearer {t.admin_token}"},
    )


def tuner_paths(rng: random.Random, t: Target) -> RawRequest:
    name = q(rng.choice([odd_text(rng, 80), "a" * 5000, t.classification + "\ud800"]))
    return RawRequest(rng.choice(["GET", "DELETE"]), f"/v1/tuners/{name}")


Family = Callable[[random.Random, Target], RawRequest]

FAMILIES: dict[str, Family] = {
    "predict-json-tasks": predict_json_tasks,
    "predict-json-integers": predict_json_integers,
    "predict-json-framing": predict_json_framing,
    "predict-multipart": predict_multipart,
    "oip-json": oip_json,
    "oip-binary": oip_binary,
    "oip-paths": oip_paths,
    "oip-repository": repository,
    "headers": headers_family,
    "traffic": traffic,
    "tuner-paths": tuner_paths,
}


def generate(n: int, seed: int, target: Target) -> Iterator[HostileCase]:
    """``n`` cases, the families taken in turn, from one seeded generator."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    for i in range(n):
        family = names[i % len(names)]
        yield HostileCase(family, FAMILIES[family](rng, target))

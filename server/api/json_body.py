"""Request JSON parsed with bounds, and never in one long stretch that holds the event loop.

``json.loads`` alone lets a client through with ``[[[[...`` a few hundred kB deep (it
recurses), an integer of 4,301 digits (Python's int parsing limit raises a bare
``ValueError``), and, worse for everyone else, it is one C call that holds the GIL for the
whole parse: a worker thread does not help the event loop while it runs. So, before and
during the parse:

* a JSON body is at most :data:`MAX_JSON_BYTES` (larger payloads have streamed forms:
  multipart for ``/v1/predict``, the binary tensor extension for the OIP);
* it holds at most :data:`MAX_JSON_VALUES` values, counted (``,`` and ``:``) in slices
  before parsing: a body of a million ``[]`` takes a second of GIL to parse;
* numbers are parsed by Python callbacks, which bound an integer's digits and give the
  interpreter a point to hand the GIL to the event loop between two numbers;
* nesting is at most :data:`MAX_JSON_DEPTH`;
* an object names each key once: with ``{"tasks": [a], "tasks": [b]}`` Python keeps the
  last, another parser (a proxy, a gateway that checked the request) the first, so the
  server would answer a request nobody on the way saw.

Every route reading a JSON body goes through :func:`load_json` and, above
:data:`INLINE_PARSE_BYTES`, :func:`parse_off_loop` (a worker thread).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

MAX_JSON_BYTES = 8 * 1024 * 1024
"""Largest JSON body (or OIP JSON header); parsing it holds the GIL for tens of ms."""
MAX_JSON_VALUES = 2**18
"""Most values (array items and object members) of one JSON body: a 1 x 3 x 224 x 224
pixel tensor fits in JSON; larger tensors go in the binary extension."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects (an OIP tensor of the largest allowed rank nested
element by element fits, with room to spare)."""
MAX_INT_DIGITS = 40
"""Longest integer literal (2**128 has 39 digits; no request field needs more)."""
INLINE_PARSE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop (well under a millisecond); larger
ones in a worker thread."""
_SCAN_SLICE = 1 << 20
_CONTAINERS = (list, dict)

T = TypeVar("T")


class JsonBodyError(ValueError):
    """The body is not JSON this server accepts; the message says why, for the client."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large
        """Refused for its size (413) rather than its content."""


def _separators(body: bytes, stop_after: int) -> int:
    """``,`` and ``:`` in ``body``, counted a slice at a time (each count is a short C call,
    so another thread gets the GIL in between), stopping once past ``stop_after``."""
    n = 0
    for start in range(0, len(body), _SCAN_SLICE):
        end = start + _SCAN_SLICE
        n += body.count(b",", start, end) + body.count(b":", start, end)
        if n > stop_after:
            break
    return n


def _int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise JsonBodyError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    return float(text)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict (one C call), refused when a key repeats."""
    doc = dict(pairs)
    if len(doc) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonBodyError(f"key {key[:64]!r} appears more than once in a JSON object")
            seen.add(key)
    return doc


def _depth_exceeds(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests arrays/objects deeper than ``limit`` (iterative: no recursion).

    A container's children are typed with ``map`` (C speed) and only containers are walked,
    so a list of a million numbers costs one pass, not a million Python steps."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = list(node.values()) if isinstance(node, dict) else node
        types = set(map(type, children))
        if list not in types and dict not in types:
            continue
        if depth >= limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, _CONTAINERS))
    return False


def load_json(body: bytes) -> Any:
    """``body`` decoded, refused with :class:`JsonBodyError` when it is not acceptable JSON."""
    if len(body) > MAX_JSON_BYTES:
        raise JsonBodyError(
            f"JSON body of {len(body)} bytes; at most {MAX_JSON_BYTES} (send large payloads "
            "as multipart/form-data or in the binary tensor extension)",
            too_large=True,
        )
    if _separators(body, MAX_JSON_VALUES) > MAX_JSON_VALUES:
        raise JsonBodyError(
            f"more than {MAX_JSON_VALUES} JSON values (send large tensors in the binary "
            "tensor extension)",
            too_large=True,
        )
    try:
        doc = json.loads(body, parse_int=_int, parse_float=_float, object_pairs_hook=_object)
    except JsonBodyError:
        raise
    except RecursionError:
        raise JsonBodyError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise JsonBodyError(f"body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise JsonBodyError("body is not valid JSON: not UTF-8 text") from None
    except ValueError:  # defensive: any other conversion the decoder refuses
        raise JsonBodyError("body is not valid JSON: a value cannot be converted") from None
    if isinstance(doc, _CONTAINERS) and _depth_exceeds(doc, MAX_JSON_DEPTH):
        raise JsonBodyError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return doc


async def parse_off_loop(parse: Callable[..., T], body: bytes, *args: Any) -> T:
    """``parse(body, *args)``: inline for a small body, in a worker thread for a large one."""
    if len(body) > INLINE_PARSE_BYTES:
        return await asyncio.to_thread(parse, body, *args)
    return parse(body, *args)

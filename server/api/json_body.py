"""Request JSON parsed with bounds: nesting depth, integer size, and off the event loop when large.

``json.loads`` alone lets a client through with ``[[[[...`` a few hundred kB deep (it recurses),
an integer of 4,301 digits (Python's int parsing limit raises a bare ``ValueError``), or a body
that holds the event loop for tens of milliseconds. Every route reading a JSON body goes
through :func:`load_json` (a stable error) and, above :data:`INLINE_PARSE_BYTES`,
:func:`parse_off_loop` (a worker thread).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a request may use (an OIP tensor of the largest
allowed rank nested element by element fits, with room to spare)."""
INLINE_PARSE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop (well under a millisecond); larger
ones in a worker thread, so a megabyte of JSON never stalls the other requests."""

T = TypeVar("T")


class JsonBodyError(ValueError):
    """The body is not JSON this server accepts; the message says why, for the client."""


def _depth_exceeds(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests arrays/objects deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, list | dict):
                stack.append((child, depth + 1))
    return False


def load_json(body: bytes | str) -> Any:
    """``body`` decoded, refused with :class:`JsonBodyError` when it is not acceptable JSON.

    Integers are bounded by Python's own int parsing limit (4,300 digits; the request's
    fields bound them further where they are used) and nesting by :data:`MAX_JSON_DEPTH`.
    """
    try:
        doc = json.loads(body)
    except RecursionError:
        raise JsonBodyError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise JsonBodyError(f"body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise JsonBodyError("body is not valid JSON: not UTF-8 text") from None
    except ValueError:  # int("9" * 4301): Python's integer string conversion limit
        raise JsonBodyError("body is not valid JSON: an integer has too many digits") from None
    if isinstance(doc, list | dict) and _depth_exceeds(doc, MAX_JSON_DEPTH):
        raise JsonBodyError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return doc


async def parse_off_loop(parse: Callable[..., T], body: bytes, *args: Any) -> T:
    """``parse(body, *args)``: inline for a small body, in a worker thread for a large one."""
    if len(body) > INLINE_PARSE_BYTES:
        return await asyncio.to_thread(parse, body, *args)
    return parse(body, *args)

"""Tuner names: what a store accepts as a key (and so as a directory or Redis key part).

Plain names match :data:`tuners_store.config.NAME_PATTERN`. Tenants, when they exist, use
``tenant/name`` where both parts match the same pattern; nothing else may contain a slash.
"""

from __future__ import annotations

from tuners_store.config import NAME_PATTERN, NAME_RE
from tuners_store.errors import InvalidName

MAX_NAME_CHARS = 64
"""Longest plain name (also the longest tenant part)."""


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid plain tuner name, else raise :class:`InvalidName`."""
    if not isinstance(name, str):
        raise InvalidName(f"a tuner name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidName("a tuner name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidName(f"tuner name is {len(name)} characters; at most {MAX_NAME_CHARS}")
    if not name.isascii():
        raise InvalidName(f"tuner name {name!r} has non-ASCII characters; use {NAME_PATTERN}")
    if "/" in name:
        raise InvalidName(f"tuner name {name!r} must not contain '/'")
    # fullmatch on top of the anchored pattern: ``$`` alone would accept a trailing newline.
    if not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"tuner name {name!r} is not allowed: lower-case letters, digits, '.', '_', '-', "
            f"starting with a letter or digit ({NAME_PATTERN})"
        )
    return name


def validate_qualified_name(name: object) -> str:
    """Return ``name`` if it is ``name`` or ``tenant/name`` with both parts valid plain names."""
    if not isinstance(name, str):
        raise InvalidName(f"a tuner name must be a string, got {type(name).__name__}")
    parts = name.split("/")
    if len(parts) > 2:
        raise InvalidName(f"tuner name {name!r} has more than one '/'; use tenant/name")
    for part in parts:
        validate_name(part)
    return name


def split_qualified_name(name: str) -> tuple[str | None, str]:
    """``"t/n"`` -> ``("t", "n")``; ``"n"`` -> ``(None, "n")``. The name must be valid."""
    tenant, sep, plain = name.rpartition("/")
    return (tenant if sep else None), plain

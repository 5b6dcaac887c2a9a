"""Failures of the tuner stores and of artifact validation: one taxonomy, a stable ``code`` each.

The server maps codes to HTTP statuses once; nothing here knows about HTTP.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every store and artifact failure: ``code`` is stable, ``message`` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class InvalidName(StoreError):  # noqa: N818 (names fixed by the API contract)
    """A tuner name that does not match the naming rules."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_name", message)


class TunerNotFound(StoreError):  # noqa: N818 (names fixed by the API contract)
    """No tuner of that name (never registered, or deleted)."""

    def __init__(self, name: str) -> None:
        super().__init__("tuner_not_found", f"no tuner named {name!r}")
        self.name = name


class VersionNotFound(StoreError):  # noqa: N818 (names fixed by the API contract)
    """The tuner exists but has no such version."""

    def __init__(self, name: str, version: int) -> None:
        super().__init__("version_not_found", f"tuner {name!r} has no version {version}")
        self.name = name
        self.version = version


class InvalidTraffic(StoreError):  # noqa: N818 (names fixed by the API contract)
    """Canary weights that name unknown versions, are negative, or sum to zero."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_traffic", message)


class VersionInUse(StoreError):  # noqa: N818 (names fixed by the API contract)
    """A version that is current or takes canary traffic, deleted without ``force``, or the
    only version of its name."""

    def __init__(self, name: str, version: int, why: str) -> None:
        super().__init__("version_in_use", f"tuner {name!r} version {version} {why}")
        self.name = name
        self.version = version


class StoreUnavailable(StoreError):  # noqa: N818 (names fixed by the API contract)
    """The backing store cannot be reached (Redis down, filesystem unwritable); retry later."""

    def __init__(self, message: str) -> None:
        super().__init__("store_unavailable", message)


class StoreCorrupt(StoreError):  # noqa: N818 (names fixed by the API contract)
    """Stored bytes do not match their recorded sha256: never served."""

    def __init__(self, message: str) -> None:
        super().__init__("store_corrupt", message)

"""Tuner kinds by name: ``kind -> class``, filled by each tuner module when imported."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from restuning.tuners.base import ResTuner

TUNERS: dict[str, type[ResTuner]] = {}
"""Every registered Res-Tuner class by its ``kind`` (the config's ``bypass.tuner``)."""

_T = TypeVar("_T", bound="type[ResTuner]")


def register_tuner(cls: _T) -> _T:
    """Class decorator adding ``cls`` under ``cls.kind``; a kind registered twice raises."""
    if cls.kind in TUNERS:
        raise ValueError(f"tuner kind {cls.kind!r} is already registered by {TUNERS[cls.kind]}")
    TUNERS[cls.kind] = cls
    return cls


def tuner_class(kind: str) -> type[ResTuner]:
    """The class registered for ``kind``."""
    try:
        return TUNERS[kind]
    except KeyError:
        raise ValueError(f"unknown tuner kind {kind!r}; known: {sorted(TUNERS)}") from None

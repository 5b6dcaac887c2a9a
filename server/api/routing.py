"""Routes whose path carries a tuner name: one segment (``name``) or, with tenants on, two
(``tenant/name``).

The name parameters are ``{name:tuner}`` (one or more segments, so ``tenant/name`` fits);
what a path means then depends on the server's mode, decided at match time: with tenants off
``/v1/tuners/a/traffic`` is the traffic of ``a``, with tenants on it is the tuner
``a/traffic``. A route whose name parameter has the wrong number of segments (or an empty
one) does not match, so the next route gets its chance and a path fitting none is 404 as
before. OpenAPI and the metrics show the plain template (``/v1/tuners/{name}``).
"""

from __future__ import annotations

from fastapi.routing import APIRoute
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Match
from starlette.types import Scope


class TunerNameConvertor(Convertor[str]):
    """``{name:tuner}``: one or more non-empty segments, any character but ``/`` in each.

    Unlike ``{name:path}`` (``.*``) it keeps a trailing newline in the name, so
    ``/v1/tuners/a%0A`` is the invalid name ``"a\\n"``, not the tuner ``a``.
    """

    regex = "[^/]+(?:/[^/]+)*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("tuner", TunerNameConvertor())


def name_segments(scope: Scope) -> int:
    """Path segments of a tuner name on the app serving ``scope``: 2 with tenants, else 1."""
    app = scope.get("app")
    settings = getattr(getattr(app, "state", None), "settings", None)
    return 2 if getattr(settings, "tenants_enabled", False) else 1


def is_tuner_name_path(value: str, segments: int) -> bool:
    """Whether a ``{...:tuner}`` value is a name of ``segments`` non-empty segments."""
    parts = value.split("/")
    return len(parts) == segments and all(parts)


class TunerRoute(APIRoute):
    """An API route whose ``{...:tuner}`` parameters are tuner names of the app's mode."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match == Match.NONE:
            return match, child
        segments = name_segments(scope)
        params = child.get("path_params", {})
        for param, convertor in self.param_convertors.items():
            if isinstance(convertor, TunerNameConvertor) and not is_tuner_name_path(
                str(params.get(param, "")), segments
            ):
                return Match.NONE, {}
        return match, child

"""Dependencies of the routes: the service and settings from ``app.state``, and admin auth."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.engine.service import InferenceService
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings


def get_service(request: Request) -> InferenceService:
    """The app's inference service."""
    service: InferenceService = request.app.state.service
    return service


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_metrics(request: Request) -> Metrics:
    """The app's metrics registry."""
    metrics: Metrics = request.app.state.metrics
    return metrics


ServiceDep = Annotated[InferenceService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

# auto_error=False: a missing or malformed header is answered by require_admin with the
# project's problem body instead of FastAPI's default; the scheme still shows in /docs.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="`Authorization: Bearer <RESTUNE_ADMIN_TOKEN>`",
)


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Let the request through only with the configured admin bearer token.

    No token configured: every mutating route is refused (403), never open. Missing token:
    401 with a Bearer challenge. Wrong token: 403. The comparison takes the same time
    wherever the tokens differ.
    """
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise ApiError(
            "forbidden",
            "admin routes are disabled: set RESTUNE_ADMIN_TOKEN on the server to enable them",
        )
    if credentials is None:
        raise ApiError("unauthorized", "this route needs 'Authorization: Bearer <admin token>'")
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise ApiError("forbidden", "the bearer token is not the admin token")


AdminDep = Annotated[None, Depends(require_admin)]

"""Dependencies of the routes: the service, settings and tenancy from ``app.state``, and
the principal (who is calling) of read and mutating routes."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.engine.service import InferenceService
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings
from server.tenancy import ADMIN, ANONYMOUS, Principal, Tenancy


async def get_service(request: Request) -> InferenceService:
    """The app's inference service.

    These getters are ``async`` only so FastAPI calls them on the event loop: a plain ``def``
    dependency runs in a worker thread, a hop that cost ~0.5 ms per request under load.
    """
    service: InferenceService = request.app.state.service
    return service


async def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
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
    description="`Authorization: Bearer <token>`: the admin token, or with tenants on a "
    "writer token of the tuner's tenant",
)


async def get_tenancy(request: Request) -> Tenancy:
    """The app's tokens, tenants and quotas."""
    tenancy: Tenancy = request.app.state.tenancy
    return tenancy


TenancyDep = Annotated[Tenancy, Depends(get_tenancy)]


async def require_admin(
    settings: SettingsDep,
    tenancy: TenancyDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The principal of a mutating route: the admin token, an admin token of the tokens
    file, or (tenants on) a writer token; the route checks the tuner's tenant.

    No token configured: every mutating route is refused (403), never open. Missing token:
    401 with a Bearer challenge. Wrong token: 403. Comparisons take the same time wherever
    the tokens differ. (Request rates were charged before routing: server.middleware.)
    """
    if not tenancy.issues_tokens:
        raise ApiError(
            "forbidden",
            "admin routes are disabled: set RESTUNE_ADMIN_TOKEN on the server to enable them",
        )
    if credentials is None:
        raise ApiError("unauthorized", "this route needs 'Authorization: Bearer <admin token>'")
    expected = settings.admin_token.get_secret_value() if settings.admin_token else ""
    presented = credentials.credentials
    if expected and hmac.compare_digest(presented.encode(), expected.encode()):
        return ADMIN
    principal = tenancy.authenticate(presented)
    if principal is None:
        raise ApiError("forbidden", "the bearer token is not the admin token")
    if principal.scope in ("reader", "metrics"):
        raise ApiError("forbidden", f"a {principal.scope} token may not change tuners")
    return principal


async def require_reader(request: Request, tenancy: TenancyDep) -> Principal:
    """The principal of a read or inference route.

    Tenants off: anyone (the default tenant). Tenants on: a bearer token of any scope, 401
    without one, 403 for one nobody issued; the route checks the tuner's tenant. Not
    declared as a security scheme: with tenants off these routes are open, and the OpenAPI
    of a tenant server adds it (``server.app``).
    """
    if not tenancy.enabled:
        return ANONYMOUS
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError("unauthorized", "this route needs 'Authorization: Bearer <token>'")
    principal = tenancy.authenticate(presented.strip())
    if principal is None:
        raise ApiError("forbidden", "the bearer token was not issued by this server")
    return principal


async def metrics_filter(request: Request, tenancy: TenancyDep) -> Callable[[str], bool] | None:
    """Which tuners' series a ``/metrics`` scrape shows; ``None``: every series.

    Tenants off: everything (one tenant). Tenants on: an admin or ``metrics`` token sees
    everything; a tenant's token its own tuners' series; no token (or a token nobody issued)
    none, so an anonymous scrape never names a tenant's tuner. Series without a tuner label
    (requests by route, batches, the backbone) show to everyone.
    """
    if not tenancy.enabled:
        return None
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    principal = tenancy.authenticate(presented.strip()) if scheme.lower() == "bearer" else None
    if principal is None:
        return _no_task
    if principal.scope in ("admin", "metrics"):
        return None
    return functools.partial(tenancy.visible, principal)


def _no_task(task: str) -> bool:
    return False


MetricsFilterDep = Annotated[Callable[[str], bool] | None, Depends(metrics_filter)]
"""``/metrics``: which ``task`` label values the caller may see (``None``: all)."""
AdminDep = Annotated[Principal, Depends(require_admin)]
"""Mutating routes: the principal allowed to change tuners (check its tenant per name)."""
ReaderDep = Annotated[Principal, Depends(require_reader)]
"""Read and inference routes: the caller (check its tenant per name)."""

"""Per-tenant request rates, enforced before routing.

A request over its tenant's rate (:meth:`server.tenancy.Tenancy.charge`) is answered
429 ``rate_limited`` with Retry-After right here: no handler runs and its body is never
read. A tenant flooding the server so costs little of what the other tenants share (measured
on a 2-core box: 1.3 ms of server CPU per refusal when the refusal came from a route
dependency, about a third of that here; see docs/VERSIONS_AND_TENANTS.md).

Which bucket: with tenants on, that of the bearer token's tenant (admins and requests
without a valid token are not charged; the route answers those with 401/403); with tenants
off, the default tenant's, for every request but the admin's.
"""

from __future__ import annotations

from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import ApiError
from server.problems import problem_response
from server.tenancy import Tenancy

TENANT_PATHS = ("/v1/", "/v2/models", "/v2/repository")
"""Paths whose requests count against a tenant (the API; not health, metrics or docs)."""


def bearer_token(scope: Scope) -> str | None:
    """The bearer token of a request's ``Authorization`` header, if any."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


class TenantRateLimitMiddleware:
    """Charges each API request to its tenant's bucket; answers 429 once it is empty."""

    def __init__(self, app: ASGIApp, tenancy: Tenancy) -> None:
        self.app = app
        self.tenancy = tenancy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if (
            scope["type"] != "http"
            or not self.tenancy.limits_rates
            or not path.startswith(TENANT_PATHS)
        ):
            await self.app(scope, receive, send)
            return
        principal = self.tenancy.rate_principal(bearer_token(scope))
        try:
            if principal is not None:
                await self.tenancy.charge(principal)
        except ApiError as exc:
            _route_for_metrics(scope)
            # problem+json, or the protocol's own error shape under /v2.
            await problem_response(exc, scope)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _route_for_metrics(scope: Scope) -> None:
    """Put the route a refused request was for in ``scope`` (its metrics label), as routing
    would have."""
    router = getattr(scope.get("app"), "router", None)
    for route in getattr(router, "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            scope["route"] = route
            return

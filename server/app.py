"""The FastAPI application: routers, middleware, error handlers and the service's lifespan.

Thin on purpose: routes get the :class:`InferenceService` from ``app.state`` and never touch
tensors; every failure leaves as one problem+json shape (:mod:`server.problems`).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.types import Scope

from server.api import health, predict, tuners
from server.api.schemas import document_problems
from server.demo import DemoStatus, demo_in_background
from server.engine.service import InferenceService
from server.metrics import Metrics
from server.middleware.body_limit import BodyLimit, BodyLimitMiddleware, LimitFor
from server.middleware.rate_limit import TenantRateLimitMiddleware
from server.middleware.request_context import RequestContextMiddleware
from server.problems import install_exception_handlers
from server.settings import Settings
from server.tenancy import Tenancy

STATIC_DIR = Path(__file__).parent / "static"
OPTIONAL_ROUTERS = ("server.api.oip",)
"""Routers written elsewhere, included when their module is present."""


TUNERS_PREFIX = "/v1/tuners/"


def body_limit_for(settings: Settings) -> LimitFor:
    """Body limit per request: artifact uploads get the artifact limit, the rest (traffic
    splits included) the request limit."""
    request = BodyLimit(settings.max_request_bytes)
    artifact = BodyLimit(settings.max_artifact_bytes, "artifact_too_large", "the artifact")
    segments = 2 if settings.tenants_enabled else 1  # of a tuner name: PUT /v1/tuners/{name}

    def limit_for(scope: Scope) -> BodyLimit:
        path = str(scope.get("path", ""))
        upload = (
            scope.get("method") == "PUT"
            and path.startswith(TUNERS_PREFIX)
            and len(path[len(TUNERS_PREFIX) :].split("/")) == segments
        )
        return artifact if upload else request

    return limit_for


def _optional_routers() -> Iterable[APIRouter]:
    for module_name in OPTIONAL_ROUTERS:
        if importlib.util.find_spec(module_name) is None:
            continue
        # A module that exists but fails to import is a bug: let it raise.
        module = importlib.import_module(module_name)
        router = getattr(module, "router", None)
        if isinstance(router, APIRouter):
            yield router


def create_app(settings: Settings, service: InferenceService | None = None) -> FastAPI:
    """The app for ``settings``; builds its own service (and metrics) unless given one."""
    # A bad tokens file fails here, before anything listens.
    tenancy = Tenancy.from_settings(settings)
    if service is None:
        metrics = Metrics(
            max_task_labels=settings.max_task_metric_labels,
            max_version_labels=settings.max_version_metric_labels,
        )
        service = InferenceService(settings, metrics)
    else:
        metrics = service.metrics
    tenancy.rates.on_fallback = metrics.rate_limit_fallbacks.inc
    running = service
    demo = DemoStatus()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await running.start()
        try:
            # With RESTUNE_DEMO, an empty store gets the demo tuners, trained beside the
            # already-serving app (they appear when ready).
            async with demo_in_background(running, settings, demo):
                yield
        finally:
            # Uvicorn has stopped accepting and waited for in-flight requests; stop() drains
            # whatever is still queued in the batcher.
            await running.stop()

    # The docs pages load Swagger UI and ReDoc from files installed with the server, not from
    # a CDN: an offline or firewalled host showed a blank /docs.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS_URL,
        title="restune",
        summary="One frozen backbone forward, many task tuners.",
        description=(
            "Multi-task vision inference with Res-Tuning bypass tuners. Errors are RFC 9457 "
            "`application/problem+json` bodies with a stable `code`."
        ),
        version=_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    app.state.tenancy = tenancy
    app.state.demo = demo

    install_exception_handlers(app)
    for router in (predict.router, tuners.router, health.router, *_optional_routers()):
        app.include_router(router)
    _mount_playground(app)

    # Added last = outermost: the request id and metrics see every response, 413s included.
    app.add_middleware(TenantRateLimitMiddleware, tenancy=tenancy)
    app.add_middleware(
        BodyLimitMiddleware,
        limit_for=body_limit_for(settings),
        body_timeout_s=settings.request_body_timeout_s,
    )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    _document_problems(app)
    return app


DOCS_ASSETS_URL = "/static/docs"
"""Where the Swagger UI and ReDoc assets of ``/docs`` and ``/redoc`` are served."""
TENANT_SCHEME = "TenantToken"
_TENANT_ROUTES = ("/v1/", "/v2/models", "/v2/repository")


def _document_problems(app: FastAPI) -> None:
    """Post-process the generated OpenAPI once so it documents problem+json errors and, with
    tenants on, the token every tuner route needs."""
    tenants = app.state.settings.tenants_enabled

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = document_problems(FastAPI.openapi(app))
            if tenants:
                _document_tenant_tokens(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_tenant_tokens(spec: dict[str, Any]) -> None:
    """Declare the bearer token on every tuner route (read routes are open without tenants,
    so their dependency declares none)."""
    schemes = spec.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[TENANT_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A token of the tuner's tenant (reader, writer) or an admin token",
    }
    for path, operations in spec.get("paths", {}).items():
        if not path.startswith(_TENANT_ROUTES):
            continue
        for operation in operations.values():
            operation.setdefault("security", [{TENANT_SCHEME: []}])


def _mount_playground(app: FastAPI) -> None:
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        return

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(index, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("restune")
    except Exception:  # not installed (running from a source tree)
        return "0.0.0"

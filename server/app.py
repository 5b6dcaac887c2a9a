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
from starlette.types import Scope

from server.api import health, predict, tuners
from server.api.schemas import document_problems
from server.demo import demo_in_background
from server.engine.service import InferenceService
from server.metrics import Metrics
from server.middleware.body_limit import BodyLimit, BodyLimitMiddleware, LimitFor
from server.middleware.request_context import RequestContextMiddleware
from server.problems import install_exception_handlers
from server.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
OPTIONAL_ROUTERS = ("server.api.oip",)
"""Routers written elsewhere, included when their module is present."""


def body_limit_for(settings: Settings) -> LimitFor:
    """Body limit per request: artifact uploads get the artifact limit, the rest the request
    limit."""
    request = BodyLimit(settings.max_request_bytes)
    artifact = BodyLimit(settings.max_artifact_bytes, "artifact_too_large", "the artifact")

    def limit_for(scope: Scope) -> BodyLimit:
        if scope.get("method") == "PUT" and str(scope.get("path", "")).startswith("/v1/tuners/"):
            return artifact
        return request

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
    if service is None:
        metrics = Metrics(max_task_labels=settings.max_task_metric_labels)
        service = InferenceService(settings, metrics)
    else:
        metrics = service.metrics
    running = service

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await running.start()
        try:
            # With RESTUNE_DEMO, an empty store gets the demo tuners, trained beside the
            # already-serving app (they appear when ready).
            async with demo_in_background(running, settings):
                yield
        finally:
            # Uvicorn has stopped accepting and waited for in-flight requests; stop() drains
            # whatever is still queued in the batcher.
            await running.stop()

    app = FastAPI(
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

    install_exception_handlers(app)
    for router in (predict.router, tuners.router, health.router, *_optional_routers()):
        app.include_router(router)
    _mount_playground(app)

    # Added last = outermost: the request id and metrics see every response, 413s included.
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit_for(settings))
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    _document_problems(app)
    return app


def _document_problems(app: FastAPI) -> None:
    """Post-process the generated OpenAPI once so it documents problem+json errors."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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

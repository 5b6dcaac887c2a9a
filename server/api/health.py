"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.deps import MetricsDep, MetricsFilterDep, ServiceDep
from server.api.schemas import Live, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Live, summary="Liveness")
async def healthz() -> Live:
    """200 while the process serves HTTP; it checks nothing else on purpose (a liveness
    probe that fails on a dependency restarts healthy pods)."""
    return Live()


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness",
    responses={503: {"model": Ready, "description": "Not ready; `reasons` says why"}},
)
async def readyz(request: Request, service: ServiceDep) -> JSONResponse:
    """200 when the replica can serve predictions, else 503 with reasons.

    Ready means: backbone loaded, a tuner index read from the store at least once, accepting.
    A store outage after that shows in ``store`` (``reachable``, ``index: stale``) and in
    ``restune_tuner_store_up``, not here: loaded tuners keep answering, and an outage would
    otherwise take every replica out of its load balancer at once."""
    report: dict[str, Any] = await service.ready()
    demo = getattr(request.app.state, "demo", None)
    if demo is not None and demo.state != "off":
        report["demo"] = demo.report()  # demo tuners appear while ready; this says how far
    ready = bool(report.get("ready"))
    if not ready and not report.get("reasons"):
        report["reasons"] = not_ready_reasons(report)
    return JSONResponse(report, status_code=200 if ready else 503)


def not_ready_reasons(report: dict[str, Any]) -> list[str]:
    """Human reasons for a not-ready report, from the service's readiness fields."""
    reasons = []
    if not report.get("backbone_loaded", True):
        reasons.append("backbone not loaded")
    store = report.get("store")
    if isinstance(store, dict) and store.get("index") == "missing":
        error = store.get("error")
        reasons.append(
            f"no tuner index read from the store yet{': ' + str(error) if error else ''}"
        )
    if not report.get("accepting", True):
        reasons.append("not accepting requests (starting or draining)")
    return reasons or ["not ready"]


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Exposition text"}},
)
async def metrics(request: Request, metrics: MetricsDep, shows_task: MetricsFilterDep) -> Response:
    """Every ``restune_*`` and ``process_*`` metric, in OpenMetrics when the scraper accepts
    it, else the Prometheus text format. With tenants on, per-tuner series need a token: an
    admin or ``metrics`` token sees all, a tenant's token its own."""
    body, content_type = metrics.exposition(shows_task, request.headers.get("accept", ""))
    return Response(body, headers={"Content-Type": content_type})

"""``/v1/tuners``: list, describe, register (admin) and delete (admin) task tuners, and
split their traffic between versions (admin).

With tenants on, ``{name}`` is ``tenant/name`` (two path segments) and the caller's token
must belong to that tenant (:mod:`server.tenancy`); listings show the caller's tenant only.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.api.deps import AdminDep, ReaderDep, ServiceDep, TenancyDep
from server.api.json_body import JsonBodyError, load_json
from server.api.routing import TunerRoute
from server.api.schemas import (
    Deleted,
    Registered,
    TrafficIn,
    TrafficOut,
    TunerDetail,
    TunerList,
    VersionDeleted,
    problem_responses,
)
from server.engine.registry import sha256_of
from server.errors import ApiError
from server.problems import validation_error

router = APIRouter(prefix="/v1/tuners", tags=["tuners"], route_class=TunerRoute)

TunerName = Annotated[
    str,
    Path(
        description="Tuner name: lower-case letters, digits, '.', '_', '-'; with tenants on "
        "`tenant/name`"
    ),
]
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1, description="A version number")]
MAX_TRAFFIC_BODY_BYTES = 16 * 1024
"""A traffic split is a few dozen bytes; more is not one."""

# Artifacts are raw bytes; a form or JSON body here is a client mistake worth naming.
_REFUSED_MEDIA = ("multipart/form-data", "application/json", "application/x-www-form-urlencoded")

_ARTIFACT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The tuner artifact: a .safetensors file with restune metadata.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get("", response_model=TunerList, summary="List registered tuners")
async def list_tuners(
    service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> dict[str, Any]:
    """Every registered tuner's current version, sorted by name (the caller's tenant's)."""
    rows = await service.registry.list_tuners()
    return {"tuners": [row.to_dict() for row in rows if tenancy.visible(principal, row.info.name)]}


@router.get(
    "/{name:tuner}/traffic",
    response_model=TrafficOut,
    summary="Traffic split of one tuner",
    responses=problem_responses(401, 403, 404),
)
async def get_traffic(
    name: TunerName, service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> dict[str, Any]:
    """The weights requests for ``name`` (no ``@version``) are split by on this replica."""
    tenancy.check_read(principal, name)
    info = await service.registry.current_or_404(name)
    return _traffic_body(name, info.version, service.registry.traffic(name))


@router.put(
    "/{name:tuner}/traffic",
    response_model=TrafficOut,
    summary="Split traffic between versions: canary, rollback (admin)",
    responses=problem_responses(401, 403, 404, 413, 415, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": TrafficIn.model_json_schema()}},
        }
    },
)
async def set_traffic(
    request: Request,
    principal: AdminDep,
    name: TunerName,
    service: ServiceDep,
    tenancy: TenancyDep,
) -> dict[str, Any]:
    """Weights per version, e.g. ``{"traffic": {"3": 90, "4": 10}}``: each image goes to one
    version, chosen by its pixel hash (a retry gets the same one), in proportion to the
    weights, on every replica. All the weight on one version (``{"3": 100}``) makes it the
    current version: the rollback. Every version with weight is loaded first."""
    tenancy.check_write(principal, name)
    body = await request.body()
    if len(body) > MAX_TRAFFIC_BODY_BYTES:
        raise ApiError("payload_too_large", f"a traffic body is at most {MAX_TRAFFIC_BODY_BYTES}")
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            "unsupported_media_type",
            f'send application/json {{"traffic": {{"<version>": <weight>}}}}, not '
            f"{media_type or 'no type'}",
        )
    try:
        # load_json first: it refuses a key given twice ({"1": 0, "1": 100}) that a plain
        # parse would settle silently by keeping the last.
        wanted = TrafficIn.model_validate(load_json(body))
    except JsonBodyError as exc:
        raise ApiError("validation_error", f"invalid JSON body: {exc}") from None
    except ValidationError as exc:
        raise validation_error([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    weights = await service.registry.set_traffic(name, wanted.traffic)
    info = await service.registry.current_or_404(name)
    return _traffic_body(name, info.version, weights)


def _traffic_body(name: str, current: int, weights: dict[int, int]) -> dict[str, Any]:
    return {
        "name": name,
        "current": current,
        "traffic": {str(v): w for v, w in sorted(weights.items())},
    }


@router.get(
    "/{name:tuner}",
    response_model=TunerDetail,
    summary="Describe one tuner",
    responses=problem_responses(401, 403, 404),
)
async def describe_tuner(
    name: TunerName, service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> dict[str, Any]:
    """The tuner's current version, full config, training summary, stored versions with the
    answers each gave on this replica, and the traffic split."""
    tenancy.check_read(principal, name)
    detail = await service.registry.describe(name)
    body: dict[str, Any] = detail.to_dict()
    return body


@router.put(
    "/{name:tuner}",
    response_model=Registered,
    status_code=201,
    summary="Register a tuner artifact (admin)",
    responses={
        200: {"model": Registered, "description": "These exact bytes already are a version"},
        **problem_responses(401, 403, 409, 413, 415, 422, 429, 503),
    },
    openapi_extra=_ARTIFACT_BODY,
)
async def register_tuner(
    request: Request,
    principal: AdminDep,
    name: TunerName,
    service: ServiceDep,
    tenancy: TenancyDep,
    promote: Annotated[
        bool | None,
        Query(
            description="true: make this version current and clear any canary split; "
            "false: store and load it only (it takes traffic once promoted or given weight); "
            "absent: promote unless a canary split is set. A name's first version is always "
            "current."
        ),
    ] = None,
) -> JSONResponse:
    """Validate the artifact (header, shapes, values, backbone fingerprint), admit it against
    the running backbone (its dims and depth, then a dry run of the built tuner; 422
    ``artifact_incompatible`` / ``artifact_dry_run_failed``, nothing stored), store and load
    it, and make it the current version of ``name`` on every replica as ``promote`` says
    (``current`` in the answer). Re-uploading identical bytes answers 200 with the existing
    version. Over the tenant's tuner or byte quota: 429 ``quota_exceeded``."""
    tenancy.check_write(principal, name)
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type in _REFUSED_MEDIA:
        raise ApiError(
            "unsupported_media_type",
            f"send the artifact file as the raw body (application/octet-stream), not "
            f"{media_type}; e.g. curl -T tuner.safetensors",
        )
    # The body-limit middleware stops an artifact over max_artifact_bytes while it streams.
    data = await request.body()
    if not data:
        raise ApiError("validation_error", "the body is empty; send the artifact bytes")
    tenant = tenancy.tenant_of(name)
    async with tenancy.upload_slot(tenant):
        digest = None
        if tenancy.quota(tenant).limits_storage:
            digest = await sha256_of(data)
            await tenancy.check_upload(tenant, name, data, digest, service.registry)
        info, created = await service.registry.register(name, data, sha256=digest, promote=promote)
    body = Registered(
        name=info.name,
        version=info.version,
        sha256=info.sha256,
        current=service.registry.is_current(name, info.version),
    )
    return JSONResponse(
        body.model_dump(),
        status_code=201 if created else 200,
        headers={"Location": f"/v1/tuners/{info.name}"},
    )


@router.delete(
    "/{name:tuner}/versions/{version}",
    response_model=VersionDeleted,
    summary="Delete one version of a tuner (admin)",
    responses=problem_responses(401, 403, 404, 409, 503),
)
async def delete_version(
    principal: AdminDep,
    name: TunerName,
    version: VersionNumber,
    service: ServiceDep,
    tenancy: TenancyDep,
    force: Annotated[
        bool,
        Query(
            description="Also delete the current version (the newest remaining one becomes "
            "current) or a version with canary weight (it leaves the split)"
        ),
    ] = False,
) -> VersionDeleted:
    """Remove one version from the store; every replica stops serving it. The current
    version, a version with weight in the split, or the only version answer 409
    ``version_in_use`` (the first two unless ``force``). Answers once the requests using it
    here are done (at most ``unload_drain_s``)."""
    tenancy.check_write(principal, name)
    await service.registry.delete_version(name, version, force=force)
    info = await service.registry.current_or_404(name)
    return VersionDeleted(name=name, version=version, current=info.version)


@router.delete(
    "/{name:tuner}",
    response_model=Deleted,
    summary="Delete a tuner and all its versions (admin)",
    responses=problem_responses(401, 403, 404, 503),
)
async def delete_tuner(
    principal: AdminDep, name: TunerName, service: ServiceDep, tenancy: TenancyDep
) -> Deleted:
    """Remove the tuner from the store; every replica stops serving it. Answers once the
    requests using it here are done (at most ``unload_drain_s``; a longer wait is logged)."""
    tenancy.check_write(principal, name)
    await service.registry.delete(name)
    return Deleted(name=name, deleted=True)

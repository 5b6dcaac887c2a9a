"""``/v1/tuners``: list, describe, register (admin) and delete (admin) task tuners."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from server.api.deps import AdminDep, ServiceDep
from server.api.schemas import Deleted, Registered, TunerDetail, TunerList, problem_responses
from server.errors import ApiError

router = APIRouter(prefix="/v1/tuners", tags=["tuners"])

TunerName = Annotated[
    str, Path(description="Tuner name: lower-case letters, digits, '.', '_', '-'")
]

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
async def list_tuners(service: ServiceDep) -> dict[str, Any]:
    """Every registered tuner's current version, sorted by name."""
    rows = await service.registry.list_tuners()
    return {"tuners": [row.to_dict() for row in rows]}


@router.get(
    "/{name}",
    response_model=TunerDetail,
    summary="Describe one tuner",
    responses=problem_responses(404),
)
async def describe_tuner(name: TunerName, service: ServiceDep) -> dict[str, Any]:
    """The tuner's current version, full config, training summary and stored versions."""
    detail = await service.registry.describe(name)
    body: dict[str, Any] = detail.to_dict()
    return body


@router.put(
    "/{name}",
    response_model=Registered,
    status_code=201,
    summary="Register a tuner artifact (admin)",
    responses={
        200: {"model": Registered, "description": "These exact bytes already are a version"},
        **problem_responses(401, 403, 409, 413, 415, 422, 503),
    },
    openapi_extra=_ARTIFACT_BODY,
)
async def register_tuner(
    request: Request,
    _admin: AdminDep,
    name: TunerName,
    service: ServiceDep,
) -> JSONResponse:
    """Validate the artifact (header, shapes, backbone fingerprint) and make it the current
    version of ``name`` on every replica. Re-uploading identical bytes answers 200 with the
    existing version."""
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
    info, created = await service.registry.register(name, data)
    return JSONResponse(
        Registered(name=info.name, version=info.version, sha256=info.sha256).model_dump(),
        status_code=201 if created else 200,
        headers={"Location": f"/v1/tuners/{info.name}"},
    )


@router.delete(
    "/{name}",
    response_model=Deleted,
    summary="Delete a tuner and all its versions (admin)",
    responses=problem_responses(401, 403, 404, 503),
)
async def delete_tuner(_admin: AdminDep, name: TunerName, service: ServiceDep) -> Deleted:
    """Remove the tuner from the store; every replica stops serving it."""
    await service.registry.delete(name)
    return Deleted(name=name, deleted=True)

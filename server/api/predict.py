"""``POST /v1/predict``: images and task names in, every task's answer for every image out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.deps import ReaderDep, ServiceDep, SettingsDep, TenancyDep
from server.api.json_body import INLINE_PARSE_BYTES, parse_off_loop
from server.api.predict_input import (
    FORM_FIELDS,
    PredictLimits,
    read_json,
    read_multipart,
    too_many_tasks,
)
from server.api.schemas import (
    PredictJsonRequest,
    PredictResponse,
    inline_json_schema,
    problem_responses,
)
from server.engine.service import TaskRef
from server.errors import ApiError

router = APIRouter(tags=["predict"])

INLINE_JSON_BYTES = INLINE_PARSE_BYTES
"""JSON bodies up to this size are parsed on the event loop; larger ones in a thread."""

_MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Encoded image files (repeat the field for several images).",
        },
        "tasks": {"type": "string", "description": 'Comma separated task names: "a,b@3".'},
        "task": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Task names, one per field (instead of or besides `tasks`).",
        },
        "top_k": {"type": "integer", "default": 5, "minimum": 1},
    },
}
assert set(_MULTIPART_SCHEMA["properties"]) == set(FORM_FIELDS)

_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": inline_json_schema(PredictJsonRequest)},
        },
    }
}


@router.post(
    "/v1/predict",
    summary="Run several tasks on one or more images",
    response_model=PredictResponse,
    responses=problem_responses(401, 403, 404, 408, 413, 415, 422, 429, 503, 504),
    openapi_extra=_REQUEST_BODY,
)
async def predict(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    principal: ReaderDep,
    tenancy: TenancyDep,
) -> Response:
    """One backbone pass per batch, every named task answered from its features.

    Send ``multipart/form-data`` (repeated ``image`` files, ``tasks=a,b`` or repeated
    ``task``, ``top_k``) or JSON ``{"images": [{"b64": ...}], "tasks": [...], "top_k": 5}``.
    ``name@version`` pins a version. A task that fails while running gets an ``error`` entry
    and the others still answer. With tenants on, tasks are ``tenant/name`` of the token's
    tenant.
    """
    limits = PredictLimits.from_settings(settings)
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        parsed = await read_multipart(request.stream(), content_type, limits)
    elif media_type == "application/json":
        # Parsing megabytes of JSON and base64 takes tens of ms: keep it off the event loop.
        parsed = await parse_off_loop(read_json, await request.body(), limits)
    else:
        raise ApiError(
            "unsupported_media_type",
            f"send multipart/form-data or application/json, not {media_type or 'no type'}",
        )
    # A 64 kB form field splits into thousands of names: count them before parsing any.
    if len(parsed.tasks) > limits.max_tasks:
        raise too_many_tasks(len(parsed.tasks), limits)
    tasks = [TaskRef.parse(name) for name in parsed.tasks]
    for ref in tasks:
        tenancy.check_read(principal, ref.name)
    result = await service.predict(parsed.images, tasks, parsed.top_k)
    return JSONResponse(result)

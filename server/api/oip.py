"""Open Inference Protocol (KServe v2) REST routes: every task is a model.

Standard clients (``tritonclient.http``, the KServe SDK) work unchanged:

- ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``: server metadata and health.
- ``GET /v2/models/{task}[/versions/{v}]``: input ``image`` (BYTES [-1], encoded image files);
  infer also takes ``pixels`` in its place (FP32 [-1, 3, H, W], preprocessed with the
  backbone's data config, given in ``parameters.preprocess``; its spec is
  ``parameters.pixels_input``, outside ``inputs`` so that a generic client filling every
  listed input sends one); outputs by task kind: ``scores`` (FP32 [-1, C]) and ``labels``
  (BYTES [-1], top-1) for classification and multilabel, ``values`` (FP32 [-1, C]) for
  regression, ``embedding`` (FP32 [-1, D]) for embeddings.
- ``GET /v2/models/{task}[/versions/{v}]/ready``: 200 when that version can serve (loaded, or
  registered and loaded by the next request).
- ``GET /v2/models/{task}[/versions/{v}]/config``: Triton's model configuration (names, data
  types, dims without the batch dimension, ``max_batch_size``).
- ``GET /v2/models[/{task}[/versions/{v}]]/stats``: Triton's statistics extension (success,
  failure, queue and compute counts and nanoseconds per version, since the process started).
- ``POST /v2/models/{task}[/versions/{v}]/infer``: JSON or the binary tensor extension;
  ``parameters.classification = k`` on ``scores`` returns Triton's ``"score:index:label"``.
- ``GET|POST /v2/repository/index``, ``POST /v2/repository/models/{task}/load|unload``:
  load makes the current version resident; unload evicts it from memory (it stays registered
  and a later request loads it again).

A plain task name is served by its current version (canary traffic splits apply to
``/v1/predict`` only), so every answer names one ``model_version``. Errors use the protocol's
``{"error": "..."}`` body with the HTTP status of the project's error code; so does every
refusal of a ``/v2`` path made outside these routes (unknown path, method, body limit, rate
limit: :func:`server.problems.problem_response`).

With tenants on, a model is ``tenant/name`` (``/v2/models/acme/age/infer``; standard clients
keep the ``/`` of a model name) and every model and repository route needs a token of that
tenant (:mod:`server.tenancy`); the repository index lists the caller's tenant only.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from server.api.deps import AdminDep, ReaderDep, ServiceDep, SettingsDep, TenancyDep
from server.api.json_body import parse_off_loop
from server.api.oip_codec import (
    HEADER_LENGTH,
    InferInput,
    InferRequest,
    OipCodecError,
    OipTooLargeError,
    OutputTensor,
    classification_strings,
    decode_request,
    encode_response,
    load_oip_json,
)
from server.api.routing import TunerRoute
from server.engine.service import InferenceService, TaskRef, parse_version
from server.errors import ApiError, status_for
from server.problems import MAX_DETAIL_CHARS, request_state, safe_text, validation_error
from server.tenancy import Principal, Tenancy
from tuners_store.config import TunerConfig

log = logging.getLogger("restune.server")

SERVER_NAME = "restune"
EXTENSIONS = [
    "model_repository",
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "statistics",
]
PLATFORM = "restune_bypass"

LABEL_KINDS = ("classification", "multilabel")


class OipError(BaseModel):
    """The protocol's error body."""

    error: str


_STATUS_TEXT = {
    400: "Malformed request (protocol, tensors)",
    401: "No bearer token (tenants on)",
    403: "The token's tenant does not own the task",
    404: "Unknown task or version",
    408: "The request's body arrived too slowly",
    413: "Over the body limit (decompressed, for a gzip or deflate body), or a JSON header "
    "over the JSON limits (send tensors in binary)",
    415: "A Content-Encoding other than gzip or deflate",
    422: "An image could not be decoded",
    429: "Over the tenant's request rate (Retry-After)",
    500: "Internal error",
    503: "Not ready, overloaded or the store is unavailable (Retry-After)",
    504: "Deadline exceeded",
}


def oip_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting OIP error bodies for ``statuses``."""
    return {s: {"model": OipError, "description": _STATUS_TEXT[s]} for s in statuses}


def oip_error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocol's error body (the message may quote client input: rendered safely)."""
    return JSONResponse(
        {"error": safe_text(message, MAX_DETAIL_CHARS)}, status_code=status, headers=headers
    )


class OipRoute(TunerRoute):
    """Answers failures of these routes in the OIP shape instead of problem+json; its
    ``{task:tuner}`` is a tuner name of the app's mode (:mod:`server.api.routing`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def oip_handler(request: Request) -> Response:
            state = request_state(request.scope)
            try:
                return await handler(request)
            except ClientDisconnect:
                raise  # the app's handler records it as 499 (server.problems)
            except ApiError as exc:
                state["error_code"] = exc.code
                return oip_error(exc.detail, exc.status, exc.headers())
            except OipTooLargeError as exc:
                state["error_code"] = "payload_too_large"
                return oip_error(str(exc), 413)
            except (OipCodecError, RequestValidationError) as exc:
                state["error_code"] = "validation_error"
                message = (
                    str(exc)
                    if isinstance(exc, OipCodecError)
                    else str(validation_error(exc.errors()).detail)
                )
                return oip_error(message, 400)
            except Exception as exc:  # a bug: log it as the app does, answer in OIP shape
                request_id = state.get("request_id", "-")
                log.error(
                    "unhandled error",
                    exc_info=exc,
                    extra={"request_id": request_id, "path": request.url.path},
                )
                state["error_code"] = "internal"
                return oip_error(f"internal server error (request id {request_id})", 500)

        return oip_handler


router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=OipRoute)


# --- what a model is -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelView:
    """One task version as the protocol sees it."""

    name: str
    version: int
    config: TunerConfig
    versions: list[int]
    loaded: bool


def _version_number(text: str) -> int:
    number = parse_version(text)
    if number is None:
        raise ApiError("validation_error", f"model version must be an integer >= 1, not {text!r}")
    return number


async def model_view(service: InferenceService, task: str, version: str | None) -> ModelView:
    """The task's current version, or the pinned one (which is loaded to read its config)."""
    detail = await service.registry.describe(task)
    versions = sorted(v.version for v in detail.versions)
    current = detail.summary.info.version
    if version is not None:
        pinned = _version_number(version)
        if pinned != current:
            if pinned not in versions:
                raise ApiError(
                    "unknown_version", f"task {task!r} has no version {pinned}", task=task
                )
            loaded = await service.registry.resolve(task, pinned)
            return ModelView(task, pinned, loaded.config, versions, True)
    config = detail.summary.config
    if config is None:
        problem = service.registry.config_error(detail.summary.info)
        if problem is not None:
            raise problem
        raise ApiError(
            "store_unavailable",
            f"the config of task {task!r} cannot be read: the tuner store is unreachable",
            retry_after=5,
        )
    return ModelView(task, current, config, versions, current in detail.loaded_versions)


def _output_specs(config: TunerConfig) -> list[dict[str, Any]]:
    c = config.num_outputs
    if config.task in LABEL_KINDS:
        return [
            {"name": "scores", "datatype": "FP32", "shape": [-1, c]},
            {"name": "labels", "datatype": "BYTES", "shape": [-1]},
        ]
    if config.task == "regression":
        return [{"name": "values", "datatype": "FP32", "shape": [-1, c]}]
    return [{"name": "embedding", "datatype": "FP32", "shape": [-1, c]}]


IMAGE_INPUT: dict[str, Any] = {"name": "image", "datatype": "BYTES", "shape": [-1]}
"""The one input the metadata lists: a generic client that fills every listed input sends
this one only. ``pixels`` is accepted in its place (``parameters.pixels_input``)."""


def _pixels_spec(service: InferenceService) -> dict[str, Any]:
    size = list(service.preprocess_config()["input_size"])  # [3, H, W]
    return {"name": "pixels", "datatype": "FP32", "shape": [-1, *size]}


# --- server --------------------------------------------------------------------------------


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    """Name, version and the protocol extensions served."""
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Server liveness")
async def server_live() -> dict[str, Any]:
    """200 while the process serves HTTP."""
    return {"live": True}


@router.get("/health/ready", summary="Server readiness", responses=oip_errors(503))
async def server_ready(service: ServiceDep) -> Response:
    """200 when the replica can serve predictions (as ``/readyz``), else 503."""
    report = await service.ready()
    if report.get("ready"):
        return JSONResponse({"ready": True})
    reasons = "; ".join(str(r) for r in report.get("reasons", [])) or "not ready"
    return oip_error(reasons, 503)


# --- models --------------------------------------------------------------------------------


async def _metadata(service: InferenceService, task: str, version: str | None) -> dict[str, Any]:
    view = await model_view(service, task, version)
    c = view.config
    return {
        "name": view.name,
        "versions": [str(v) for v in view.versions],
        "platform": PLATFORM,
        "inputs": [IMAGE_INPUT],
        "outputs": _output_specs(c),
        "parameters": {
            "version": str(view.version),
            "pixels_input": _pixels_spec(service),
            "kind": c.task,
            "labels": list(c.labels),
            "preprocess": service.preprocess_config(),
        },
    }


def _version_stats(service: InferenceService, task: str, version: int) -> dict[str, Any]:
    """One version's statistics in Triton's shape (``ModelStatistics``). Only the parts this
    server measures are non-zero: success and failure (whole answer time), queue (batcher
    wait) and compute_infer (backbone and fan-out of the image's batch)."""
    st = service.metrics.stats.get(task, version)
    zero = {"count": 0, "ns": 0}
    return {
        "name": task,
        "version": str(version),
        "last_inference": st.last_inference_ms,
        "inference_count": st.success.count,
        "execution_count": st.success.count,
        "inference_stats": {
            "success": st.success.as_json(),
            "fail": st.fail.as_json(),
            "queue": st.queue.as_json(),
            "compute_input": zero,
            "compute_infer": st.compute.as_json(),
            "compute_output": zero,
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [],
    }


async def _model_stats(
    service: InferenceService, task: str, version: str | None
) -> list[dict[str, Any]]:
    detail = await service.registry.describe(task)  # 404 for an unknown task
    registered = {v.version for v in detail.versions}
    if version is not None:
        number = _version_number(version)
        if number not in registered:
            raise ApiError("unknown_version", f"task {task!r} has no version {number}", task=task)
        numbers = [number]
    else:
        numbers = sorted(registered | set(service.metrics.stats.versions(task)))
    return [_version_stats(service, task, n) for n in numbers]


@router.get(
    "/models/stats",
    summary="Statistics of every model",
    responses=oip_errors(401, 403, 429),
)
async def all_model_stats(
    service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> dict[str, Any]:
    """Per-version statistics of every task (of the caller's tenant) that has answered."""
    rows: list[dict[str, Any]] = []
    for summary in await service.registry.list_tuners():
        name = summary.info.name
        if not tenancy.visible(principal, name):
            continue
        numbers = set(service.metrics.stats.versions(name)) | {summary.info.version}
        rows.extend(_version_stats(service, name, n) for n in sorted(numbers))
    return {"model_stats": rows}


@router.get(
    "/models/{task:tuner}",
    summary="Model metadata",
    responses=oip_errors(401, 403, 404, 429, 503),
)
async def model_metadata(
    task: str, service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> dict[str, Any]:
    """Inputs, outputs and versions of a task."""
    tenancy.check_read(principal, task)
    return await _metadata(service, task, None)


@router.get(
    "/models/{task:tuner}/versions/{version}",
    summary="Model version metadata",
    responses=oip_errors(400, 401, 403, 404, 429, 503),
)
async def model_version_metadata(
    task: str, version: str, service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> dict[str, Any]:
    """Inputs, outputs and versions of a pinned task version."""
    tenancy.check_read(principal, task)
    return await _metadata(service, task, version)


async def _ready(service: InferenceService, task: str, version: str | None) -> Response:
    detail = await service.registry.describe(task)
    number = detail.summary.info.version if version is None else _version_number(version)
    if number not in {v.version for v in detail.versions}:
        raise ApiError("unknown_version", f"task {task!r} has no version {number}", task=task)
    if not service.registry.is_loaded(task, number):
        # Registered but not in memory: the next request loads it, so it is ready to serve.
        # A config the store holds but this server cannot load is the exception (not ready).
        config_problem = service.registry.config_error(detail.summary.info)
        if number == detail.summary.info.version and config_problem is not None:
            return oip_error(config_problem.detail, 503)
    return JSONResponse({"name": task, "version": str(number), "ready": True})


@router.get(
    "/models/{task:tuner}/ready",
    summary="Model readiness",
    responses=oip_errors(401, 403, 404, 429, 503),
)
async def model_ready(
    task: str, service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> Response:
    """200 when the task's current version can serve: loaded, or registered and loadable
    (the next request loads it); 503 when its stored config cannot be loaded."""
    tenancy.check_read(principal, task)
    return await _ready(service, task, None)


@router.get(
    "/models/{task:tuner}/versions/{version}/ready",
    summary="Model version readiness",
    responses=oip_errors(400, 401, 403, 404, 429, 503),
)
async def model_version_ready(
    task: str, version: str, service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> Response:
    """200 when that version is registered and can serve (see the unpinned route)."""
    tenancy.check_read(principal, task)
    return await _ready(service, task, version)


# --- configuration and statistics ----------------------------------------------------------

_TRITON_TYPES = {"FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}


def _config_tensor(spec: dict[str, Any]) -> dict[str, Any]:
    """A tensor of Triton's model config: dims without the batch dimension; a per-image
    scalar (``[-1]``) is Triton's ``dims: [1]`` reshaped to ``[]``."""
    dims = list(spec["shape"][1:])
    tensor: dict[str, Any] = {
        "name": spec["name"],
        "data_type": _TRITON_TYPES[spec["datatype"]],
        "dims": dims or [1],
    }
    if not dims:
        tensor["reshape"] = {"shape": []}
    return tensor


async def _config(
    service: InferenceService, max_batch: int, task: str, version: str | None
) -> dict[str, Any]:
    view = await model_view(service, task, version)
    c = view.config
    return {
        "name": view.name,
        "platform": PLATFORM,
        "backend": SERVER_NAME,
        "version_policy": {"specific": {"versions": [view.version]}},
        "max_batch_size": max_batch,
        "input": [_config_tensor(IMAGE_INPUT)],
        "output": [_config_tensor(o) for o in _output_specs(c)],
        "parameters": {
            "kind": {"string_value": c.task},
            "labels": {"string_value": ",".join(c.labels)},
            "pixels_input": {
                "string_value": "FP32 " + str(_pixels_spec(service)["shape"]).replace(" ", "")
            },
        },
    }


@router.get(
    "/models/{task:tuner}/config",
    summary="Model configuration",
    responses=oip_errors(401, 403, 404, 429, 503),
)
async def model_config(
    task: str,
    service: ServiceDep,
    settings: SettingsDep,
    principal: ReaderDep,
    tenancy: TenancyDep,
) -> dict[str, Any]:
    """The task's current version as Triton's model configuration; ``max_batch_size`` is the
    most images one request may send."""
    tenancy.check_read(principal, task)
    return await _config(service, settings.max_images_per_request, task, None)


@router.get(
    "/models/{task:tuner}/versions/{version}/config",
    summary="Model version configuration",
    responses=oip_errors(400, 401, 403, 404, 429, 503),
)
async def model_version_config(
    task: str,
    version: str,
    service: ServiceDep,
    settings: SettingsDep,
    principal: ReaderDep,
    tenancy: TenancyDep,
) -> dict[str, Any]:
    """A pinned version as Triton's model configuration."""
    tenancy.check_read(principal, task)
    return await _config(service, settings.max_images_per_request, task, version)


@router.get(
    "/models/{task:tuner}/stats",
    summary="Model statistics",
    responses=oip_errors(401, 403, 404, 429, 503),
)
async def model_stats(
    task: str, service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> dict[str, Any]:
    """Per-version statistics of a task: every registered version, and any version that
    answered since the process started."""
    tenancy.check_read(principal, task)
    return {"model_stats": await _model_stats(service, task, None)}


@router.get(
    "/models/{task:tuner}/versions/{version}/stats",
    summary="Model version statistics",
    responses=oip_errors(400, 401, 403, 404, 429, 503),
)
async def model_version_stats(
    task: str, version: str, service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> dict[str, Any]:
    """Statistics of a pinned version."""
    tenancy.check_read(principal, task)
    return {"model_stats": await _model_stats(service, task, version)}


# --- inference -----------------------------------------------------------------------------


def _images(tensor: InferInput) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise OipCodecError(f"input 'image' must be BYTES, not {tensor.datatype}")
    elements = [bytes(e) for e in tensor.data.reshape(-1)]
    if tensor.binary:
        return elements
    # JSON strings cannot carry raw image bytes: images in JSON are base64.
    out = []
    for i, e in enumerate(elements):
        try:
            out.append(base64.b64decode(e, validate=True))
        except (binascii.Error, ValueError):
            raise OipCodecError(
                f"input 'image' element {i}: images in JSON must be base64 strings "
                "(or send the tensor as binary data)"
            ) from None
    return out


def _pixels(tensor: InferInput) -> npt.NDArray[np.float32]:
    if tensor.datatype != "FP32":
        raise OipCodecError(f"input 'pixels' must be FP32, not {tensor.datatype}")
    if tensor.data.ndim != 4:
        raise OipCodecError(f"input 'pixels' must be [B, 3, H, W], got {list(tensor.shape)}")
    # Writable: the binary tail decodes to a read-only view, which torch would warn about.
    return np.require(tensor.data, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])  # (B, 3, H, W)


def _wanted_outputs(request: InferRequest, config: TunerConfig) -> dict[str, int]:
    """Output name -> classification k (0 = plain tensor) of the outputs to return."""
    known = [o["name"] for o in _output_specs(config)]
    if request.outputs is None:
        return dict.fromkeys(known, 0)
    wanted = {}
    for o in request.outputs:
        if o.name not in known:
            raise OipCodecError(f"task kind {config.task} has no output {o.name!r}; has {known}")
        if o.classification and o.name != "scores":
            raise OipCodecError("classification applies to the 'scores' output only")
        wanted[o.name] = o.classification
    return wanted


def _top_k(config: TunerConfig, wanted: dict[str, int], max_top_k: int) -> int:
    """How many labels to ask the service for: all of them when a full score row is needed."""
    if config.task not in LABEL_KINDS:
        return 1
    c = config.num_outputs
    if wanted.get("scores") == 0:  # the FP32 row of every label
        if c > max_top_k:
            raise OipCodecError(
                f"task has {c} labels, more than this server's max top_k ({max_top_k}): "
                "request 'scores' with parameters.classification = k"
            )
        return c
    # classification = k needs the k best; 'labels' alone needs the best one.
    return min(c, max_top_k, max(wanted.get("scores", 0), 1))


def _answers(body: dict[str, Any], task: str) -> list[dict[str, Any]]:
    answers = [r["tasks"][task] for r in body["results"]]
    for answer in answers:
        error = answer.get("error")
        if error is not None:
            code = str(error.get("code", "internal"))
            raise ApiError(code, str(error.get("detail", "")), status=status_for(code))
    return answers


def _score_rows(config: TunerConfig, answers: Sequence[dict[str, Any]]) -> npt.NDArray[np.float32]:
    """(B, C) scores in label order; labels the service did not return (top-k cut) are -inf."""
    index = {label: i for i, label in enumerate(config.labels)}
    rows = np.full((len(answers), config.num_outputs), -np.inf, dtype=np.float32)  # (B, C)
    for b, answer in enumerate(answers):
        for item in answer["labels"]:
            rows[b, index[item["label"]]] = item["score"]
    return rows


def _outputs(
    config: TunerConfig, answers: Sequence[dict[str, Any]], wanted: dict[str, int]
) -> list[OutputTensor]:
    out: list[OutputTensor] = []
    if config.task in LABEL_KINDS:
        scores = _score_rows(config, answers)  # (B, C)
        if "scores" in wanted:
            k = wanted["scores"]
            if k:
                out.append(
                    OutputTensor(
                        "scores", "BYTES", classification_strings(scores, config.labels, k)
                    )
                )
            else:
                out.append(OutputTensor("scores", "FP32", scores))
        if "labels" in wanted:
            top1 = np.empty(len(answers), dtype=object)  # (B,)
            top1[:] = [a["labels"][0]["label"].encode() for a in answers]
            out.append(OutputTensor("labels", "BYTES", top1))
    elif config.task == "regression":
        values = np.asarray(
            [[a["values"][label] for label in config.labels] for a in answers], dtype=np.float32
        )  # (B, C)
        out.append(OutputTensor("values", "FP32", values))
    else:
        emb = np.asarray([a["embedding"] for a in answers], dtype=np.float32)  # (B, D)
        out.append(OutputTensor("embedding", "FP32", emb))
    return out


def _parse_infer(
    body: bytes, header_length: str | None
) -> tuple[InferRequest, list[bytes] | npt.NDArray[np.float32]]:
    """The request and its one input as the service takes it (encoded images or pixels).

    CPU-bound (JSON, base64, copies): run in a worker thread for a large body.
    """
    parsed = decode_request(body, header_length)
    unknown = [i.name for i in parsed.inputs if i.name not in ("image", "pixels")]
    if unknown:
        raise OipCodecError(
            f"unknown inputs {unknown[:4]}; send 'image' (BYTES) or 'pixels' (FP32)"
        )
    if len(parsed.inputs) != 1:
        raise OipCodecError("send exactly one input: 'image' or 'pixels'")
    tensor = parsed.inputs[0]
    return parsed, _images(tensor) if tensor.name == "image" else _pixels(tensor)


async def _infer(
    request: Request,
    service: InferenceService,
    max_top_k: int,
    task: str,
    version: str | None,
) -> Response:
    parsed, data = await parse_off_loop(
        _parse_infer, await request.body(), request.headers.get(HEADER_LENGTH)
    )
    view = await model_view(service, task, version)
    wanted = _wanted_outputs(parsed, view.config)
    top_k = _top_k(view.config, wanted, max_top_k)
    # Pinned to the version described above, so the answer matches model_version.
    refs = [TaskRef(task, view.version)]
    if isinstance(data, list):
        body = await service.predict(data, refs, top_k)
    else:
        # The service takes a torch tensor: wrap the decoded array (no copy) at the call.
        body = await service.predict_tensor(torch.from_numpy(data), refs, top_k)
    outputs = _outputs(view.config, _answers(body, task), wanted)
    content, headers = encode_response(
        parsed, model_name=task, model_version=str(view.version), outputs=outputs
    )
    return Response(content=content, headers=headers)


@router.post(
    "/models/{task:tuner}/infer",
    summary="Inference",
    responses=oip_errors(400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 503, 504),
)
async def infer(
    task: str,
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    principal: ReaderDep,
    tenancy: TenancyDep,
) -> Response:
    """Run the task's current version on encoded images or preprocessed pixels."""
    tenancy.check_read(principal, task)
    return await _infer(request, service, settings.max_top_k, task, None)


@router.post(
    "/models/{task:tuner}/versions/{version}/infer",
    summary="Inference on a version",
    responses=oip_errors(400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 503, 504),
)
async def infer_version(
    task: str,
    version: str,
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    principal: ReaderDep,
    tenancy: TenancyDep,
) -> Response:
    """Run a pinned version of the task."""
    tenancy.check_read(principal, task)
    return await _infer(request, service, settings.max_top_k, task, version)


# --- repository ----------------------------------------------------------------------------


async def _index(
    service: InferenceService, ready_only: bool, principal: Principal, tenancy: Tenancy
) -> list[dict[str, Any]]:
    rows = []
    for summary in await service.registry.list_tuners():
        if ready_only and not summary.loaded:
            continue
        if not tenancy.visible(principal, summary.info.name):
            continue
        rows.append(
            {
                "name": summary.info.name,
                "version": str(summary.info.version),
                "state": "READY" if summary.loaded else "UNAVAILABLE",
                "reason": "" if summary.loaded else "unloaded: registered, loads on demand",
            }
        )
    return rows


@router.get(
    "/repository/index",
    summary="Model repository index",
    responses=oip_errors(401, 403, 429),
)
async def repository_index_get(
    service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> list[dict[str, Any]]:
    """Every task (of the caller's tenant) with its current version and whether it is
    loaded."""
    return await _index(service, False, principal, tenancy)


@router.post(
    "/repository/index",
    summary="Model repository index",
    responses=oip_errors(400, 401, 403, 429),
)
async def repository_index(
    request: Request, service: ServiceDep, principal: ReaderDep, tenancy: TenancyDep
) -> list[dict[str, Any]]:
    """Like the GET; ``{"ready": true}`` lists loaded tasks only."""
    doc = await parse_off_loop(_optional_json, await request.body())
    ready_only = isinstance(doc, dict) and bool(doc.get("ready", False))
    return await _index(service, ready_only, principal, tenancy)


def _optional_json(raw: bytes) -> Any:
    """An optional JSON body: None when empty."""
    if not raw.strip():
        return None
    return load_oip_json(raw)


async def _load_parameters(request: Request) -> dict[str, Any]:
    doc = await parse_off_loop(_optional_json, await request.body())
    params = doc.get("parameters") if isinstance(doc, dict) else None
    return params if isinstance(params, dict) else {}


@router.post(
    "/repository/models/{task:tuner}/load",
    summary="Load a model",
    responses=oip_errors(400, 401, 403, 404, 429, 500, 503),
)
async def load_model(
    task: str, request: Request, service: ServiceDep, principal: AdminDep, tenancy: TenancyDep
) -> Response:
    """Make the task's current version resident in memory (admin token, or a writer token
    of the task's tenant: it changes what this replica holds)."""
    tenancy.check_write(principal, task)
    params = await _load_parameters(request)
    if "config" in params or any(k.startswith("file:") for k in params):
        raise OipCodecError("config and file overrides are not supported: PUT an artifact")
    await service.registry.resolve(task)
    return JSONResponse({})


@router.post(
    "/repository/models/{task:tuner}/unload",
    summary="Unload a model",
    responses=oip_errors(400, 401, 403, 404, 429, 503),
)
async def unload_model(
    task: str, request: Request, service: ServiceDep, principal: AdminDep, tenancy: TenancyDep
) -> Response:
    """Evict every loaded version of the task from memory; it stays registered (admin
    token, or a writer token of the task's tenant)."""
    tenancy.check_write(principal, task)
    await _load_parameters(request)
    await service.registry.describe(task)  # 404 for an unknown task
    service.registry.unload(task)
    return JSONResponse({})

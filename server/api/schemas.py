"""Wire schemas of the v1 API and the health routes (pydantic, for validation and /docs).

Responses are built by the engine as plain dicts/dataclasses; these models are what OpenAPI
publishes and what the tests hold the engine's output to.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, model_validator

from server.problems import PROBLEM_MEDIA_TYPE
from tuners_store.base import MAX_TRAFFIC_VERSIONS

TaskKind = Literal["classification", "multilabel", "regression", "embedding"]


class Problem(BaseModel):
    """RFC 9457 problem details; ``code`` is the stable machine-readable error."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["urn:restune:error:unknown_task"])
    title: str
    status: int
    detail: str
    code: str = Field(examples=["unknown_task"])
    instance: str | None = None
    request_id: str | None = None


_STATUS_TEXT = {
    401: "Missing bearer token (`unauthorized`)",
    403: "Wrong token, or admin routes disabled (`forbidden`)",
    404: "Unknown task or tuner (`unknown_task`, `tuner_not_found`)",
    408: "The request's headers or body arrived too slowly (`request_timeout`)",
    409: "Artifact trained on another backbone (`backbone_mismatch`)",
    413: "A size limit was exceeded (`payload_too_large`, `too_many_images`, ...)",
    415: "Unsupported Content-Type (`unsupported_media_type`)",
    422: "Invalid request (`validation_error`, `bad_image`, ...)",
    429: "Over a tenant quota or rate (`quota_exceeded`, `rate_limited`); see Retry-After",
    500: "Internal error (`internal`)",
    503: "Overloaded or store unavailable; see Retry-After",
    504: "Request deadline exceeded (`deadline_exceeded`)",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json errors for ``statuses``."""
    schema = {"$ref": PROBLEM_REF}
    return {
        status: {
            "description": _STATUS_TEXT.get(status, "Error"),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}},
        }
        for status in statuses
    }


PROBLEM_REF = "#/components/schemas/Problem"
_FASTAPI_VALIDATION_REF = "#/components/schemas/HTTPValidationError"


def document_problems(spec: dict[str, Any]) -> dict[str, Any]:
    """Make an OpenAPI document say what the app sends: every error is problem+json.

    Adds the Problem schema and, on operations that document problem+json errors, turns
    FastAPI's default 422 (``HTTPValidationError``, which they never send: validation errors
    are problems too) into a Problem response. Routes with an error shape of their own (the
    Open Inference Protocol's) are left as they are.
    """
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if not any(PROBLEM_MEDIA_TYPE in r.get("content", {}) for r in responses.values()):
                continue
            for status, response in responses.items():
                content = response.get("content", {})
                plain = content.get("application/json", {}).get("schema", {})
                if plain.get("$ref") == _FASTAPI_VALIDATION_REF:
                    del content["application/json"]
                    content[PROBLEM_MEDIA_TYPE] = {"schema": {"$ref": PROBLEM_REF}}
                    response["description"] = _STATUS_TEXT.get(int(status), "Error")
    # Drop FastAPI's validation schemas when nothing refers to them any more (in this order:
    # the first refers to the second).
    for name in ("HTTPValidationError", "ValidationError"):
        own = schemas.pop(name, None)
        if own is not None and f"#/components/schemas/{name}'" in str(spec):
            schemas[name] = own
    return spec


# --- predict ------------------------------------------------------------------------------


class ImageIn(BaseModel):
    """One image of a JSON predict request: its encoded file bytes in standard base64."""

    model_config = ConfigDict(extra="forbid")

    b64: str = Field(
        description="Standard base64 of the encoded file (PNG, JPEG, WebP...); a "
        "`data:image/...;base64,` prefix is accepted.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_urls(cls, data: Any) -> Any:
        if isinstance(data, dict) and "url" in data:
            raise ValueError(
                "image URLs are not fetched by the server; send the file bytes as "
                '{"b64": "..."} or use multipart/form-data'
            )
        return data


class PredictJsonRequest(BaseModel):
    """JSON form of ``POST /v1/predict``."""

    model_config = ConfigDict(extra="forbid")

    images: list[ImageIn] = Field(min_length=1)
    tasks: list[str] | str = Field(
        description='Task names, each optionally pinned to a version (`"age@3"`); a comma '
        "separated string is accepted too."
    )
    top_k: int = Field(
        default=5,
        strict=True,
        description='Labels returned per classification task (a JSON integer: `true`, `"3"` '
        "and `3.0` are refused).",
    )


class LabelScore(BaseModel):
    label: str
    score: float


class TaskAnswer(BaseModel):
    """The answer of one task for one image."""

    version: int
    sha256: str
    kind: TaskKind
    labels: list[LabelScore] | None = Field(
        default=None, description="classification / multilabel: top labels, best first"
    )
    values: dict[str, float] | None = Field(default=None, description="regression outputs")
    embedding: list[float] | None = Field(default=None, description="L2-normalised embedding")


class TaskErrorBody(BaseModel):
    code: str
    detail: str


class TaskFailure(BaseModel):
    """A task that failed for this request while the others answered."""

    error: TaskErrorBody


class ImageResult(BaseModel):
    image: int = Field(description="Index of the image in the request")
    tasks: dict[str, TaskAnswer | TaskFailure]


class BackboneOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    arch: str
    fingerprint: str
    runtime: str
    device: str


class Timing(BaseModel):
    model_config = ConfigDict(extra="allow")

    queue_ms: float
    backbone_ms: float
    fanout_ms: float
    total_ms: float
    cache_hits: int


class PredictResponse(BaseModel):
    results: list[ImageResult]
    backbone: BackboneOut
    timing: Timing


# --- tuners ------------------------------------------------------------------------------


class TunerSummary(BaseModel):
    """A registered tuner (its current version).

    Fields read from the artifact's config are null when it could not be read (the store is
    unreachable and the version was never loaded here).
    """

    model_config = ConfigDict(extra="allow")

    name: str
    version: int
    sha256: str
    kind: TaskKind | None
    labels: list[str] | None
    params: int | None = Field(description="Scalars in the artifact's tensors")
    bytes: int = Field(description="Artifact size")
    loaded: bool = Field(description="Whether this replica holds it in memory")
    pooling: str | None
    tuner: str | None = Field(description="res_adapter, res_prefix or res_prompt")
    created_at: str
    description: str | None = None
    training: dict[str, Any] | None


class TunerList(BaseModel):
    tuners: list[TunerSummary]


class VersionOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    version: int
    sha256: str
    size: int
    created_at: str
    loaded: bool = False
    answers: int = Field(
        default=0, description="Per-image answers this version gave on this replica"
    )


TRAFFIC_DESCRIPTION = (
    "Weight per version (keys are version numbers): each image goes to one version, chosen "
    "by its pixel hash, with probability weight / sum of weights"
)


class TunerDetail(TunerSummary):
    """A tuner with its full config, every stored version and the traffic split."""

    config: dict[str, Any] | None = Field(description="The full TunerConfig of the artifact")
    versions: list[VersionOut]
    traffic: dict[str, int] = Field(default_factory=dict, description=TRAFFIC_DESCRIPTION)


_VERSION_KEY = re.compile(r"[1-9][0-9]{0,8}")


def _version_key(key: object) -> object:
    """A traffic key as its canonical decimal only: ``int()`` also reads ``"01"``, ``"+1"``,
    ``" 1"`` (and pydantic ``"1.0"``), so ``{"1": 50, "01": 50}`` would name version 1
    twice and silently keep one weight."""
    if isinstance(key, str) and not _VERSION_KEY.fullmatch(key):
        raise ValueError("a version is written as its number: 1 to 999999999, no sign or zeros")
    return key


class TrafficIn(BaseModel):
    """``PUT /v1/tuners/{name}/traffic``: integer weights >= 0 for up to 16 versions."""

    model_config = ConfigDict(extra="forbid")

    traffic: dict[
        Annotated[int, BeforeValidator(_version_key), Field(ge=1)],
        Annotated[StrictInt, Field(ge=0)],
    ] = Field(
        min_length=1,
        max_length=MAX_TRAFFIC_VERSIONS,
        description=TRAFFIC_DESCRIPTION + '; e.g. {"3": 90, "4": 10}, or {"3": 100} to roll '
        "back to version 3 (it becomes current)",
    )


class TrafficOut(BaseModel):
    """The split in effect after a change (or now)."""

    name: str
    current: int = Field(
        description="The current version (what pinned-less requests get without a split)"
    )
    traffic: dict[str, int] = Field(description=TRAFFIC_DESCRIPTION)


class Registered(BaseModel):
    name: str
    version: int
    sha256: str
    current: bool = True
    """Whether requests for the plain name now get this version (an upload that was not
    promoted, or kept a canary split, is stored and loaded but takes no traffic yet)."""


class VersionDeleted(BaseModel):
    name: str
    version: int
    deleted: bool = True
    current: int
    """The current version after the delete."""


class Deleted(BaseModel):
    name: str
    deleted: bool = True


# --- health ------------------------------------------------------------------------------


class Live(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    """Readiness: the replica can serve predictions (backbone loaded, tuner index read at least
    once, accepting); ``reasons`` says what is not."""

    model_config = ConfigDict(extra="allow")

    ready: bool
    reasons: list[str] = Field(default_factory=list)
    demo: dict[str, Any] | None = Field(
        default=None,
        description="With RESTUNE_DEMO: the demo bootstrap's state (training, done, ...), "
        "the demo tuners and those registered so far",
    )


def inline_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, for a hand-written OpenAPI body."""
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved

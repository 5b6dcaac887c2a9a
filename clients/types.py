"""Typed results of the restune HTTP API, parsed from its JSON once.

Every result keeps the JSON it came from in ``raw`` so that fields a newer server adds are not
lost to an older client.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TaskError:
    """A per-task failure inside an otherwise successful prediction."""

    code: str
    detail: str


@dataclass(frozen=True)
class TaskAnswer:
    """One task's answer for one image.

    Exactly one of ``labels`` (classification, multilabel), ``values`` (regression),
    ``embedding`` (embedding, L2-normalised) or ``error`` is set.
    """

    version: int | None
    sha256: str | None
    kind: str | None
    labels: list[tuple[str, float]] | None = None
    """(label, score) pairs, best first."""
    values: dict[str, float] | None = None
    embedding: list[float] | None = None
    error: TaskError | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """False when the task failed for this request."""
        return self.error is None

    @property
    def top(self) -> tuple[str, float] | None:
        """The best (label, score), for label tasks."""
        return self.labels[0] if self.labels else None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskAnswer:
        """Parse one entry of ``results[i].tasks``."""
        err = data.get("error")
        error = None
        if isinstance(err, Mapping):
            error = TaskError(str(err.get("code", "error")), str(err.get("detail", "")))
        labels = data.get("labels")
        values = data.get("values")
        embedding = data.get("embedding")
        return cls(
            version=_opt_int(data.get("version")),
            sha256=_opt_str(data.get("sha256")),
            kind=_opt_str(data.get("kind")),
            labels=(
                [(str(x["label"]), float(x["score"])) for x in labels]
                if isinstance(labels, list)
                else None
            ),
            values=(
                {str(k): float(v) for k, v in values.items()}
                if isinstance(values, Mapping)
                else None
            ),
            embedding=[float(x) for x in embedding] if isinstance(embedding, list) else None,
            error=error,
            raw=dict(data),
        )


@dataclass(frozen=True)
class ImageResult:
    """All requested tasks' answers for one image (``image`` is its index in the request)."""

    image: int
    tasks: dict[str, TaskAnswer]

    def __getitem__(self, task: str) -> TaskAnswer:
        return self.tasks[task]


@dataclass(frozen=True)
class Prediction:
    """The answer of ``POST /v1/predict``: one :class:`ImageResult` per image, in order."""

    results: list[ImageResult]
    backbone: dict[str, Any]
    timing: dict[str, float]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __getitem__(self, image: int) -> ImageResult:
        return self.results[image]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[ImageResult]:
        return iter(self.results)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prediction:
        """Parse the predict response body."""
        results = [
            ImageResult(
                image=int(r.get("image", i)),
                tasks={str(name): TaskAnswer.from_json(t) for name, t in r["tasks"].items()},
            )
            for i, r in enumerate(data.get("results", []))
        ]
        timing = data.get("timing") or {}
        return cls(
            results=results,
            backbone=dict(data.get("backbone") or {}),
            timing={str(k): float(v) for k, v in timing.items() if isinstance(v, int | float)},
            raw=dict(data),
        )


@dataclass(frozen=True)
class TunerInfo:
    """A registered tuner, from ``GET /v1/tuners`` (``config`` and ``versions`` only from
    ``GET /v1/tuners/{name}``)."""

    name: str
    version: int | None
    sha256: str | None
    kind: str | None
    labels: list[str]
    params: int | None = None
    bytes: int | None = None
    loaded: bool | None = None
    pooling: str | None = None
    tuner: str | None = None
    created_at: str | None = None
    training: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    versions: list[Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TunerInfo:
        """Parse one tuner entry."""
        labels = data.get("labels")
        training = data.get("training")
        config = data.get("config")
        versions = data.get("versions")
        loaded = data.get("loaded")
        return cls(
            name=str(data["name"]),
            version=_opt_int(data.get("version")),
            sha256=_opt_str(data.get("sha256")),
            kind=_opt_str(data.get("kind")),
            labels=[str(x) for x in labels] if isinstance(labels, list) else [],
            params=_opt_int(data.get("params")),
            bytes=_opt_int(data.get("bytes")),
            loaded=loaded if isinstance(loaded, bool) else None,
            pooling=_opt_str(data.get("pooling")),
            tuner=_opt_str(data.get("tuner")),
            created_at=_opt_str(data.get("created_at")),
            training=dict(training) if isinstance(training, Mapping) else None,
            config=dict(config) if isinstance(config, Mapping) else None,
            versions=list(versions) if isinstance(versions, list) else None,
            raw=dict(data),
        )


@dataclass(frozen=True)
class PushResult:
    """The answer of ``PUT /v1/tuners/{name}``.

    ``created`` is False when identical bytes already were a version of that name (HTTP 200):
    the server deduplicates by content, so pushing the same file twice is harmless.
    """

    name: str
    version: int
    sha256: str
    created: bool
    current: bool = True
    """Whether plain requests for ``name`` now get this version: False for an upload that
    was not promoted or that kept a canary split (servers before rollouts always promoted)."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, created: bool) -> PushResult:
        """Parse the push response body; ``created`` comes from the status (201 vs 200)."""
        current = data.get("current", True)
        return cls(
            name=str(data["name"]),
            version=int(data["version"]),
            sha256=str(data["sha256"]),
            created=created,
            current=current if isinstance(current, bool) else True,
        )


@dataclass(frozen=True)
class Traffic:
    """How requests for a plain tuner name are split between its versions
    (``GET``/``PUT /v1/tuners/{name}/traffic``): ``weights`` by version; one version with
    all the weight when there is no canary split."""

    name: str
    current: int
    weights: dict[int, int]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def share(self, version: int) -> float:
        """The fraction of images ``version`` answers (0.0 when it has no weight)."""
        total = sum(self.weights.values())
        return self.weights.get(version, 0) / total if total else 0.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Traffic:
        """Parse the traffic body (weights keyed by version as strings)."""
        weights = data.get("traffic") or {}
        return cls(
            name=str(data["name"]),
            current=int(data["current"]),
            weights={int(v): int(w) for v, w in weights.items()},
            raw=dict(data),
        )


@dataclass(frozen=True)
class VersionDeleted:
    """The answer of ``DELETE /v1/tuners/{name}/versions/{version}``: ``current`` is the
    name's current version afterwards."""

    name: str
    version: int
    current: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VersionDeleted:
        """Parse the delete-version body."""
        return cls(str(data["name"]), int(data["version"]), int(data["current"]))


@dataclass(frozen=True)
class Health:
    """Liveness and readiness of a server (``/healthz`` and ``/readyz``)."""

    live: bool
    ready: bool
    detail: dict[str, Any]
    """The ``/readyz`` body (backbone, device, providers, store, or the reason it is not ready)."""

"""The tuner configuration carried in an artifact's header, and the tensors it implies.

This module is the contract between the model library (which builds modules whose
``state_dict`` keys are exactly :func:`tensor_specs`) and the stores (which validate an
upload from its header alone, without torch).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT_VERSION = "1"
"""Value of ``restune.format`` in the safetensors metadata."""

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
"""Tuner names: lower-case ASCII, digits, ``.``, ``_``, ``-``; at most 64 characters."""
NAME_RE = re.compile(rf"^{NAME_PATTERN}$")

TaskKind = Literal["classification", "multilabel", "regression", "embedding"]
TunerKind = Literal["res_adapter", "res_prefix", "res_prompt"]
Combine = Literal["sum", "lerp"]
ScaleMode = Literal["fixed", "scalar", "channel"]
Pooling = Literal["cls", "mean"]
Side = Literal["lateral", "vertical"]
SIDES: tuple[Side, Side] = ("lateral", "vertical")

MAX_LABELS = 10_000
MAX_BOTTLENECK = 4096
MAX_PREFIX = 256
MAX_SCALE = 1000.0
"""Largest magnitude of ``bypass.scale``: trained scales are around 0.1..10; a larger one only
turns the delta into an overflow on real inputs."""
MAX_SUMMARY_VALUE = 1e15
"""Largest magnitude of a training-summary number (scores, losses, counts as floats)."""
MAX_SUMMARY_EXTRA = 64
"""Most entries of ``training.extra``."""
MAX_COUNT = 10**12
"""Largest epoch / sample count in a training summary."""


class _Model(BaseModel):
    # No NaN or Infinity anywhere: they are not JSON, and a NaN scale answers NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BackboneRef(_Model):
    """Which backbone the tuner was trained on."""

    arch: str = Field(min_length=1, max_length=128)
    """Preset name, e.g. ``vit_small_patch14_dinov2``."""
    fingerprint: str = Field(min_length=8, max_length=128)
    """Hash of architecture, data config and weights; must equal the server's."""
    dim: int = Field(gt=0, le=16384)
    """Embedding width D of the residual stream."""
    depth: int = Field(gt=0, le=256)
    """Number of transformer blocks L."""


class BypassConfig(_Model):
    """The bypass: Res-Tuners beside blocks ``layers[0]..layers[1]`` (1-based, inclusive)."""

    tuner: TunerKind = "res_adapter"
    """Kind of every lateral and vertical Res-Tuner."""
    layers: tuple[int, int]
    """First and last block whose output feeds the bypass. h_{first-1} = x_{first-1}."""
    bottleneck: int = Field(default=32, gt=0, le=MAX_BOTTLENECK)
    """Hidden width r of each Res-Tuner."""
    combine: Combine = "sum"
    """``sum``: h_l = lat(x_l) + vert(h_{l-1}); ``lerp``: lam * lat + (1 - lam) * vert."""
    lam: float = Field(default=0.5, ge=0.0, le=1.0)
    """Weight of the lateral branch when ``combine == "lerp"``."""
    scale_mode: ScaleMode = "fixed"
    """``fixed``: delta scaled by ``scale``; ``scalar``/``channel``: a learned tensor ``scale``."""
    scale: float = Field(default=1.0, ge=-MAX_SCALE, le=MAX_SCALE)
    """The fixed scale, or the initial value of a learned one."""
    prefix_len: int = Field(default=8, gt=0, le=MAX_PREFIX)
    """Number of learned prefix / prompt tokens (res_prefix, res_prompt only)."""

    @field_validator("layers")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1 or v[1] < v[0]:
            raise ValueError("layers must be [first, last] with 1 <= first <= last")
        return v

    @property
    def block_range(self) -> range:
        """Blocks l whose lateral/vertical tuners exist."""
        return range(self.layers[0], self.layers[1] + 1)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Backbone features x_l this bypass reads: x_{first-1} .. x_{last}."""
        return tuple(range(self.layers[0] - 1, self.layers[1] + 1))


class TrainingSummary(_Model):
    """What the tuner was trained on and how well it did."""

    data: str = Field(default="", max_length=2000)
    epochs: int = Field(default=0, ge=0, le=MAX_COUNT)
    train_size: int = Field(default=0, ge=0, le=MAX_COUNT)
    val_size: int = Field(default=0, ge=0, le=MAX_COUNT)
    val_metric: str = Field(default="", max_length=200)
    val_score: float | None = Field(default=None, ge=-MAX_SUMMARY_VALUE, le=MAX_SUMMARY_VALUE)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    extra: dict[str, float] = Field(default_factory=dict, max_length=MAX_SUMMARY_EXTRA)

    @field_validator("extra")
    @classmethod
    def _extra(cls, v: dict[str, float]) -> dict[str, float]:
        if any(not key or len(key) > 200 for key in v):
            raise ValueError("extra keys must be 1..200 characters")
        if any(abs(x) > MAX_SUMMARY_VALUE for x in v.values()):
            raise ValueError(f"extra values must be within +-{MAX_SUMMARY_VALUE:g}")
        return v


class TunerConfig(_Model):
    """Everything a server needs to know about a tuner, stored as ``restune.config``."""

    name: str
    task: TaskKind
    labels: tuple[str, ...] = ()
    """Class names (classification, multilabel) or output names (regression)."""
    embedding_dim: int | None = Field(default=None, gt=0, le=16384)
    """Output width of an ``embedding`` task; ``None`` for the others."""
    backbone: BackboneRef
    bypass: BypassConfig
    pooling: Pooling = "cls"
    """``cls``: the CLS row; ``mean``: mean of the patch tokens (all tokens needed)."""
    description: str = Field(default="", max_length=2000)
    training: TrainingSummary = Field(default_factory=TrainingSummary)
    created_at: str = Field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"), max_length=64
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"name must match {NAME_PATTERN}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} labels")
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        if any(not label or len(label) > 200 for label in v):
            raise ValueError("labels must be 1..200 characters")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TunerConfig:
        if self.task == "embedding":
            if self.embedding_dim is None:
                raise ValueError("an embedding task needs embedding_dim")
        else:
            if not self.labels:
                raise ValueError(f"a {self.task} task needs labels")
            if self.embedding_dim is not None:
                raise ValueError("embedding_dim is only for embedding tasks")
        if self.bypass.layers[1] > self.backbone.depth:
            raise ValueError(
                f"bypass layers {list(self.bypass.layers)} exceed "
                f"backbone depth {self.backbone.depth}"
            )
        return self

    @property
    def num_outputs(self) -> int:
        """Width of the head's output."""
        return self.embedding_dim if self.embedding_dim is not None else len(self.labels)

    @property
    def token_selection(self) -> Literal["cls", "all"]:
        """CLS-pooled tasks need only CLS rows of the features: a bypass over detached
        features never feeds back into the backbone's other tokens."""
        return "cls" if self.pooling == "cls" else "all"

    @property
    def stack_key(self) -> tuple[object, ...]:
        """Tasks with equal keys have identically shaped bypass tensors and pool alike, so
        they stack whatever their heads (kind and class count differ only in the head)."""
        b = self.bypass
        return (
            b.tuner,
            b.layers,
            b.bottleneck,
            b.combine,
            b.lam if b.combine == "lerp" else None,
            b.scale_mode,
            b.scale if b.scale_mode == "fixed" else None,
            b.prefix_len if b.tuner != "res_adapter" else None,
            self.pooling,
        )

    @property
    def shape_key(self) -> tuple[object, ...]:
        """Tasks with equal keys have identically shaped tensors, heads included."""
        return (*self.stack_key, self.task, self.num_outputs)


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape of one tensor of an artifact."""

    shape: tuple[int, ...]


def tuner_tensor_specs(
    kind: TunerKind, prefix: str, dim: int, b: BypassConfig
) -> dict[str, TensorSpec]:
    """Tensors of one Res-Tuner named ``prefix`` (e.g. ``bypass.lateral.3``)."""
    r, p, d = b.bottleneck, b.prefix_len, dim
    if kind == "res_adapter":
        # t + s * (W2 GELU(W1 t + b1) + b2)
        shapes = {"w1": (r, d), "b1": (r,), "w2": (d, r), "b2": (d,)}
    elif kind == "res_prefix":
        # t + s * (Wo softmax((Wq t) K^T / sqrt(r)) V + bo), K, V learned (P, r)
        shapes = {"wq": (r, d), "k": (p, r), "v": (p, r), "wo": (d, r), "bo": (d,)}
    else:  # res_prompt: K = prompt Wk^T, V = prompt Wv^T from learned prompt tokens (P, D)
        shapes = {
            "wq": (r, d),
            "prompt": (p, d),
            "wk": (r, d),
            "wv": (r, d),
            "wo": (d, r),
            "bo": (d,),
        }
    if b.scale_mode == "scalar":
        shapes["scale"] = (1,)
    elif b.scale_mode == "channel":
        shapes["scale"] = (d,)
    return {f"{prefix}.{k}": TensorSpec(v) for k, v in shapes.items()}


def tensor_specs(config: TunerConfig) -> dict[str, TensorSpec]:
    """Every tensor an artifact of ``config`` must hold, by name, with its shape.

    Names: ``bypass.{lateral|vertical}.{l}.{param}`` for l in the bypass's block range, and
    ``head.weight`` (num_outputs, D), ``head.bias`` (num_outputs,). The backbone's final norm is
    not part of the artifact: the bypass uses the backbone's own, frozen.
    """
    d = config.backbone.dim
    specs: dict[str, TensorSpec] = {}
    for layer in config.bypass.block_range:
        for side in SIDES:
            specs.update(
                tuner_tensor_specs(config.bypass.tuner, f"bypass.{side}.{layer}", d, config.bypass)
            )
    specs["head.weight"] = TensorSpec((config.num_outputs, d))
    specs["head.bias"] = TensorSpec((config.num_outputs,))
    return specs


def parameter_count(config: TunerConfig) -> int:
    """Number of scalars in the artifact."""
    total = 0
    for spec in tensor_specs(config).values():
        n = 1
        for s in spec.shape:
            n *= s
        total += n
    return total

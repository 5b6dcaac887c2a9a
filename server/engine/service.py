"""The facade the HTTP layer talks to: predict, the tuner registry, readiness.

Request path: validate the task list -> resolve every task once (404 before any decoding) ->
decode + preprocess in a small thread pool (never on the event loop) -> micro-batcher ->
engine -> one JSON body. Nothing here knows HTTP; failures are :class:`ApiError`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.batcher import Completed, MicroBatcher
from server.engine.decode import input_digest, prepare_image
from server.engine.decode_gpu import GpuImageDecoder, build_gpu_decoder
from server.engine.engine import Answer, BatchItem, Engine, task_error
from server.engine.feature_cache import FeatureCache
from server.engine.gpu_engine import build_engine
from server.engine.leases import LeaseSet
from server.engine.loaded_tuner import LoadedTuner
from server.engine.registry import TunerDetail, TunerRegistry, TunerSummary
from server.engine.runtime import Backbone, load_backbone_runtime
from server.errors import ApiError
from server.metrics import Metrics, TaskTally
from server.settings import Settings
from tuners_store import TunerStore, open_store

log = logging.getLogger(__name__)

__all__ = [
    "InferenceService",
    "TaskRef",
    "TunerDetail",
    "TunerSummary",
    "parse_version",
]

READY_PING_TIMEOUT_S = 2.0
"""How long /readyz waits for the store to answer."""

_RESOLVE_FATAL = frozenset({"unknown_task", "unknown_version", "store_unavailable"})
"""Resolution failures that fail the whole request; the others (a version that cannot be
loaded) become per-task errors. ``store_unavailable`` is the replica's state, not the task's:
the whole request answers 503 with Retry-After, so a proxy or client retries elsewhere."""


MAX_TASK_REF_CHARS = 256
"""Longest task reference a request may name (``tenant/name@version`` needs at most 139)."""
MAX_VERSION_DIGITS = 9
"""A version number has at most this many digits (versions count up from 1)."""
_VERSION_RE = re.compile(rf"[0-9]{{1,{MAX_VERSION_DIGITS}}}")


def parse_version(text: str) -> int | None:
    """``text`` as a version number >= 1 (ASCII digits, bounded length), else None."""
    if not _VERSION_RE.fullmatch(text):
        return None
    number = int(text)
    return number if number >= 1 else None


@dataclass(frozen=True)
class TaskRef:
    """A task named in a request: ``name`` (current or canary version) or ``name@version``."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> TaskRef:
        """``"a"`` -> current version of a; ``"a@3"`` -> version 3 of a.

        Checked before anything else reads it: at most :data:`MAX_TASK_REF_CHARS`
        characters, valid UTF-8 (no lone surrogates, which a JSON string may carry), and a
        version of ASCII digits only (``str.isdigit`` also takes ``"²"``, which ``int``
        refuses), at most :data:`MAX_VERSION_DIGITS` of them.
        """
        text = text.strip()
        if len(text) > MAX_TASK_REF_CHARS:
            raise ApiError(
                "validation_error",
                f"task name of {len(text)} characters; at most {MAX_TASK_REF_CHARS}",
                task=text,
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                "validation_error", "task name is not valid Unicode text", task=text
            ) from None
        name, sep, version = text.rpartition("@")
        if not sep:
            return cls(text)
        if not name or parse_version(version) is None:
            raise ApiError(
                "validation_error",
                f"task {text!r}: pin a version as name@N with N >= 1",
                task=text,
            )
        return cls(name, int(version))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def answer_keys(tasks: list[TaskRef]) -> list[str]:
    """The key each task's answer has in a response: its name, or, where a request names one
    task more than once (``pets@1,pets@2``), the reference as written, so both answers fit
    and a client tells them apart. Plain requests keep the keys they always had."""
    counts = Counter(ref.name for ref in tasks)
    return [ref.name if counts[ref.name] == 1 else str(ref) for ref in tasks]


def layers(tuners: list[LoadedTuner]) -> list[tuple[LoadedTuner, ...]]:
    """``tuners`` split into the fewest groups of distinct names, in order: the engine keys an
    image's answers by task name, so two versions of one name go in two batch items (of one
    pixel digest, so the backbone still runs once for the image)."""
    out: list[list[LoadedTuner]] = []
    for tuner in tuners:
        for layer in out:
            if all(t.name != tuner.name for t in layer):
                layer.append(tuner)
                break
        else:
            out.append([tuner])
    return [tuple(layer) for layer in out]


_Prepared = tuple[torch.Tensor, str]
"""(pixels (3, H, W) float32, digest) of one image."""

_Plan = LoadedTuner | ApiError
"""A task resolved for the request, or the per-task error it answers with."""


class InferenceService:
    """Backbone + registry + batcher + engine, wired from :class:`Settings`."""

    registry: TunerRegistry
    engine: Engine
    batcher: MicroBatcher
    cache: FeatureCache

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        backbone: Backbone | None = None,
        store: TunerStore | None = None,
    ) -> None:
        """``backbone`` / ``store`` replace the ones the settings name (tests, other runtimes)."""
        self.settings = settings
        self.metrics = metrics
        self._backbone = backbone
        self._store = store
        self._decode_pool: ThreadPoolExecutor | None = None
        self._gpu_decoder: GpuImageDecoder | None = None
        self.started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the backbone, open the store, start registry sync and the batcher."""
        s = self.settings
        if self._backbone is None:
            self._backbone = await asyncio.to_thread(load_backbone_runtime, s)
        if self._store is None:
            self._store = open_store(s.store)
        self.cache = FeatureCache(s.feature_cache_bytes, self.metrics)
        # On CUDA (torch runtime): bf16, CUDA graph plans, JPEGs decoded on the GPU.
        self.engine = build_engine(s, self._backbone, self.cache, self.metrics)
        self._gpu_decoder = build_gpu_decoder(s, self._backbone.data_config)
        self.registry = TunerRegistry(
            self._store, self._backbone, s, self.metrics, tuner_device=s.device
        )
        # An unloaded version's stacked groups go with it, or they would keep it in memory.
        self.registry.add_unload_listener(self.engine.forget_tuner)
        # A new version's graph plans (CUDA) are queued as it is swapped in, not on first use.
        self.registry.add_swap_listener(self.engine.on_tuner_swapped)
        self.metrics.watch_tuners(self.registry.tuner_state)
        await self.registry.start()
        self.batcher = MicroBatcher(
            self.engine.run_batch,
            max_batch_images=s.max_batch_images,
            max_wait_ms=s.max_wait_ms,
            max_queue_images=s.max_queue_images,
            metrics=self.metrics,
        )
        self.batcher.start()
        self._decode_pool = ThreadPoolExecutor(
            s.decode_threads, thread_name_prefix="restune-decode"
        )
        b = self._backbone
        self.metrics.backbone_info.labels(
            arch=b.arch,
            runtime=b.runtime,
            device=b.device,
            dtype=b.dtype,
            providers=",".join(b.providers),
        ).set(1)
        self.started = True

    async def stop(self) -> None:
        """Finish queued work, refuse new, then close the registry and the store."""
        if not self.started:
            return
        self.started = False
        await self.batcher.drain(grace_s=self.settings.request_timeout_s)
        self.engine.close()  # after the last batch: no plan is replaying
        await self.registry.stop()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
        await self.store.close()

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            raise ApiError("not_ready", "the backbone is not loaded yet", retry_after=5)
        return self._backbone

    @property
    def store(self) -> TunerStore:
        if self._store is None:
            raise ApiError("not_ready", "the tuner store is not open yet", retry_after=5)
        return self._store

    # ------------------------------------------------------------------ predict

    async def predict(
        self, images: list[bytes], tasks: list[TaskRef], top_k: int
    ) -> dict[str, Any]:
        """The full ``POST /v1/predict`` response for encoded images."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._check_request(len(images), tasks, top_k)
        # Under overload, refuse before paying for decoding (enqueue checks again after).
        self.batcher.admit(len(images))
        # Every tuner the request resolves is leased until it is answered (or fails, or is
        # cancelled), so unloading one waits for it.
        with LeaseSet(self.registry.leases) as lease:
            plans = await self._resolve(tasks, lease)
            decode_started = loop.time()
            prepared = await self._decode_all(images)
            decode_ms = (loop.time() - decode_started) * 1000.0
            return await self._run(prepared, tasks, plans, top_k, started, decode_ms, lease)

    async def predict_tensor(
        self, pixels: torch.Tensor, tasks: list[TaskRef], top_k: int
    ) -> dict[str, Any]:
        """Like :meth:`predict` for already preprocessed images (B, 3, H, W) float32.

        The tensor must match :meth:`preprocess_config` (size; normalised with its mean/std).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._check_tensor(pixels)
        self._check_request(int(pixels.shape[0]), tasks, top_k)
        with LeaseSet(self.registry.leases) as lease:
            plans = await self._resolve(tasks, lease)
            prepared = [(row.contiguous(), input_digest(row)) for row in pixels.detach().cpu()]
            return await self._run(prepared, tasks, plans, top_k, started, 0.0, lease)

    def preprocess_config(self) -> dict[str, Any]:
        """What a client must do to send preprocessed tensors: size, mean/std, resize rule."""
        dc = self.backbone.data_config
        return {
            "input_size": list(dc.input_size),
            "mean": list(dc.mean),
            "std": list(dc.std),
            "interpolation": dc.interpolation,
            "crop_pct": dc.crop_pct,
        }

    def _check_request(self, n_images: int, tasks: list[TaskRef], top_k: int) -> None:
        s = self.settings
        if not self.started:
            raise ApiError("not_ready", "the service is starting", retry_after=5)
        if not tasks:
            raise ApiError("no_tasks", "name at least one task (tasks=a,b or task=a)")
        if len(tasks) > s.max_tasks_per_request:
            raise ApiError(
                "too_many_tasks",
                f"{len(tasks)} tasks requested; at most {s.max_tasks_per_request} per request",
            )
        # One name may come more than once only pinned to distinct versions (``pets@1,pets@2``,
        # a side-by-side comparison); its plain form picks a version per image, which could
        # be one of the pinned ones, so it stays alone.
        seen: dict[str, list[TaskRef]] = {}
        for ref in tasks:
            same = seen.setdefault(ref.name, [])
            if same and (ref.version is None or ref in same or same[0].version is None):
                raise ApiError("duplicate_task", f"task {ref.name!r} is named twice", task=ref.name)
            same.append(ref)
        if n_images < 1:
            raise ApiError("validation_error", "send at least one image")
        if n_images > s.max_images_per_request:
            raise ApiError(
                "too_many_images",
                f"{n_images} images sent; at most {s.max_images_per_request} per request",
            )
        if not 1 <= top_k <= s.max_top_k:
            raise ApiError("validation_error", f"top_k must be between 1 and {s.max_top_k}")

    def _check_tensor(self, pixels: torch.Tensor) -> None:
        expected = tuple(self.backbone.data_config.input_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise ApiError(
                "validation_error",
                f"expected a (B, {', '.join(map(str, expected))}) tensor, "
                f"got {tuple(pixels.shape)}",
            )
        if pixels.dtype != torch.float32:
            raise ApiError("validation_error", f"expected float32 pixels, got {pixels.dtype}")
        if not bool(torch.isfinite(pixels).all()):
            raise ApiError("validation_error", "the tensor holds NaN or Inf")

    async def _resolve(self, tasks: list[TaskRef], lease: LeaseSet) -> dict[str, _Plan]:
        """Every task resolved once (concurrently); unknown names or versions, or a tuner that
        needs the store while it is down, fail the request."""
        results = await asyncio.gather(
            *(self.registry.resolve(ref.name, ref.version, lease=lease) for ref in tasks),
            return_exceptions=True,
        )
        plans: dict[str, _Plan] = {}
        for key, result in zip(answer_keys(tasks), results, strict=True):
            if isinstance(result, ApiError) and result.code in _RESOLVE_FATAL:
                raise result
            if isinstance(result, BaseException) and not isinstance(result, ApiError):
                raise result
            plans[key] = result
        return plans

    async def _decode_all(self, images: list[bytes]) -> list[_Prepared]:
        """Decode + preprocess every image in the decode pool; the first bad one fails all."""
        loop = asyncio.get_running_loop()
        if self._gpu_decoder is not None:
            # JPEGs in one batch on the GPU, limits checked first: one pool call per request.
            return await loop.run_in_executor(self._decode_pool, self._gpu_decoder.prepare, images)
        results = await asyncio.gather(
            *(
                loop.run_in_executor(self._decode_pool, self._prepare, data, index)
                for index, data in enumerate(images)
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if not isinstance(r, BaseException)]

    def _prepare(self, data: bytes, index: int) -> _Prepared:
        """(pixels (3, H, W), cache key) of one image; the key hashes the pixels the backbone
        sees, so identical inputs within a batch or across requests share features."""
        s = self.settings
        pixels = prepare_image(
            data,
            index,
            self.backbone.data_config,
            max_bytes=s.max_image_bytes,
            max_pixels=s.max_image_pixels,
            max_aspect_ratio=s.max_image_aspect_ratio,
            mode=s.preprocess,
        )  # (3, H, W)
        return pixels, input_digest(pixels)

    async def _run(
        self,
        prepared: list[_Prepared],
        tasks: list[TaskRef],
        plans: dict[str, _Plan],
        top_k: int,
        started: float,
        decode_ms: float,
        lease: LeaseSet,
    ) -> dict[str, Any]:
        """Batch the images with their tuners and assemble the response body."""
        loop = asyncio.get_running_loop()
        deadline = started + self.settings.request_timeout_s
        keys = answer_keys(tasks)
        per_image = [
            await self._tuners_for(tasks, keys, plans, digest, lease) for _, digest in prepared
        ]
        items: list[BatchItem] = []
        # The image of each item: one per image, more where a name comes in two versions.
        owners: list[int] = []
        for index, ((pixels, digest), tuners) in enumerate(zip(prepared, per_image, strict=True)):
            runnable = [t for t in tuners.values() if isinstance(t, LoadedTuner)]
            for layer in layers(runnable):
                items.append(BatchItem(pixels, digest, layer, top_k))
                owners.append(index)
        completed: list[Completed] = []
        if items:
            completed = await self.batcher.submit(items, deadline=deadline)
        by_image: dict[int, list[tuple[BatchItem, Completed]]] = {}
        for owner, item, done in zip(owners, items, completed, strict=True):
            by_image.setdefault(owner, []).append((item, done))

        results = []
        answered: dict[tuple[str, int], int] = {}
        # The batch item that answered each (image, task), found once here and reused by the
        # per-task statistics: None where the task never ran (refused while resolving).
        ran: list[list[Completed | None]] = []
        for index, tuners in enumerate(per_image):
            ran_here: list[Completed | None] = []
            ran.append(ran_here)
            answers: dict[str, Answer] = {}
            for ref, key in zip(tasks, keys, strict=True):
                plan = tuners[key]
                ran_here.append(None)
                if isinstance(plan, ApiError):
                    answers[key] = task_error(plan.code, plan.detail)
                    continue
                for item, done in by_image.get(index, []):
                    if any(t is plan for t in item.tuners):
                        ran_here[-1] = done
                        answer = answers[key] = done.output.answers[ref.name]
                        if "version" in answer:
                            counted = (ref.name, int(answer["version"]))
                            answered[counted] = answered.get(counted, 0) + 1
                        break
            results.append({"image": index, "tasks": answers})
        self.registry.count_answers(answered)
        self.metrics.count_answers(answered)
        self._record_tasks(tasks, keys, per_image, ran, loop.time() - started)
        batches = {c.batch.batch_id: c.batch for c in completed}.values()
        timing = {
            "queue_ms": round(max((c.queue_ms for c in completed), default=0.0), 3),
            "decode_ms": round(decode_ms, 3),
            "backbone_ms": round(sum(b.backbone_ms for b in batches), 3),
            "fanout_ms": round(sum(b.fanout_ms for b in batches), 3),
            "total_ms": round((loop.time() - started) * 1000.0, 3),
            "cache_hits": sum(1 for c in completed if c.output.cache_hit),
        }
        return {"results": results, "backbone": self.backbone_info(), "timing": timing}

    def _record_tasks(
        self,
        tasks: list[TaskRef],
        keys: list[str],
        per_image: list[dict[str, _Plan]],
        ran: list[list[Completed | None]],
        total_s: float,
    ) -> None:
        """Per-task success, failure and timing of the request's answers (the per-task
        latency series and the protocol's statistics), tallied per task version first.
        ``ran[image][task]``: the batch item that answered it, None if it never ran."""
        tallies: dict[tuple[str, int | None], TaskTally] = {}
        for plans, ran_here in zip(per_image, ran, strict=True):
            for ref, key, done in zip(tasks, keys, ran_here, strict=True):
                plan = plans[key]
                version = plan.version if isinstance(plan, LoadedTuner) else None
                tally = tallies.get((ref.name, version))
                if tally is None:
                    tally = tallies[(ref.name, version)] = TaskTally(total_s)
                if done is None or "error" in done.output.answers.get(ref.name, {}):
                    tally.failed += 1
                    continue
                tally.ok += 1
                tally.queue_s += done.queue_ms / 1000.0
                tally.compute_s += (done.batch.backbone_ms + done.batch.fanout_ms) / 1000.0
        for (name, version), tally in tallies.items():
            self.metrics.record_task(name, version, tally)

    async def _tuners_for(
        self,
        tasks: list[TaskRef],
        keys: list[str],
        plans: dict[str, _Plan],
        digest: str,
        lease: LeaseSet,
    ) -> dict[str, _Plan]:
        """The plan of each task (by answer key) for one image: a canary split picks by the
        image digest."""
        out: dict[str, _Plan] = {}
        for ref, key in zip(tasks, keys, strict=True):
            plan = plans[key]
            if ref.version is None and self.registry.has_split(ref.name):
                try:
                    plan = await self.registry.resolve(ref.name, None, digest, lease)
                except ApiError as exc:
                    if exc.code in _RESOLVE_FATAL:
                        raise
                    plan = exc
            out[key] = plan
        return out

    # ------------------------------------------------------------------ health

    def backbone_info(self) -> dict[str, Any]:
        """What runs the features: the ``backbone`` object of every predict response."""
        b = self.backbone
        return {
            "arch": b.arch,
            "fingerprint": b.fingerprint,
            "runtime": b.runtime,
            "device": b.device,
            "dtype": b.dtype,
        }

    async def ready(self) -> dict[str, Any]:
        """Readiness = can serve predictions: backbone loaded, a tuner index read from the store
        at least once (a stale one is fine), batcher accepting. The store's own state is in
        ``store`` (``reachable``: it answered a ping now; ``index``: ``current``, ``stale``
        while it is unreachable, ``missing`` before the first read) and in the metric
        ``restune_tuner_store_up``; an outage alone never makes a replica unready, or one
        store outage would take every replica out of its load balancer at once."""
        store_ok = False
        store_error = None
        if self._store is not None:
            try:
                await asyncio.wait_for(self._store.ping(), READY_PING_TIMEOUT_S)
                store_ok = True
            except Exception as exc:  # any failure to answer means not reachable
                store_error = str(exc) or type(exc).__name__
        accepting = self.started and self.batcher.accepting
        synced = self.started and self.registry.index_synced
        if self.started:
            self.registry.store_ok = store_ok
        reasons = []
        if self._backbone is None:
            reasons.append("the backbone is not loaded")
        if self.started and not synced:
            reasons.append(
                f"no tuner index read from the store yet: {store_error or 'not reached yet'}"
            )
        if not accepting:
            reasons.append("the service is starting or shutting down")
        index = "missing" if not synced else ("current" if store_ok else "stale")
        body: dict[str, Any] = {
            "ready": not reasons,
            "reasons": reasons,
            "backbone_loaded": self._backbone is not None,
            "store": {
                "url": self._store.url if self._store else None,
                "reachable": store_ok,
                "index": index,
            },
            "accepting": accepting,
        }
        if store_error:
            body["store"]["error"] = store_error
        if self._backbone is not None:
            b = self._backbone
            body.update(
                backbone=self.backbone_info(),
                runtime=b.runtime,
                device=b.device,
                providers=list(b.providers),
                random_weights=b.is_random,
            )
        if self.started:
            body["queue_images"] = self.batcher.queued_images
            body["tuners_loaded"] = len(list(self.registry.loaded_tuners()))
        return body

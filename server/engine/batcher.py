"""Micro-batching: concurrent requests' images coalesced into engine batches.

One asyncio task forms batches of up to ``max_batch_images``; ONE worker thread runs them, so
the backbone never runs twice at once and torch keeps all its intra-op threads. While a batch
computes, new images queue and join the next batch.

A batch waits for more images only when more are expected: every image answered in the last
``max_wait_ms`` is a client likely to send again (a closed loop: a client waits for its answer,
then sends the next request), and each arrival counts against one such answer. When the engine
is free, the former waits (at most ``max_wait_ms``, at most until the batch is full) for the
expected ones; with none expected (no load, or their time has passed), the queued images go at
once. Without it, clients of a closed loop split into two halves that alternate on the engine
(each half queues while the other computes, and goes the moment the engine frees): batches of
4 under 8 clients with a max of 8, where the clients are 8 in flight. Measured by
bench/batch_fill.py (an engine that sleeps 4 ms + 1 ms per image, 8 clients whose next
requests pass one 1.5 ms decoder in turn, ``max_wait_ms`` 5): mean batch 3.2 -> 5.0; one
request at no load waits 6.3 -> 0.8 ms beyond the engine's own time.

The queue is bounded in images: a request that would overflow it is refused at once with
``overloaded`` (503 + Retry-After) instead of growing memory and latency. Images whose
deadline passed are dropped before compute; a request whose deadline passes while its batch
computes answers ``deadline_exceeded`` (504) alone, the batch goes on for the others. Should the
engine raise on a batch, it runs again one image at a time, so the fault costs only the image
that causes it. ``drain()`` finishes queued work and refuses new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server.engine.engine import BatchItem, BatchOutput, ItemOutput
from server.errors import ApiError
from server.metrics import Metrics

log = logging.getLogger(__name__)

RETRY_AFTER_BOUNDS_S = (1.0, 30.0)
"""Clamp of the Retry-After advertised when overloaded."""


@dataclass(frozen=True)
class BatchStats:
    """The batch an image was computed in."""

    batch_id: int
    size: int
    backbone_ms: float
    fanout_ms: float


@dataclass(frozen=True)
class Completed:
    """One image's answers and what it waited and cost."""

    output: ItemOutput
    queue_ms: float
    batch: BatchStats


@dataclass(eq=False)
class _Pending:
    item: BatchItem
    future: asyncio.Future[Completed]
    enqueued: float
    deadline: float | None


def _engine_failed() -> ApiError:
    return ApiError("internal", "the engine failed on this image")


@dataclass(frozen=True)
class _Outcome:
    """One answer or error per image of a batch, and what the batch cost."""

    results: list[ItemOutput | ApiError]
    backbone_ms: float
    fanout_ms: float


class MicroBatcher:
    """Bounded queue of images, batch former, and the single compute worker."""

    def __init__(
        self,
        run_batch: Callable[[list[BatchItem]], BatchOutput],
        *,
        max_batch_images: int,
        max_wait_ms: float,
        max_queue_images: int,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch_images < 1 or max_queue_images < 1:
            raise ValueError("max_batch_images and max_queue_images must be >= 1")
        self.run_batch = run_batch
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_images = max_queue_images
        self.metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._answered: deque[float] = deque(maxlen=max_batch_images)
        """``loop.time()`` of recently answered images whose clients have not sent again:
        the images the former expects (see the module doc)."""
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="restune-engine")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._busy = False
        self._batches = 0
        self._seconds_per_image = 0.01
        """Moving average of compute time per image: the basis of Retry-After."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the batch former (call from the running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="restune-batcher")

    async def drain(self, grace_s: float | None = None) -> None:
        """Refuse new images, finish the queued ones (for at most ``grace_s``), stop the worker."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace_s)
            except TimeoutError:
                log.warning("batcher drain timed out; failing %d queued images", len(self._queue))
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                self._fail_all(ApiError("not_ready", "the server is shutting down", retry_after=1))
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def queued_images(self) -> int:
        """Images waiting (not yet in a batch)."""
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return not self._closing

    # ------------------------------------------------------------------ submit

    async def submit(
        self, items: Sequence[BatchItem], *, deadline: float | None = None
    ) -> list[Completed]:
        """Queue ``items`` and wait for their answers, in order.

        ``deadline`` is an absolute ``loop.time()``; past it the request fails with
        ``deadline_exceeded`` (504) and its images still queued are withdrawn.
        """
        pending = self.enqueue(items, deadline=deadline)
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            return list(
                await asyncio.wait_for(asyncio.gather(*(p.future for p in pending)), timeout)
            )
        except TimeoutError:
            raise ApiError(
                "deadline_exceeded", "the request did not finish before its deadline"
            ) from None
        finally:
            self._withdraw(pending)

    def admit(self, n_images: int) -> None:
        """Refuse now what the queue could not take now (callers check before decoding).

        Raises ``overloaded`` (503 + Retry-After), ``too_many_images`` or ``not_ready``.
        """
        if self._closing:
            raise ApiError("not_ready", "the server is shutting down", retry_after=1)
        if n_images > self.max_queue_images:
            raise ApiError(
                "too_many_images",
                f"{n_images} images exceed the queue capacity of {self.max_queue_images}",
            )
        if len(self._queue) + n_images > self.max_queue_images:
            # Counted in restune_rejected_requests_total by the HTTP layer, like every refusal.
            raise ApiError(
                "overloaded",
                f"{len(self._queue)} images are queued (limit {self.max_queue_images}); "
                "retry later",
                retry_after=self.retry_after(),
            )

    def enqueue(
        self, items: Sequence[BatchItem], *, deadline: float | None = None
    ) -> list[_Pending]:
        """Put ``items`` in the queue or refuse them all at once (never partially)."""
        self.admit(len(items))
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = [_Pending(item, loop.create_future(), now, deadline) for item in items]
        self._queue.extend(pending)
        for _ in range(min(len(items), len(self._answered))):
            self._answered.popleft()  # an expected client came back
        self._report_depth()
        self._arrived.set()
        return pending

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained, clamped to a sane range."""
        backlog = (len(self._queue) + (self.max_batch_images if self._busy else 0)) * (
            self._seconds_per_image
        )
        low, high = RETRY_AFTER_BOUNDS_S
        return float(min(high, max(low, math.ceil(backlog))))

    def _withdraw(self, pending: list[_Pending]) -> None:
        """Take a finished or abandoned request's images that are still queued off the queue."""
        # A timeout cancels the futures (via gather) before we get here: cancelled ones may
        # still sit in the queue, holding capacity.
        unfinished = [p for p in pending if not p.future.done() or p.future.cancelled()]
        if not unfinished:
            return
        for p in unfinished:
            p.future.cancel()
        gone = set(map(id, unfinished))
        self._queue = deque(p for p in self._queue if id(p) not in gone)
        self._report_depth()

    # ------------------------------------------------------------------ batch former

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            close_at = loop.time() + self.max_wait_s
            while not self._closing:
                now = loop.time()
                expected = self._expected(now)
                if len(self._queue) >= min(self.max_batch_images, len(self._queue) + expected):
                    break
                # Until an arrival, the earliest expectation lapses, or the batch must go.
                until = min(close_at, self._answered[0] + self.max_wait_s)
                if until <= now:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), until - now)
            batch = self._take(loop.time())
            if batch:
                await self._compute(batch)

    def _expected(self, now: float) -> int:
        """Images expected soon: answered within the last ``max_wait_ms``, not yet back."""
        while self._answered and self._answered[0] + self.max_wait_s <= now:
            self._answered.popleft()
        return len(self._answered)

    def _take(self, now: float) -> list[_Pending]:
        """Up to ``max_batch_images`` live images from the head; expired ones fail here."""
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch_images:
            p = self._queue.popleft()
            if p.future.done():  # withdrawn (client gone, deadline hit while queued)
                continue
            if p.deadline is not None and now >= p.deadline:
                p.future.set_exception(
                    ApiError("deadline_exceeded", "the image waited in the queue past its deadline")
                )
                continue
            batch.append(p)
        self._report_depth()
        if self.metrics is not None:
            for p in batch:
                self.metrics.queue_wait.observe(now - p.enqueued)
        return batch

    async def _compute(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._busy = True
        self._batches += 1
        batch_id = self._batches
        try:
            output = await loop.run_in_executor(self._executor, self._run_isolated, batch)
        except Exception:  # the worker itself is gone (shut down): nothing can answer
            log.exception("the engine worker could not run a batch of %d images", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(_engine_failed())
            return
        finally:
            self._busy = False
        finished = loop.time()
        elapsed = finished - started
        self._answered.extend([finished] * len(batch))
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * (elapsed / len(batch))
        stats = BatchStats(batch_id, len(batch), output.backbone_ms, output.fanout_ms)
        for p, result in zip(batch, output.results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, ApiError):
                p.future.set_exception(result)
            else:
                p.future.set_result(Completed(result, (started - p.enqueued) * 1000.0, stats))

    def _run_isolated(self, batch: list[_Pending]) -> _Outcome:
        """The engine's answers for ``batch`` (on the worker thread), each image's own.

        The engine turns task and image faults into per-task errors; should it still raise, the
        batch runs again one image at a time, so the fault costs only the image that causes it
        (as an ``internal`` error), not every request that shared its batch.
        """
        try:
            return self._checked(batch)
        except Exception:
            log.exception("engine batch of %d images failed", len(batch))
            if len(batch) == 1:
                return _Outcome([_engine_failed()], 0.0, 0.0)
        results: list[ItemOutput | ApiError] = []
        backbone_ms = fanout_ms = 0.0
        for p in batch:
            # A read of the loop's future from this thread: at worst one image is computed
            # for nothing, or answered an error its request no longer waits for.
            if p.future.done():  # withdrawn meanwhile: not worth computing
                results.append(_engine_failed())
                continue
            try:
                alone = self._checked([p])
            except Exception:
                log.exception("engine failed on one image alone")
                results.append(_engine_failed())
                continue
            results.extend(alone.results)
            backbone_ms += alone.backbone_ms
            fanout_ms += alone.fanout_ms
        return _Outcome(results, backbone_ms, fanout_ms)

    def _checked(self, batch: list[_Pending]) -> _Outcome:
        output = self.run_batch([p.item for p in batch])
        if len(output.items) != len(batch):
            raise RuntimeError(f"engine answered {len(output.items)} of {len(batch)} images")
        return _Outcome(list(output.items), output.backbone_ms, output.fanout_ms)

    def _fail_all(self, error: ApiError) -> None:
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(error)
        self._report_depth()

    def _report_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

"""The micro-batcher: coalescing, bounded queue (fast 503), deadlines, order, drain."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch

from restuning.backbone import TorchBackbone
from server.engine.batcher import MicroBatcher
from server.engine.engine import BatchItem, BatchOutput, Engine
from server.engine.feature_cache import FeatureCache
from server.engine.loaded_tuner import LoadedTuner, module_nbytes
from server.errors import ApiError
from server.metrics import Metrics
from tests.fixtures.tuners import make_config, make_task
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import (
    Gate,
    RecordingRuntime,
    answers_close,
    loaded_tuner,
    pixels_of,
)


@pytest.fixture
def pets(tiny_backbone: TorchBackbone, artifact: ArtifactFactory) -> LoadedTuner:
    return loaded_tuner(tiny_backbone, artifact("pets", seed=1))


@pytest.fixture
def make_items(
    tiny_backbone: TorchBackbone, pets: LoadedTuner
) -> Callable[[int, int], list[BatchItem]]:
    def build(n: int, first: int = 0) -> list[BatchItem]:
        return [BatchItem(*pixels_of(first + i, tiny_backbone), (pets,), 1) for i in range(n)]

    return build


def batcher_for(
    run_batch: Callable[[list[BatchItem]], BatchOutput],
    metrics: Metrics | None = None,
    *,
    max_batch: int = 8,
    max_queue: int = 16,
    wait_ms: float = 0.0,
) -> MicroBatcher:
    batcher = MicroBatcher(
        run_batch,
        max_batch_images=max_batch,
        max_wait_ms=wait_ms,
        max_queue_images=max_queue,
        metrics=metrics,
    )
    batcher.start()
    return batcher


def test_concurrent_requests_coalesce_and_answer_in_order(
    runtime: RecordingRuntime, make_items: Callable[[int, int], list[BatchItem]]
) -> None:
    engine = Engine(runtime, FeatureCache(0))
    gate = Gate(engine.run_batch)

    async def main() -> None:
        batcher = batcher_for(gate, max_batch=4)
        first = asyncio.create_task(batcher.submit(make_items(1, 0)))
        await asyncio.to_thread(gate.entered.wait, 10)
        # While the worker is busy, three requests of 2, 3 and 1 images queue up.
        requests = [make_items(2, 10), make_items(3, 20), make_items(1, 30)]
        tasks = [asyncio.create_task(batcher.submit(r)) for r in requests]
        await asyncio.sleep(0.05)
        assert batcher.queued_images == 6
        gate.open.set()
        await first
        answers = await asyncio.gather(*tasks)
        # 6 queued images, batches of at most 4: the 3-image request is split across two.
        assert gate.sizes == [1, 4, 2]
        for request, got in zip(requests, answers, strict=True):
            assert len(got) == len(request)
            for item, done in zip(request, got, strict=True):
                alone = engine.run_batch([item]).items[0]
                assert answers_close(done.output.answers, alone.answers)
        split = {done.batch.batch_id for done in answers[1]}
        assert len(split) == 2
        await batcher.drain()

    asyncio.run(main())


def test_a_lone_request_goes_at_once_whatever_max_wait(
    runtime: RecordingRuntime, make_items: Callable[[int, int], list[BatchItem]]
) -> None:
    """At no load nothing is expected to join: the batch goes without waiting ``max_wait_ms``
    (an hour here), the first request and one sent right after its answer alike."""
    engine = Engine(runtime, FeatureCache(0))

    async def main() -> None:
        batcher = batcher_for(engine.run_batch, wait_ms=3_600_000)
        for first in (0, 1):
            done = await asyncio.wait_for(batcher.submit(make_items(1, first)), 60)
            assert done[0].batch.size == 1
        await batcher.drain()

    asyncio.run(main())


def test_clients_coming_back_join_the_images_queued_meanwhile(
    runtime: RecordingRuntime, make_items: Callable[[int, int], list[BatchItem]]
) -> None:
    """A closed loop of 8 clients, max batch 8: 4 compute while 4 queue (past their own
    ``max_wait_ms``). When the 4 are answered and send again, the next batch waits for them
    instead of sending the queued 4 alone: the two halves merge into batches of 8."""
    engine = Engine(runtime, FeatureCache(0))
    gate = Gate(engine.run_batch)

    async def main() -> None:
        batcher = batcher_for(gate, max_batch=8, wait_ms=1000)

        async def client(first: int) -> int:
            await batcher.submit(make_items(1, first))
            again = await batcher.submit(make_items(1, first + 100))
            return again[0].batch.size

        early = [asyncio.create_task(client(i)) for i in range(4)]
        await asyncio.to_thread(gate.entered.wait, 10)
        late = [asyncio.create_task(batcher.submit(make_items(1, 10 + i))) for i in range(4)]
        await asyncio.sleep(1.2)  # the late 4 waited past max_wait_ms while the engine was busy
        assert batcher.queued_images == 4
        gate.open.set()
        sizes = await asyncio.gather(*early)
        await asyncio.gather(*late)
        assert gate.sizes == [4, 8]
        assert sizes == [8] * 4
        await batcher.drain()

    asyncio.run(main())


def test_overload_is_refused_at_once_with_retry_after(
    runtime: RecordingRuntime, make_items: Callable[[int, int], list[BatchItem]]
) -> None:
    metrics = Metrics()
    gate = Gate(Engine(runtime, FeatureCache(0)).run_batch)

    async def main() -> None:
        batcher = batcher_for(gate, metrics, max_batch=2, max_queue=4)
        busy = asyncio.create_task(batcher.submit(make_items(2, 0)))
        await asyncio.to_thread(gate.entered.wait, 10)
        queued = asyncio.create_task(batcher.submit(make_items(3, 2)))
        await asyncio.sleep(0)
        assert batcher.queued_images == 3
        with pytest.raises(ApiError) as err:
            batcher.enqueue(make_items(2, 5))  # 3 + 2 > 4: refused synchronously
        assert (err.value.code, err.value.status) == ("overloaded", 503)
        assert err.value.retry_after is not None
        assert err.value.retry_after >= 1
        assert err.value.headers()["Retry-After"].isdigit()
        assert batcher.queued_images == 3  # nothing of the refused request was queued
        one_more = asyncio.create_task(batcher.submit(make_items(1, 7)))  # 3 + 1 fits
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as too_big:
            batcher.enqueue(make_items(5, 0))
        assert too_big.value.code == "too_many_images"
        gate.open.set()
        await asyncio.gather(busy, queued, one_more)
        await batcher.drain()

    asyncio.run(main())
    sample = metrics.registry.get_sample_value
    assert sample("restune_queue_depth_images") == 0
    assert sample("restune_queue_wait_seconds_count") == 6


def test_a_request_past_its_deadline_fails_and_leaves_the_queue(
    runtime: RecordingRuntime, make_items: Callable[[int, int], list[BatchItem]]
) -> None:
    gate = Gate(Engine(runtime, FeatureCache(0)).run_batch)

    async def main() -> None:
        batcher = batcher_for(gate, max_batch=1)
        busy = asyncio.create_task(batcher.submit(make_items(1, 0)))
        await asyncio.to_thread(gate.entered.wait, 10)
        loop = asyncio.get_running_loop()
        with pytest.raises(ApiError) as err:
            await batcher.submit(make_items(2, 1), deadline=loop.time() + 0.05)
        assert (err.value.code, err.value.status) == ("deadline_exceeded", 504)
        assert batcher.queued_images == 0  # withdrawn, never computed
        gate.open.set()
        await busy
        await batcher.drain()
        assert gate.sizes == [1]

    asyncio.run(main())


def test_expired_images_are_dropped_before_compute(
    runtime: RecordingRuntime, make_items: Callable[[int, int], list[BatchItem]]
) -> None:
    gate = Gate(Engine(runtime, FeatureCache(0)).run_batch)

    async def main() -> None:
        batcher = batcher_for(gate)
        busy = asyncio.create_task(batcher.submit(make_items(1, 0)))
        await asyncio.to_thread(gate.entered.wait, 10)
        loop = asyncio.get_running_loop()
        stale = batcher.enqueue(make_items(2, 1), deadline=loop.time() - 1.0)
        fresh = asyncio.create_task(batcher.submit(make_items(1, 3)))
        gate.open.set()
        await busy
        assert len(await fresh) == 1
        for pending in stale:
            with pytest.raises(ApiError) as err:
                await pending.future
            assert err.value.code == "deadline_exceeded"
        assert gate.sizes == [1, 1]  # the expired pair never reached the engine
        await batcher.drain()

    asyncio.run(main())


def test_drain_finishes_queued_work_and_refuses_new(
    runtime: RecordingRuntime, make_items: Callable[[int, int], list[BatchItem]]
) -> None:
    gate = Gate(Engine(runtime, FeatureCache(0)).run_batch)

    async def main() -> None:
        batcher = batcher_for(gate, max_batch=2, wait_ms=1000.0)
        queued = asyncio.create_task(batcher.submit(make_items(3, 0)))
        await asyncio.to_thread(gate.entered.wait, 10)
        drained = asyncio.create_task(batcher.drain())
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as err:
            await batcher.submit(make_items(1, 5))
        assert err.value.code == "not_ready"
        gate.open.set()
        await drained
        assert len(await queued) == 3  # the queued image was not left behind
        assert gate.sizes == [2, 1]  # the last batch did not wait out max_wait_ms

    asyncio.run(main())


def test_an_engine_failure_costs_only_the_image_that_causes_it(
    runtime: RecordingRuntime, make_items: Callable[[int, int], list[BatchItem]]
) -> None:
    engine = Engine(runtime, FeatureCache(0))
    poison = make_items(1, 5)[0]

    def fragile(items: list[BatchItem]) -> BatchOutput:
        # A fault the tiny CPU model cannot produce: the engine raises on one image.
        if any(item.digest == poison.digest for item in items):
            raise RuntimeError("device lost")
        return engine.run_batch(items)

    gate = Gate(fragile)

    async def main() -> None:
        batcher = batcher_for(gate, wait_ms=50.0)
        # Both requests queue while the engine is busy, so they share the next batch.
        busy = asyncio.create_task(batcher.submit(make_items(1, 9)))
        await asyncio.to_thread(gate.entered.wait, 10)
        healthy = asyncio.ensure_future(batcher.submit(make_items(2, 0)))
        poisoned = asyncio.ensure_future(batcher.submit([poison]))
        await asyncio.sleep(0.05)
        assert batcher.queued_images == 3
        gate.open.set()
        await busy
        with pytest.raises(ApiError) as err:
            await poisoned
        assert (err.value.code, err.value.status) == ("internal", 500)
        answered = await healthy  # shared the poisoned batch, yet answers
        assert [len(c.output.answers) for c in answered] == [1, 1]
        assert answered[0].batch.size == 3
        for got, item in zip(answered, make_items(2, 0), strict=True):
            alone = engine.run_batch([item]).items[0]  # the retry ran each image alone
            assert got.output.answers == alone.answers
        await batcher.drain()

    asyncio.run(main())


# --- heads of every kind and width on one bypass shape ----------------------------------------

MIXED_HEADS: dict[str, dict[str, Any]] = {
    "cls3": {"seed": 1},
    "cls9": {"seed": 2, "labels": [f"c{i}" for i in range(9)]},
    "reg": {"seed": 3, "task": "regression"},
    "multi": {"seed": 4, "task": "multilabel"},
    "emb": {"seed": 5, "task": "embedding", "embedding_dim": 12},
}


@pytest.fixture
def mixed_heads(tiny_backbone: TorchBackbone, artifact: ArtifactFactory) -> list[LoadedTuner]:
    """Five tasks of one bypass shape (res_adapter, blocks 1-2, CLS) and five different heads."""
    return [
        loaded_tuner(tiny_backbone, artifact(name, layers=(1, 2), **kw))
        for name, kw in MIXED_HEADS.items()
    ]


def _alone(tiny_backbone: TorchBackbone, runtime: RecordingRuntime, item: BatchItem) -> Any:
    """Each task's answer for ``item`` from a fresh engine running that task alone."""
    engine = Engine(runtime, FeatureCache(0))
    return {
        t.name: engine.run_batch([BatchItem(item.pixels, item.digest, (t,), item.top_k)])
        .items[0]
        .answers[t.name]
        for t in item.tuners
    }


def test_tasks_of_one_bypass_shape_stack_whatever_their_heads(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, mixed_heads: list[LoadedTuner]
) -> None:
    engine = Engine(runtime, FeatureCache(0))
    # Overlapping subsets of the tasks per image: one stack, each task on its own rows.
    subsets = [mixed_heads, mixed_heads[1:4], [mixed_heads[0], mixed_heads[4]], mixed_heads]
    items = [BatchItem(*pixels_of(i, tiny_backbone), tuple(s), 3) for i, s in enumerate(subsets)]
    out = engine.run_batch(items)
    assert engine.groups.builds == 1
    assert len(engine.groups) == 1
    for item, got in zip(items, out.items, strict=True):
        want = _alone(tiny_backbone, runtime, item)
        assert got.answers.keys() == want.keys()
        for name in want:
            assert "error" not in got.answers[name], got.answers[name]
            assert answers_close(got.answers[name], want[name]), name
    first = out.items[0].answers
    assert len(first["emb"]["embedding"]) == 12
    assert set(first["reg"]["values"]) == {"age", "size"}
    assert len(first["cls9"]["labels"]) == 3


def test_a_culprit_in_a_mixed_heads_stack_costs_only_its_own_answers(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, mixed_heads: list[LoadedTuner]
) -> None:
    """A task of another head width whose outputs overflow shares the stack, is found, and
    quarantined; the others answer as they do alone."""
    labels = [f"m{i}" for i in range(7)]
    module = make_task(
        make_config("overflow", tiny_backbone, task="multilabel", labels=labels, layers=(1, 2)),
        tiny_backbone.final_norm,
        7,
    )
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if name.startswith("bypass."):
                tensor.mul_(1e30)  # finite weights whose products overflow float32
    culprit = LoadedTuner("overflow", 1, "0" * 64, module.config, module, module_nbytes(module))
    engine = Engine(runtime, FeatureCache(0))
    item = BatchItem(*pixels_of(0, tiny_backbone), (*mixed_heads, culprit), 2)
    answers = engine.run_batch([item]).items[0].answers
    assert answers["overflow"]["error"]["code"] == "non_finite_output"
    assert engine.quarantined(culprit.key)
    healthy = BatchItem(item.pixels, item.digest, tuple(mixed_heads), 2)
    want = _alone(tiny_backbone, runtime, healthy)
    for name, answer in want.items():
        assert answers_close(answers[name], answer), name

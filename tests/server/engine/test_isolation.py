"""Failure isolation in the engine: a poisoned tuner or image costs only its own answers.

The property: co-batch poisoned and healthy requests, and every healthy answer is BIT FOR BIT
the answer of the same batch without the poison. "Without the poison" keeps every image in its
slot (a poisoned task is dropped from the task lists, a bad image is replaced by a healthy one):
on the CPU a row's rounding depends on its position in the batch's matmuls and on which tasks
share its stack, never on the numbers other rows or tasks hold, so this isolates exactly what
the poison could leak. Against the batch with the bad image removed outright, the answers
agree up to float rounding.

Poisons are real where a real artifact can carry the fault: a config that lies about the
backbone's depth, weights so large the outputs overflow (finite, so loading accepts them), and
pixels so large the backbone's features overflow. The app-level tests write these artifacts
straight into the store, past admission; the engine-level ones build the same modules in
memory, so the engine's defences are tested without any check loading does. Two faults cannot
come out of an artifact (loading checks every tensor's shape against the config), so they are
made by editing a loaded module: a head wider than its config (the stack raises, alone it
answers a wrong shape), and a forward that raises.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import hypothesis
import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette nudges towards httpx2
    from fastapi.testclient import TestClient

from restuning.artifact_io import save_task
from restuning.backbone import TorchBackbone
from restuning.tuners import TaskModule
from server.app import create_app
from server.engine.batcher import MicroBatcher
from server.engine.engine import FAILURE_REASONS, BatchItem, Engine
from server.engine.feature_cache import FeatureCache
from server.engine.loaded_tuner import LoadedTuner, module_nbytes
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings
from server.tenancy import token_sha256
from tests.fixtures.models import tiny_images
from tests.fixtures.tuners import FakeBackboneRef, make_artifact, make_config, make_task
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import (
    Gate,
    RecordingRuntime,
    answers_close,
    loaded_tuner,
    pixels_of,
)
from tuners_store.filesystem import FilesystemStore

HEALTHY = ("cls_a", "cls_b", "cls_c", "mean_r", "emb")
POISONS = ("liar", "overflow", "wide_head", "raises", "bad_image")
EXPECTED_CODE = {
    "liar": "backbone_mismatch",
    "overflow": "non_finite_output",
    "wide_head": "bad_output_shape",
    "raises": "task_failed",
    "bad_image": "non_finite_features",
}
ABSURD_PIXEL_SCALE = 1e30
"""Finite pixels whose backbone features overflow (the tiny ViT overflows from ~1e20)."""


def overflow_task(backbone: TorchBackbone) -> TaskModule:
    """A task whose outputs overflow to NaN: finite bypass weights 1e30 times too large (two
    matmuls in a row pass float32's 3.4e38). Loading accepts it: every tensor is finite."""
    module = make_task(make_config("overflow", backbone, layers=(1, 2)), backbone.final_norm, 7)
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if name.startswith("bypass."):
                tensor.mul_(1e30)
    return module


def liar_task(backbone: TorchBackbone) -> TaskModule:
    """A task whose config claims 20 blocks of this backbone (fingerprint copied)."""
    lie = FakeBackboneRef(backbone.dim, 20, backbone.arch, backbone.fingerprint)
    return make_task(make_config("liar", lie), backbone.final_norm, 8)


def as_loaded(module: TaskModule) -> LoadedTuner:
    """``module`` as the registry would hold it, built straight from memory: the engine's
    defences must not rely on checks that loading does (or may come to do)."""
    digest = hashlib.sha256(save_task(module)).hexdigest()
    return LoadedTuner(module.config.name, 1, digest, module.config, module, module_nbytes(module))


@pytest.fixture(scope="module")
def tuners(tiny_backbone: TorchBackbone) -> dict[str, LoadedTuner]:
    """Healthy tasks (cls_a/b/c stack together) and every poisoned tuner, by name."""
    return poisoned_tuner_set(tiny_backbone)


def poisoned_tuner_set(tiny_backbone: TorchBackbone) -> dict[str, LoadedTuner]:
    """The tuners of :data:`HEALTHY` and :data:`POISONS` by name (the GPU engine's tests
    co-batch the same set)."""

    def art(name: str, seed: int, **kw: Any) -> bytes:
        cfg = make_config(name, tiny_backbone, **kw)
        return make_artifact(cfg, tiny_backbone.final_norm, seed=seed)

    b = tiny_backbone
    out = {
        "cls_a": loaded_tuner(b, art("cls_a", 1, layers=(1, 2))),
        "cls_b": loaded_tuner(b, art("cls_b", 2, layers=(1, 2))),
        "cls_c": loaded_tuner(b, art("cls_c", 3, layers=(1, 2))),
        "mean_r": loaded_tuner(
            b, art("mean_r", 4, task="regression", pooling="mean", layers=(2, 2))
        ),
        "emb": loaded_tuner(b, art("emb", 5, task="embedding", tuner="res_prefix")),
        "liar": as_loaded(liar_task(b)),
        "overflow": as_loaded(overflow_task(b)),
    }
    # In memory only: loading refuses a head that disagrees with the config.
    wide = loaded_tuner(b, art("wide_head", 9, layers=(1, 2)))
    classes = wide.config.num_outputs
    wide.module.head = nn.Linear(b.dim, classes + 2)
    out["wide_head"] = wide
    raises = loaded_tuner(b, art("raises", 10, layers=(1, 2)))
    raises.module.forward = _explode  # type: ignore[method-assign]
    raises.module.head.weight = nn.Parameter(torch.zeros(1))  # stacking it fails too
    out["raises"] = raises
    return out


def _explode(*_: object, **__: object) -> torch.Tensor:
    raise RuntimeError("kernel exploded")


@dataclass(frozen=True)
class Request:
    image: int
    tasks: tuple[str, ...]
    top_k: int


@st.composite
def poisoned_batches(draw: st.DrawFn) -> tuple[list[Request], frozenset[str], int | None]:
    """A batch of 1-6 images asking for healthy tasks, some also for poisoned tasks; the
    poisons (one to three at once); the slot of the bad image when ``bad_image`` is one."""
    poisons = frozenset(draw(st.lists(st.sampled_from(POISONS), min_size=1, max_size=3)))
    tasks_poisons = sorted(poisons - {"bad_image"})
    n = draw(st.integers(1, 6))
    requests = []
    for _ in range(n):
        tasks = draw(st.lists(st.sampled_from(HEALTHY), min_size=1, max_size=4, unique=True))
        for poison in tasks_poisons:
            if draw(st.booleans()):
                tasks.insert(draw(st.integers(0, len(tasks))), poison)
        requests.append(Request(draw(st.integers(0, 5)), tuple(tasks), draw(st.integers(1, 3))))
    for poison in tasks_poisons:
        if not any(poison in r.tasks for r in requests):
            first = requests[0]
            requests[0] = Request(first.image, (*first.tasks, poison), first.top_k)
    bad_slot = draw(st.integers(0, n - 1)) if "bad_image" in poisons else None
    return requests, poisons, bad_slot


_PIXELS: dict[int, tuple[torch.Tensor, str]] = {}


def photo(index: int, backbone: TorchBackbone) -> tuple[torch.Tensor, str]:
    """(pixels (3, H, W), digest) of test photo ``index``, prepared once per session."""
    if index not in _PIXELS:
        _PIXELS[index] = pixels_of(index, backbone)
    return _PIXELS[index]


def batch_items(
    backbone: TorchBackbone,
    tuners: dict[str, LoadedTuner],
    requests: list[Request],
    *,
    drop: frozenset[str] = frozenset(),
    bad_slot: int | None = None,
    healthy_slot: int | None = None,
) -> list[BatchItem]:
    """The batch of ``requests``; ``drop`` leaves those tasks out, ``bad_slot`` makes that image
    absurd, ``healthy_slot`` puts another healthy image there (the control of a bad image)."""
    items = []
    for slot, request in enumerate(requests):
        pixels, digest = photo(request.image, backbone)
        if slot == bad_slot:
            pixels, digest = pixels * ABSURD_PIXEL_SCALE, f"absurd-{digest}"
        elif slot == healthy_slot:
            pixels, digest = photo(7, backbone)
        chosen = tuple(tuners[name] for name in request.tasks if name not in drop)
        items.append(BatchItem(pixels, digest, chosen, request.top_k))
    return items


EXAMPLES = int(os.environ.get("RESTUNE_FUZZ_EXAMPLES", "12"))
"""Generated batches per run: a few seconds at 12 (``make fuzz`` raises it)."""

SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)


@SETTINGS
@given(case=poisoned_batches())
def test_healthy_answers_are_bit_for_bit_those_of_the_batch_without_the_poison(
    case: tuple[list[Request], frozenset[str], int | None],
    tiny_backbone: TorchBackbone,
    runtime: RecordingRuntime,
    tuners: dict[str, LoadedTuner],
) -> None:
    requests, poisons, bad_slot = case
    poisoned = batch_items(tiny_backbone, tuners, requests, bad_slot=bad_slot)
    control = batch_items(tiny_backbone, tuners, requests, drop=poisons, healthy_slot=bad_slot)
    metrics = Metrics()
    engine = Engine(runtime, FeatureCache(1 << 20), metrics)
    clean = Engine(runtime, FeatureCache(0)).run_batch(control).items
    # Twice: the first batch finds the culprits, the second runs them quarantined (and from
    # the feature cache).
    for _ in range(2):
        out = engine.run_batch(poisoned).items
        for slot, (request, got, want) in enumerate(zip(requests, out, clean, strict=True)):
            assert set(got.answers) == set(request.tasks)
            for name in request.tasks:
                answer = got.answers[name]
                if name == "liar":  # refused before the forward, whatever the image
                    assert answer["error"]["code"] == "backbone_mismatch", answer
                elif slot == bad_slot:
                    assert answer["error"]["code"] == "non_finite_features", answer
                elif name in poisons:
                    assert answer["error"]["code"] == EXPECTED_CODE[name], answer
                else:
                    assert answer == want.answers[name], (name, poisons)
    assert set(EXPECTED_CODE.values()) <= set(FAILURE_REASONS)  # the metric's bounded reasons
    if bad_slot is not None and len(requests) > 1:
        # The batch without the bad image at all: the others move up a row, and a task only
        # the bad image asked for leaves its stack, so equal up to float rounding only.
        rest = [item for slot, item in enumerate(control) if slot != bad_slot]
        without = Engine(runtime, FeatureCache(0)).run_batch(rest).items
        kept = [got for slot, got in enumerate(out) if slot != bad_slot]
        for got, want in zip(kept, without, strict=True):
            for name, answer in want.answers.items():
                assert answers_close(got.answers[name], answer, 1e-5), name
    for poison in poisons - {"bad_image"}:
        counted = metrics.registry.get_sample_value(
            "restune_task_failures_total", {"task": poison, "reason": EXPECTED_CODE[poison]}
        )
        asked = sum(
            poison in r.tasks and (slot != bad_slot or poison == "liar")
            for slot, r in enumerate(requests)
        )
        assert (counted or 0) == 2 * asked, (poison, counted, asked)
    if bad_slot is not None:
        counted = sum(
            metrics.registry.get_sample_value(
                "restune_task_failures_total", {"task": name, "reason": "non_finite_features"}
            )
            or 0
            for name in {*HEALTHY, *POISONS}
        )
        assert counted == 2 * sum(t != "liar" for t in requests[bad_slot].tasks)


def test_a_culprit_is_quarantined_and_healthy_tasks_stack_without_it(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    t = tuners
    engine = Engine(runtime, FeatureCache(0))
    requests = [Request(0, ("cls_a", "raises", "cls_b", "cls_c"), 2)]
    engine.run_batch(batch_items(tiny_backbone, tuners, requests))
    assert engine.quarantined(t["raises"].key)
    assert not engine.quarantined(t["cls_a"].key)
    builds = engine.groups.builds
    for image in range(1, 4):
        again = batch_items(tiny_backbone, tuners, [Request(image, requests[0].tasks, 2)])
        answers = engine.run_batch(again).items[0].answers
        assert answers["raises"]["error"]["code"] == "task_failed"
        assert "kernel exploded" in answers["raises"]["error"]["detail"]
    # The healthy stack is reused, never retried with the culprit; the culprit's solo group
    # is the one new build.
    assert engine.groups.builds == builds + 1
    engine.forget_tuner(t["raises"])
    assert not engine.quarantined(t["raises"].key)


def test_a_culprit_found_alone_never_joins_a_stack(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    t = tuners
    engine = Engine(runtime, FeatureCache(0))
    engine.run_batch(batch_items(tiny_backbone, tuners, [Request(0, ("overflow",), 1)]))
    assert engine.quarantined(t["overflow"].key)  # it ran alone, and failed
    mixed = [Request(1, ("cls_a", "overflow", "cls_b"), 1)]
    builds = engine.groups.builds
    answers = engine.run_batch(batch_items(tiny_backbone, tuners, mixed)).items[0].answers
    assert answers["overflow"]["error"]["code"] == "non_finite_output"
    assert engine.groups.builds == builds + 1  # cls_a + cls_b, never a stack with the culprit


def test_a_nan_in_one_row_costs_only_that_image(
    tiny_backbone: TorchBackbone,
    runtime: RecordingRuntime,
    artifact: ArtifactFactory,
) -> None:
    # A fault that depends on the input (made in memory: which row overflows is not under a
    # test's control): the task answers for the rows that stayed finite.
    half = loaded_tuner(tiny_backbone, artifact("half", seed=3, layers=(1, 2)))
    original = half.module.forward

    def nan_on_first(features: Any) -> torch.Tensor:
        out = original(features)  # (n, C)
        out[0, 0] = float("nan")
        return out

    half.module.forward = nan_on_first  # type: ignore[method-assign]
    items = [BatchItem(*pixels_of(i, tiny_backbone), (half,), 1) for i in range(3)]
    engine = Engine(runtime, FeatureCache(0))
    out = engine.run_batch(items).items
    assert out[0].answers["half"]["error"]["code"] == "non_finite_output"
    for got in out[1:]:
        assert "labels" in got.answers["half"]


def test_non_finite_features_are_not_cached(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    cache = FeatureCache(1 << 20)
    engine = Engine(runtime, cache)
    requests = [Request(0, ("cls_a",), 1), Request(1, ("cls_a",), 1)]
    items = batch_items(tiny_backbone, tuners, requests, bad_slot=0)
    first = engine.run_batch(items)
    assert first.items[0].answers["cls_a"]["error"]["code"] == "non_finite_features"
    again = engine.run_batch(items)
    assert [o.cache_hit for o in again.items] == [False, True]
    assert again.items[0].answers["cls_a"]["error"]["code"] == "non_finite_features"


def test_each_failure_is_logged_once_per_version_and_reason(
    tiny_backbone: TorchBackbone,
    runtime: RecordingRuntime,
    tuners: dict[str, LoadedTuner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = Engine(runtime, FeatureCache(0), Metrics())
    requests = [Request(i, ("cls_a", "liar", "overflow"), 1) for i in range(3)]
    with caplog.at_level("WARNING", logger="server.engine.engine"):
        for _ in range(3):
            engine.run_batch(batch_items(tiny_backbone, tuners, requests))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert any("liar v1 failed (backbone_mismatch)" in w for w in warnings)
    assert any("overflow v1 failed (non_finite_output)" in w for w in warnings)


def test_a_deadline_expiring_mid_batch_costs_only_its_own_request(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    engine = Engine(runtime, FeatureCache(0))
    gate = Gate(engine.run_batch)
    hurried = batch_items(tiny_backbone, tuners, [Request(0, ("cls_a",), 1)])
    patient = batch_items(tiny_backbone, tuners, [Request(1, ("cls_a", "emb"), 2)])

    async def main() -> None:
        batcher = MicroBatcher(gate, max_batch_images=8, max_wait_ms=100.0, max_queue_images=16)
        batcher.start()
        loop = asyncio.get_running_loop()
        short = asyncio.ensure_future(batcher.submit(hurried, deadline=loop.time() + 2.0))
        long = asyncio.ensure_future(batcher.submit(patient, deadline=loop.time() + 60.0))
        await asyncio.to_thread(gate.entered.wait, 30)
        with pytest.raises(ApiError) as err:
            await short  # its deadline passes while the shared batch is held
        assert (err.value.code, err.value.status) == ("deadline_exceeded", 504)
        gate.open.set()
        answered = await long
        assert gate.sizes == [2]  # both were in the one batch
        want = engine.run_batch(
            batch_items(
                tiny_backbone, tuners, [Request(0, ("cls_a",), 1), Request(1, ("cls_a", "emb"), 2)]
            )
        )
        assert answered[0].output.answers == want.items[1].answers
        await batcher.drain()

    asyncio.run(main())


# ---------------------------------------------------------------- through the real app

TENANT_TOKENS = {"acme": "acme-reader-token", "bolt": "bolt-reader-token"}
HEALTHY_SETS = {"acme": "acme/pets,acme/ages", "bolt": "bolt/pets,bolt/toys"}
POISONED_SETS = {"acme": "acme/pets,acme/liar,acme/ages", "bolt": "bolt/overflow,bolt/toys"}
POISONED_TASKS = {"acme/liar", "bolt/overflow"}
ROUNDS = 6
"""Each round sends every healthy and every poisoned request of both tenants at once."""


@pytest.fixture(scope="module")
def tenant_app(
    tmp_path_factory: pytest.TempPathFactory, tiny_backbone: TorchBackbone
) -> Iterator[TestClient]:
    """The real app with tenants acme and bolt; every tuner is written straight into the
    file store (as another replica or an older server would), so the poisoned ones never
    met admission: acme/liar claims 20 blocks, bolt/overflow's weights overflow to NaN."""
    root = tmp_path_factory.mktemp("isolation")
    store = FilesystemStore(root / "store", fsync=False)
    b = tiny_backbone
    healthy = {
        "acme/pets": make_config("pets", b),
        "acme/ages": make_config("ages", b, task="regression"),
        "bolt/pets": make_config("pets", b),
        "bolt/toys": make_config("toys", b, layers=(1, 2)),
    }
    for seed, (name, config) in enumerate(healthy.items()):
        store.put_sync(name, make_artifact(config, b.final_norm, seed=seed))
    store.put_sync("acme/liar", save_task(liar_task(b)))
    store.put_sync("bolt/overflow", save_task(overflow_task(b)))
    tokens = root / "tokens.json"
    entries = [
        {"sha256": token_sha256(token), "scope": "reader", "tenant": tenant}
        for tenant, token in TENANT_TOKENS.items()
    ]
    tokens.write_text(json.dumps({"tokens": entries}))
    settings = Settings(
        backbone="vit_test_tiny",
        backbone_weights="random:0",
        store=f"file://{root / 'store'}",
        home=str(root / "home"),
        tenants_enabled=True,
        tokens_file=str(tokens),
        max_batch_images=8,
        max_wait_ms=20.0,
        request_timeout_s=60.0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_a_poisoned_tuner_fails_no_healthy_request_of_any_tenant(
    tenant_app: TestClient,
) -> None:
    images = tiny_images(3, seed=4)

    def predict(tenant: str, tasks: str, image: int) -> tuple[str, int, dict[str, Any]]:
        resp = tenant_app.post(
            "/v1/predict",
            files=[("image", (f"{image}.png", images[image], "image/png"))],
            data={"tasks": tasks},
            headers={"Authorization": f"Bearer {TENANT_TOKENS[tenant]}"},
        )
        return tasks, resp.status_code, resp.json()

    calls = [
        (tenant, sets[tenant], (r + i) % len(images))
        for r in range(ROUNDS)
        for i, tenant in enumerate(TENANT_TOKENS)
        for sets in (HEALTHY_SETS, POISONED_SETS)
    ]
    with ThreadPoolExecutor(len(calls) // ROUNDS) as pool:
        results = list(pool.map(lambda call: predict(*call), calls))

    healthy_failures = []
    for tasks, status, body in results:
        if status != 200:
            healthy_failures.append((tasks, status, body))
            continue
        for name, answer in body["results"][0]["tasks"].items():
            if name in POISONED_TASKS:
                # The engine refuses it (backbone_mismatch, non_finite_output), or loading does
                # where admission's checks also run at load: an error object, never a number.
                assert set(answer) == {"error"}, answer
                assert answer["error"]["code"], answer
            elif "error" in answer:
                healthy_failures.append((tasks, status, answer))
    assert healthy_failures == []

    metrics = tenant_app.get("/metrics").text
    batched = _sample(metrics, "restune_batch_size_images_sum")
    assert batched > _sample(metrics, "restune_batch_size_images_count")  # requests shared


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_oip_answers_a_poisoned_model_or_image_with_an_error_never_nan(
    tenant_app: TestClient, tiny_backbone: TorchBackbone
) -> None:
    pixels, _ = photo(0, tiny_backbone)  # (3, H, W)

    def infer(tenant: str, model: str, scale: float) -> tuple[int, dict[str, Any]]:
        rows = (pixels * scale).reshape(-1).tolist()
        body = {
            "inputs": [
                {"name": "pixels", "datatype": "FP32", "shape": [1, *pixels.shape], "data": rows}
            ]
        }
        resp = tenant_app.post(
            f"/v2/models/{model}/infer",
            json=body,
            headers={"Authorization": f"Bearer {TENANT_TOKENS[tenant]}"},
        )
        return resp.status_code, resp.json()

    def toys_stats() -> dict[str, Any]:
        stats = tenant_app.get(
            "/v2/models/bolt/toys/stats",
            headers={"Authorization": f"Bearer {TENANT_TOKENS['bolt']}"},
        )
        assert stats.status_code == 200, stats.text
        counts: dict[str, Any] = stats.json()["model_stats"][0]["inference_stats"]
        return counts

    before = toys_stats()
    calls = [
        ("bolt", "bolt/toys", 1.0),
        ("bolt", "bolt/toys", ABSURD_PIXEL_SCALE),  # finite, so the edge lets it through
        ("bolt", "bolt/overflow", 1.0),
        ("acme", "acme/pets", 1.0),
    ] * 3
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda call: infer(*call), calls))
    for (_, model, scale), (status, body) in zip(calls, results, strict=True):
        if model == "bolt/overflow":
            assert status >= 400, body  # the tuner is broken: an error, not 200 with NaN
            assert set(body) == {"error"}
        elif scale != 1.0:
            assert status == 422, body
            assert "non-finite backbone features" in body["error"]
        else:
            assert status == 200, body
            assert all(math.isfinite(v) for out in body["outputs"] for v in _numbers(out["data"]))
    # The statistics extension counts the engine's error answers (the absurd image's
    # non-finite features) as failures, beside the successes of the same tuner.
    after = toys_stats()
    assert after["fail"]["count"] - before["fail"]["count"] == 3, (before, after)
    assert after["success"]["count"] - before["success"]["count"] == 3, (before, after)


def _numbers(data: list[Any]) -> list[float]:
    return [float(v) for v in data if isinstance(v, int | float)]

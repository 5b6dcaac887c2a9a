"""The ONNX Runtime backbone: providers and fallback, parity with torch, export caching, the
service and a live server answering like torch, host staging."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import httpx
import onnxruntime as ort
import pytest
import torch

from restuning.backbone import TorchBackbone, load_backbone
from restuning.features import FeatureSpec, TokenSelection
from restuning.preprocess import preprocess_batch
from server.engine import runtime_onnx
from server.engine.runtime import Backbone, TorchRuntime, load_backbone_runtime
from server.engine.runtime_onnx import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    TENSORRT_PROVIDER,
    CachedExports,
    OnnxBackbone,
    cache_dir_of,
    cache_path,
    choose_providers,
    ensure_exports,
    missing_gpu_providers,
)
from server.engine.service import InferenceService, TaskRef
from server.engine.staging import HostStaging
from server.metrics import Metrics
from server.settings import Settings
from tests.fixtures.live_server import StartServer
from tests.fixtures.models import tiny_image, tiny_images
from tests.fixtures.tuners import make_artifact, make_config
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import answers_close

PARITY_REL = 1e-4
"""max |onnx - torch| / max |torch| for float32 features."""
ANSWER_TOL = 1e-4
"""Absolute tolerance on every number of a predict answer (scores, values, embeddings)."""
CUDA_EP_BUILT = CUDA_PROVIDER in ort.get_available_providers()


def photos(backbone: TorchBackbone, n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, H, W) real photo crops preprocessed for ``backbone``."""
    return preprocess_batch([tiny_image(i, seed=seed) for i in range(n)], backbone.data_config)


def diff_report(got: torch.Tensor, want: torch.Tensor) -> tuple[float, str]:
    abs_diff = float((got - want).abs().max())
    rel = abs_diff / float(want.abs().max())
    return rel, f"max abs diff {abs_diff:.3e}, rel {rel:.3e}"


def own_cache(exports: CachedExports, tmp_path: Path) -> Path:
    """A private cache directory holding copies of ``exports`` only (tests may add or damage
    files in it; the session's cache may hold more, e.g. int8 files)."""
    target = tmp_path / "onnx"
    target.mkdir()
    for path in exports.paths.values():
        shutil.copy2(path, target / path.name)
    return target


@pytest.fixture
def onnx_backbone(tiny_backbone: TorchBackbone, tiny_onnx: CachedExports) -> OnnxBackbone:
    return OnnxBackbone.from_torch(tiny_backbone, next(iter(tiny_onnx.paths.values())).parent)


# ---------------------------------------------------------------------------- providers


def test_provider_choice() -> None:
    assert choose_providers("cpu", [CPU_PROVIDER, CUDA_PROVIDER]) == [(CPU_PROVIDER, {})]
    # CUDA is requested even when this build lacks it, so that the fallback is visible.
    assert choose_providers("cuda:1", [CPU_PROVIDER]) == [
        (CUDA_PROVIDER, {"device_id": "1"}),
        (CPU_PROVIDER, {}),
    ]
    both = choose_providers(
        "cuda", [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER], tensorrt_options={"x": "y"}
    )
    assert [name for name, _ in both] == [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]
    assert both[0][1] == {"device_id": "0", "x": "y"}
    # TensorRT only when the build has it, and never for the CPU.
    assert TENSORRT_PROVIDER not in [n for n, _ in choose_providers("cuda", [CPU_PROVIDER])]
    assert choose_providers("cpu", [TENSORRT_PROVIDER]) == [(CPU_PROVIDER, {})]


def test_missing_gpu_providers() -> None:
    wanted = choose_providers("cuda", [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER])
    assert missing_gpu_providers(wanted, [CUDA_PROVIDER, CPU_PROVIDER]) == [TENSORRT_PROVIDER]
    assert missing_gpu_providers(wanted, [CPU_PROVIDER]) == [TENSORRT_PROVIDER, CUDA_PROVIDER]
    assert missing_gpu_providers(wanted, [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]) == []
    assert missing_gpu_providers(choose_providers("cpu", []), [CPU_PROVIDER]) == []


def test_protocol_and_reported_facts(
    onnx_backbone: OnnxBackbone, tiny_backbone: TorchBackbone
) -> None:
    b = onnx_backbone
    assert isinstance(b, Backbone)
    assert (b.runtime, b.device, b.dtype) == ("onnxruntime", "cpu", "float32")
    assert b.providers == [CPU_PROVIDER]
    assert (b.arch, b.fingerprint) == (tiny_backbone.arch, tiny_backbone.fingerprint)
    assert (b.dim, b.depth, b.is_random) == (32, 2, True)
    assert b.data_config == tiny_backbone.data_config
    # A float32 CPU copy of the torch norm: equal values, separate tensors.
    assert b.final_norm is not tiny_backbone.final_norm
    assert b.final_norm.weight.dtype == torch.float32
    assert torch.equal(b.final_norm.weight, tiny_backbone.final_norm.weight)
    assert torch.equal(b.final_norm.bias, tiny_backbone.final_norm.bias)
    assert b.final_norm.eps == tiny_backbone.final_norm.eps
    assert not b.final_norm.weight.requires_grad


@pytest.mark.skipif(CUDA_EP_BUILT, reason="this onnxruntime build has the CUDA provider")
def test_cuda_request_on_a_cpu_build_falls_back_loudly(
    tiny_backbone: TorchBackbone, tiny_onnx: CachedExports, caplog: pytest.LogCaptureFixture
) -> None:
    cache = next(iter(tiny_onnx.paths.values())).parent
    with caplog.at_level(logging.ERROR, logger="server.engine.runtime_onnx"):
        b = OnnxBackbone.from_torch(tiny_backbone, cache, device="cuda:0")
    assert b.providers == [CPU_PROVIDER], "providers must be reported as they are"
    assert b.device == "cpu"
    assert not b.on_gpu
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert loud, "no error logged for the fallback"
    assert CUDA_PROVIDER in loud[0].getMessage()
    assert ".[gpu]" in loud[0].getMessage()
    images = photos(tiny_backbone, 2)
    spec = FeatureSpec((0, 2), "cls")
    rel, report = diff_report(
        b.forward_features(images, spec).data, tiny_backbone.forward_features(images, spec).data
    )
    assert rel <= PARITY_REL, report


# ---------------------------------------------------------------------------- parity


SPECS = [
    FeatureSpec((0,), "cls"),
    FeatureSpec((2,), "cls"),
    FeatureSpec((0, 1, 2), "cls"),
    FeatureSpec((1,), "all"),
    FeatureSpec((0, 2), "all"),
    FeatureSpec((0, 1, 2), "all"),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "io_binding"])
def test_features_equal_torch(
    tiny_backbone: TorchBackbone,
    tiny_onnx: CachedExports,
    spec: FeatureSpec,
    io_binding: bool,
) -> None:
    cache = next(iter(tiny_onnx.paths.values())).parent
    b = OnnxBackbone.from_torch(tiny_backbone, cache, io_binding=io_binding)
    images = photos(tiny_backbone, 3, seed=2)
    got = b.forward_features(images, spec)
    want = tiny_backbone.forward_features(images, spec)
    assert got.spec == spec
    assert got.data.shape == want.data.shape
    assert got.data.dtype == torch.float32
    rel, report = diff_report(got.data, want.data)
    assert rel <= PARITY_REL, f"{spec} ({'io binding' if io_binding else 'run'}): {report}"


def test_layers_beyond_depth_are_refused(onnx_backbone: OnnxBackbone) -> None:
    with pytest.raises(ValueError, match=r"0\.\.2"):
        onnx_backbone.forward_features(torch.zeros(1, 3, 32, 32), FeatureSpec((3,), "cls"))


def test_sessions_open_lazily(onnx_backbone: OnnxBackbone, tiny_backbone: TorchBackbone) -> None:
    assert onnx_backbone.open_sessions == ("cls",)  # opened at start: it reports providers
    onnx_backbone.forward_features(photos(tiny_backbone, 1), FeatureSpec((1,), "cls"))
    assert onnx_backbone.open_sessions == ("cls",)
    onnx_backbone.forward_features(photos(tiny_backbone, 1), FeatureSpec((1,), "all"))
    assert onnx_backbone.open_sessions == ("cls", "all")


def test_int8_backbone_stays_close(
    tiny_backbone: TorchBackbone, tiny_onnx_int8: CachedExports
) -> None:
    cache = next(iter(tiny_onnx_int8.paths.values())).parent
    b = OnnxBackbone.from_torch(tiny_backbone, cache, int8=True)
    assert b.dtype == "int8"
    images = photos(tiny_backbone, 4)
    spec = FeatureSpec((0, 1, 2), "all")
    got, want = b.forward_features(images, spec).data, tiny_backbone.forward_features(images, spec)
    rel, report = diff_report(got, want.data)
    cosine = float(torch.nn.functional.cosine_similarity(got, want.data, dim=-1).mean())
    assert 0 < rel <= 0.1, f"int8: {report}"
    assert cosine >= 0.995, f"int8: mean cosine {cosine:.5f}, {report}"


# ---------------------------------------------------------------------------- export cache


def test_cache_is_reused_and_int8_built_on_a_miss(
    tiny_backbone: TorchBackbone,
    tiny_onnx: CachedExports,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = own_cache(tiny_onnx, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again although the cache holds the file")

    monkeypatch.setattr(runtime_onnx, "export_backbone_onnx", no_export)
    again = ensure_exports(tiny_backbone, cache, int8=False)
    assert again.built == ()
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before

    # int8 is missing: quantized from the cached float32 files, without exporting.
    first = ensure_exports(tiny_backbone, cache, int8=True)
    assert sorted(p.name for p in first.built) == sorted(
        cache_path(cache, tiny_backbone.arch, tiny_backbone.fingerprint, t, int8=True).name
        for t in ("cls", "all")
    )

    def no_quantize(*args: object, **kwargs: object) -> None:
        raise AssertionError("quantized again although the cache holds the file")

    monkeypatch.setattr(runtime_onnx, "quantize_backbone_onnx", no_quantize)
    second = OnnxBackbone.from_torch(tiny_backbone, cache, int8=True)  # a second start
    assert second.model_paths == first.paths
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith(".tmp")) == []


def test_cache_names_key_every_choice(tiny_backbone: TorchBackbone, tmp_path: Path) -> None:
    names = {
        cache_path(tmp_path, "a", fp, tokens, int8=int8).name
        for fp in ("f1", "f2")
        for tokens in ("cls", "all")
        for int8 in (False, True)
    }
    assert len(names) == 8


def test_a_cached_file_of_another_export_is_refused(
    tiny_backbone: TorchBackbone, tiny_onnx: CachedExports, tmp_path: Path
) -> None:
    cache = own_cache(tiny_onnx, tmp_path)
    arch, fp = tiny_backbone.arch, tiny_backbone.fingerprint
    # The "all" file replaced by the "cls" graph: its metadata gives it away.
    shutil.copy(
        cache_path(cache, arch, fp, "cls", int8=False),
        cache_path(cache, arch, fp, "all", int8=False),
    )
    b = OnnxBackbone.from_torch(tiny_backbone, cache)
    with pytest.raises(RuntimeError, match="delete it"):
        b.forward_features(photos(tiny_backbone, 1), FeatureSpec((1,), "all"))


def test_settings_select_the_onnx_runtime(
    tiny_onnx: CachedExports, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = own_cache(tiny_onnx, tmp_path)
    settings = Settings(
        backbone="vit_test_tiny",
        backbone_weights="random:0",
        runtime="onnxruntime",
        onnx_cache_dir=str(cache),
        threads=1,
        home=str(tmp_path / "home"),
    )
    assert cache_dir_of(settings) == cache
    assert cache_dir_of(settings.model_copy(update={"onnx_cache_dir": ""})) == (
        tmp_path / "home" / "onnx"
    )
    monkeypatch.setattr(runtime_onnx, "export_backbone_onnx", None)  # must come from the cache
    backbone = load_backbone_runtime(settings)
    assert isinstance(backbone, OnnxBackbone)
    assert backbone.threads == 1
    assert backbone.providers == [CPU_PROVIDER]


# ---------------------------------------------------------------------------- the service


def _results(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [r["tasks"] for r in body["results"]]


def test_service_answers_like_torch(
    settings: Settings,
    tiny_backbone: TorchBackbone,
    onnx_backbone: OnnxBackbone,
    artifact: ArtifactFactory,
) -> None:
    tasks = {
        "pets": artifact("pets", seed=1),
        "ages": artifact("ages", seed=2, task="regression"),
        "look": artifact("look", seed=3, task="embedding"),
        "mean": artifact("mean", seed=4, pooling="mean"),  # needs every token
        "part": artifact("part", seed=5, layers=(2, 2)),
    }
    images = tiny_images(4, seed=3)

    async def answer(backbone: Backbone, metrics: Metrics) -> tuple[dict[str, Any], Any]:
        service = InferenceService(settings, metrics, backbone=backbone)
        await service.start()
        try:
            for name, data in tasks.items():
                await service.registry.register(name, data)
            body = await service.predict(images, [TaskRef.parse(n) for n in tasks], 3)
            return body, await service.ready()
        finally:
            await service.stop()

    metrics = Metrics()
    want, _ = asyncio.run(answer(TorchRuntime(tiny_backbone), Metrics()))
    got, ready = asyncio.run(answer(onnx_backbone, metrics))
    assert got["backbone"]["runtime"] == "onnxruntime"
    assert got["backbone"]["fingerprint"] == want["backbone"]["fingerprint"]
    for image, (g, w) in enumerate(zip(_results(got), _results(want), strict=True)):
        for name in tasks:
            assert answers_close(g[name], w[name], ANSWER_TOL), (
                f"image {image} task {name}: onnx {g[name]} vs torch {w[name]}"
            )
    assert onnx_backbone.open_sessions == ("cls", "all")
    assert ready["providers"] == [CPU_PROVIDER]
    assert ready["runtime"] == "onnxruntime"
    text = metrics.render().decode()
    assert 'runtime="onnxruntime"' in text
    assert f'providers="{CPU_PROVIDER}"' in text


@pytest.mark.slow
def test_live_server_with_onnxruntime_answers_like_torch(
    live_server_factory: StartServer,
    tiny_backbone: TorchBackbone,
    tiny_onnx: CachedExports,
    tmp_path: Path,
) -> None:
    cache = own_cache(tiny_onnx, tmp_path)
    before = sorted(p.name for p in cache.iterdir())
    onnx_server = live_server_factory(
        RESTUNE_RUNTIME="onnxruntime", RESTUNE_ONNX_CACHE_DIR=str(cache)
    )
    torch_server = live_server_factory()
    tasks = {
        "pets": make_config("pets", tiny_backbone),
        "mean": make_config("mean", tiny_backbone, pooling="mean", task="embedding"),
    }
    images = tiny_images(3, seed=5)
    bodies = []
    for server in (onnx_server, torch_server):
        for seed, (name, config) in enumerate(tasks.items()):
            resp = server.register(name, make_artifact(config, tiny_backbone.final_norm, seed=seed))
            assert resp.status_code == 201, resp.text
        with server.client() as client:
            files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
            resp = client.post(
                "/v1/predict", files=files, data={"tasks": "pets,mean", "top_k": "3"}
            )
            assert resp.status_code == 200, resp.text
            bodies.append(resp.json())
    got, want = bodies
    assert got["backbone"]["runtime"] == "onnxruntime"
    for image, (g, w) in enumerate(zip(_results(got), _results(want), strict=True)):
        for name in tasks:
            assert answers_close(g[name], w[name], ANSWER_TOL), (
                f"image {image} task {name}: onnx {g[name]} vs torch {w[name]}"
            )
    with httpx.Client(base_url=onnx_server.url) as client:
        ready = client.get("/readyz").json()
        metrics = client.get("/metrics").text
    assert ready["providers"] == [CPU_PROVIDER]
    assert 'runtime="onnxruntime"' in metrics
    assert f'providers="{CPU_PROVIDER}"' in metrics
    # Started from the cache: nothing exported, nothing added.
    assert sorted(p.name for p in cache.iterdir()) == before
    assert "exported vit_test_tiny" not in onnx_server.stderr_text()


# ---------------------------------------------------------------------------- staging


def test_staging_is_a_no_op_on_the_cpu() -> None:
    staging = HostStaging("cpu")
    batch = torch.randn(2, 3, 8, 8)
    assert not staging.enabled
    assert staging.to_device(batch) is batch
    assert staging.capacity == 0  # nothing pinned


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
def test_staging_copies_through_one_pinned_buffer() -> None:
    staging = HostStaging("cuda")
    first = torch.randn(4, 3, 16, 16)
    on_gpu = staging.to_device(first)
    assert on_gpu.is_cuda
    assert torch.equal(on_gpu.cpu(), first)
    capacity = staging.capacity
    second = torch.randn(2, 3, 16, 16)  # smaller: reuses the buffer
    assert torch.equal(staging.to_device(second).cpu(), second)
    assert torch.equal(on_gpu.cpu(), first), "the first batch was overwritten"
    assert staging.capacity == capacity
    assert staging.to_device(on_gpu) is on_gpu


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backbone_in_half_precision_on_cuda(
    tiny_backbone: TorchBackbone, dtype: torch.dtype
) -> None:
    half = TorchRuntime(load_backbone("vit_test_tiny", "random:0", device="cuda", dtype=dtype))
    assert half.dtype == str(dtype).removeprefix("torch.")
    images = photos(tiny_backbone, 3)
    spec = FeatureSpec((0, 1, 2), "all")
    got = half.forward_features(images, spec).data.float().cpu()
    rel, report = diff_report(got, tiny_backbone.forward_features(images, spec).data)
    assert rel <= 0.05, f"{dtype} on cuda vs float32 on cpu: {report}"


@requires_cuda
@pytest.mark.skipif(not CUDA_EP_BUILT, reason="needs onnxruntime-gpu (the CUDA provider)")
@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_cuda_provider_with_io_binding(
    tiny_backbone: TorchBackbone, tiny_onnx: CachedExports, tokens: TokenSelection
) -> None:
    cache = next(iter(tiny_onnx.paths.values())).parent
    b = OnnxBackbone.from_torch(tiny_backbone, cache, device="cuda:0")
    assert b.providers[0] == CUDA_PROVIDER
    assert b.on_gpu
    assert b.device == "cuda:0"
    images = photos(tiny_backbone, 3)
    spec = FeatureSpec((0, 2), tokens)
    got = b.forward_features(images, spec).data
    assert got.is_cuda
    rel, report = diff_report(got.cpu(), tiny_backbone.forward_features(images, spec).data)
    assert rel <= 1e-3, report  # CUDA may use TF32 matmuls

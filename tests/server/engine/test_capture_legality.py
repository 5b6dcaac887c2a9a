"""What a CUDA graph capture refuses, checked on the CPU for every plan shape.

Each plan body (the backbone capture, every group's dense fan-out, the heads) runs under
:class:`~server.engine.capture_legality.CaptureRecorder`: no op may mix dtypes, make a tensor
from host data, read device data on the host, depend on the data for its size, or touch
another device. The plans run in float32 and in bf16 (the GPU's configuration, where CUDA's
kernels refuse what the CPU's accept), and on the ``meta`` device, where a tensor made without
``device=`` lands on the CPU and shows up as a stray device.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from restuning.backbone import TorchBackbone
from restuning.features import Features, FeatureSpec
from server.engine.capture_legality import CaptureIllegalError, CaptureRecorder
from server.engine.cuda_graphs import DensePlan, graph_key, group_tuners
from server.engine.loaded_tuner import LoadedTuner
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import loaded_tuner, pixels_of

# --- the recorder's rules -----------------------------------------------------------------------


def _violations(fn: Any, device: str = "cpu") -> list[str]:
    recorder = CaptureRecorder(device)
    # The CPU refuses some of them too; the rule is seen before the op runs.
    with recorder.recording(), contextlib.suppress(RuntimeError):
        fn()
    return [v.reason for v in recorder.violations]


X = torch.randn(4, 6)


@pytest.mark.parametrize(
    ("name", "fn", "reason"),
    [
        ("list index", lambda: X[[0, 2]], "host data"),
        ("torch.tensor", lambda: torch.tensor([1, 2]), "host data"),
        ("item", lambda: X[0, 0].item(), "sync"),
        ("tolist", lambda: X.tolist(), "sync"),
        ("bool", lambda: bool(X.sum() > 0), "sync"),
        ("nonzero", lambda: X.nonzero(), "depends on the data"),
        ("mask index", lambda: X[X > 0], "boolean mask"),
        ("unique", lambda: torch.unique(X), "depends on the data"),
        (
            "bf16 layer_norm, f32 weight",
            lambda: F.layer_norm(X.bfloat16(), (6,), torch.ones(6), torch.zeros(6)),
            "mixed dtypes",
        ),
        ("bf16 @ f32", lambda: torch.mm(X.bfloat16(), X.T), "mixed dtypes"),
    ],
)
def test_recorder_flags_what_a_capture_refuses(name: str, fn: Any, reason: str) -> None:
    found = _violations(fn)
    assert any(reason in r for r in found), (name, found)


def test_recorder_flags_tensors_off_the_plan_device() -> None:
    meta = torch.empty(3, device="meta")
    assert any("tensor on cpu" in r for r in _violations(lambda: meta + torch.zeros(3), "meta"))
    assert any("tensor on cpu" in r for r in _violations(lambda: X + 1, "meta"))


def test_recorder_passes_views_casts_and_device_ops() -> None:
    def legal() -> torch.Tensor:
        y = X[1:3] @ X.T  # a slice: a view
        z = torch.stack([X[0], X[2]])  # integer indexing: views, then a device op
        w = F.layer_norm(X.bfloat16(), (6,), torch.ones(6).bfloat16(), None)
        return y.sum() + z.sum() + w.float().sum() + torch.zeros(2, device=X.device).sum()

    recorder = CaptureRecorder("cpu")
    recorder.run(legal)
    assert recorder.violations == []
    assert recorder.ops > 5
    with pytest.raises(CaptureIllegalError, match="host data"):
        CaptureRecorder("cpu").run(lambda: X[[1, 3]])


def test_recorder_keeps_what_the_run_read_but_did_not_make() -> None:
    weight = torch.randn(6, 6)
    recorder = CaptureRecorder("cpu")
    with recorder.recording():
        made = X @ weight
        (made + 1).sum()
    kept = {t.untyped_storage().data_ptr() for t in recorder.external}
    assert weight.untyped_storage().data_ptr() in kept
    assert X.untyped_storage().data_ptr() in kept
    assert made.untyped_storage().data_ptr() not in kept


def test_feature_select_takes_layers_without_an_index_tensor() -> None:
    """Unevenly spaced layers (a stack of views) and evenly spaced ones (a strided view)."""
    data = torch.randn(5, 2, 3, 4)  # (L', B, N', D) for layers 0..4
    feats = Features(FeatureSpec((0, 1, 2, 3, 4), "all"), data)
    for layers in [(0, 1, 3), (1, 3), (0, 2, 4), (4,), (1, 2)]:
        spec = FeatureSpec(layers, "cls")
        recorder = CaptureRecorder("cpu")
        got = recorder.run(lambda: feats.select(spec).data)  # noqa: B023
        assert torch.equal(got, data[list(layers)][:, :, :1]), layers


# --- every plan shape ---------------------------------------------------------------------------

SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "cls": {
        "cls_a": {"seed": 1, "layers": (1, 2)},
        "cls_b": {"seed": 2, "layers": (1, 2)},
        "cls_c": {"seed": 3, "layers": (1, 2), "combine": "lerp", "lam": 0.3},
        "cls_s": {"seed": 7, "layers": (1, 2), "scale_mode": "channel"},
    },
    "mean": {
        "mean_r": {"seed": 4, "task": "regression", "pooling": "mean", "layers": (2, 2)},
        "ml": {"seed": 6, "task": "multilabel", "tuner": "res_prompt", "pooling": "mean"},
    },
    "mixed": {
        "cls_a": {"seed": 1, "layers": (1, 2)},
        "cls_b": {"seed": 2, "layers": (2, 2)},
        "mean_r": {"seed": 4, "task": "regression", "pooling": "mean", "layers": (2, 2)},
        "emb": {"seed": 5, "task": "embedding", "tuner": "res_prefix", "layers": (1, 1)},
        "ml": {"seed": 6, "task": "multilabel", "tuner": "res_prompt", "pooling": "mean"},
    },
}

PLACEMENTS = [("cpu", torch.float32), ("cpu", torch.bfloat16), ("meta", torch.bfloat16)]
"""Float32 as the CPU tests run; bf16 as a GPU runs (backbone and plan); bf16 on ``meta``."""


def _tuners(backbone: TorchBackbone, artifact: ArtifactFactory, shape: str) -> list[LoadedTuner]:
    return [loaded_tuner(backbone, artifact(name, **kw)) for name, kw in SHAPES[shape].items()]


def _plan(
    backbone: TorchBackbone,
    tuners: list[LoadedTuner],
    device: str,
    dtype: torch.dtype,
    grouped: str = "off",
    bucket: int = 4,
) -> DensePlan:
    """A plan with the backbone and the registry's float32 modules on ``device`` (copies:
    the session's backbone and the tuners stay as they are)."""
    if device != "cpu" or dtype != torch.float32:
        backbone = copy.deepcopy(backbone).to(device=device, dtype=dtype)
        tuners = [replace(t, module=copy.deepcopy(t.module).to(device)) for t in tuners]
    groups = group_tuners(tuners)
    _, h, w = backbone.data_config.input_size
    return DensePlan(
        graph_key(bucket, groups),
        groups,
        backbone.forward_features,
        input_shape=(3, h, w),
        device=torch.device(device),
        dtype=dtype,
        grouped=grouped,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_plan_shape_is_capturable(
    tiny_backbone: TorchBackbone,
    artifact: ArtifactFactory,
    shape: str,
    device: str,
    dtype: torch.dtype,
) -> None:
    tuners = _tuners(tiny_backbone, artifact, shape)
    plan = _plan(tiny_backbone, tuners, device, dtype)
    if shape == "mixed":
        assert len(plan.groups) >= 3
        assert plan.key.spec.tokens == "all"
    recorder = plan.check_capturable()  # raises CaptureIllegalError, naming the ops
    assert recorder.ops > 0


MIXED_HEADS: dict[str, dict[str, dict[str, Any]]] = {
    "padded": {
        "cls3": {"seed": 1},
        "reg": {"seed": 2, "task": "regression"},
        "ml": {"seed": 3, "task": "multilabel"},
        "emb": {"seed": 4, "task": "embedding", "embedding_dim": 5},
    },
    "segmented": {
        "cls3": {"seed": 1},
        "reg": {"seed": 2, "task": "regression"},
        "emb": {"seed": 4, "task": "embedding", "embedding_dim": 40},
    },
}
"""One bypass shape (res_adapter, blocks 1-2, CLS) under heads of every kind and width, in
either head layout."""


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
@pytest.mark.parametrize("layout", list(MIXED_HEADS))
@pytest.mark.parametrize("grouped", ["on", "off"])
def test_a_mixed_heads_stack_is_capturable(
    tiny_backbone: TorchBackbone,
    artifact: ArtifactFactory,
    layout: str,
    grouped: str,
    device: str,
    dtype: torch.dtype,
) -> None:
    """A plan whose one stack holds heads of several kinds and class counts (the stack the
    engine's eager path builds for them)."""
    tuners = [
        loaded_tuner(tiny_backbone, artifact(name, layers=(1, 2), **kw))
        for name, kw in MIXED_HEADS[layout].items()
    ]
    if device != "cpu" or dtype != torch.float32:
        backbone = copy.deepcopy(tiny_backbone).to(device=device, dtype=dtype)
        tuners = [replace(t, module=copy.deepcopy(t.module).to(device)) for t in tuners]
    else:
        backbone = tiny_backbone
    groups = (tuple(tuners),)
    _, h, w = backbone.data_config.input_size
    plan = DensePlan(
        graph_key(4, groups),
        groups,
        backbone.forward_features,
        input_shape=(3, h, w),
        device=torch.device(device),
        dtype=dtype,
        grouped=grouped,  # type: ignore[arg-type]
    )
    (group,) = plan.groups
    assert group.head_layout == layout
    assert len(set(group.widths)) > 1
    recorder = plan.check_capturable()
    assert recorder.ops > 0


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
@pytest.mark.parametrize("grouped", ["on", "off"])
def test_cls_plans_with_and_without_the_grouped_kernel_are_capturable(
    tiny_backbone: TorchBackbone,
    artifact: ArtifactFactory,
    grouped: str,
    device: str,
    dtype: torch.dtype,
) -> None:
    """On the CPU the grouped path runs its torch reference (Triton needs CUDA): the same
    tensors and the same shapes the kernel is launched with."""
    tuners = _tuners(tiny_backbone, artifact, "cls")
    plan = _plan(tiny_backbone, tuners, device, dtype, grouped=grouped)
    assert set(plan.impls) == {"grouped" if grouped == "on" else "bmm"}
    plan.check_capturable()


def test_plans_own_every_tuner_tensor_they_read(
    tiny_backbone: TorchBackbone, artifact: ArtifactFactory
) -> None:
    """Nothing the body reads is a module's parameter or buffer (the registry may move or free
    those while a graph still reads them): the final norm and heads are the plan's copies, in
    the compute dtype."""
    tuners = _tuners(tiny_backbone, artifact, "mixed")
    plan = _plan(tiny_backbone, tuners, "cpu", torch.bfloat16)
    read = {t.untyped_storage().data_ptr() for t in plan.check_capturable().external}
    for tuner in tuners:
        module = tuner.module
        for t in [*module.parameters(), *module.buffers()]:
            assert t.untyped_storage().data_ptr() not in read
    for group in plan.groups:
        stack = group._stack
        assert stack is not None
        assert stack.norm.weight is not None
        assert stack.norm.weight.dtype == torch.bfloat16
        assert stack.dtype == torch.bfloat16
        assert all(w.dtype == torch.bfloat16 for w, _ in stack.heads)


def test_the_backbones_cached_position_embedding_is_kept_with_the_plan(
    tiny_backbone: TorchBackbone, artifact: ArtifactFactory
) -> None:
    """At a grid other than the native one the backbone reads a resampled position embedding
    from its cache, which may drop it; the recorder hands it to the plan to keep alive."""
    backbone = copy.deepcopy(tiny_backbone)  # its own cache
    tuners = _tuners(tiny_backbone, artifact, "cls")
    groups = group_tuners(tuners)
    plan = DensePlan(
        graph_key(2, groups),
        groups,
        backbone.forward_features,
        input_shape=(3, 48, 48),  # a 6 x 6 grid; the native one is 4 x 4
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    plan.body(plan.zero_pixels())  # warm-up: the resample fills the cache
    kept = plan.check_capturable().external
    ((_, resampled),) = backbone.model._pos_cache.values()
    assert any(t.untyped_storage().data_ptr() == resampled.data_ptr() for t in kept)
    assert backbone.model.pos_embed.shape[1] < resampled.shape[1]


def test_bf16_plans_answer_like_float32_plans(
    tiny_backbone: TorchBackbone, artifact: ArtifactFactory
) -> None:
    """The norm in the compute dtype changes rounding only."""
    tuners = _tuners(tiny_backbone, artifact, "mixed")
    pixels = torch.stack([pixels_of(i, tiny_backbone)[0] for i in range(3)])
    want = _plan(tiny_backbone, tuners, "cpu", torch.float32).run_pixels(pixels).outputs
    got = _plan(tiny_backbone, tuners, "cpu", torch.bfloat16).run_pixels(pixels).outputs
    for g, w in zip(got, want, strict=True):
        scale = max(1.0, float(w.abs().max()))
        assert float((g - w).abs().max()) <= 0.1 * scale


def test_an_illegal_body_is_refused_before_any_capture(
    tiny_backbone: TorchBackbone, artifact: ArtifactFactory
) -> None:
    """A forward that reads the device on the host fails the check with the op's name."""
    tuners = _tuners(tiny_backbone, artifact, "cls")
    groups = group_tuners(tuners)

    def syncing_forward(images: torch.Tensor, spec: FeatureSpec) -> Features:
        if float(images.abs().sum()) >= 0:  # a host read of device data
            return tiny_backbone.forward_features(images, spec)
        raise AssertionError

    plan = DensePlan(
        graph_key(2, groups),
        groups,
        syncing_forward,
        input_shape=(3, 32, 32),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with pytest.raises(CaptureIllegalError, match="_local_scalar_dense"):
        plan.check_capturable()


# --- on a GPU: the same shapes captured for real ------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("grouped", ["off", "on"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_plan_shape_captures_and_replays_on_cuda(
    tiny_backbone: TorchBackbone, artifact: ArtifactFactory, shape: str, grouped: str
) -> None:
    """Each shape is captured as two graphs on the factory's stream, in bf16, and a replay
    answers like the eager body of the same plan."""
    from server.engine.cuda_graphs import CudaGraphPlan, PlanFactory

    tuners = _tuners(tiny_backbone, artifact, shape)
    backbone = copy.deepcopy(tiny_backbone).to(device="cuda", dtype=torch.bfloat16)
    on_gpu = [replace(t, module=copy.deepcopy(t.module).to("cuda")) for t in tuners]
    groups = group_tuners(on_gpu)
    key = graph_key(4, groups)
    factory = PlanFactory(
        backbone.forward_features,
        (3, 32, 32),
        torch.device("cuda"),
        torch.bfloat16,
        grouped,  # type: ignore[arg-type]
    )
    plan = factory(key, groups)
    assert isinstance(plan, CudaGraphPlan)
    assert plan.keepalive
    eager = _plan(tiny_backbone, tuners, "cuda", torch.bfloat16, grouped=grouped)
    pixels = torch.stack([pixels_of(i, tiny_backbone)[0] for i in range(3)])
    for _ in range(2):  # the second replay reuses the static buffers
        got = plan.run_pixels(pixels.pin_memory()).outputs
    want = eager.run_pixels(pixels.cuda()).outputs
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)
    plan.close()

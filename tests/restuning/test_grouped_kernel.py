"""The grouped res_adapter kernel's math (through its reference path), the dense fan-out that a
CUDA graph captures, and the per-shape chooser. The Triton kernel itself runs here under
Triton's interpreter when Triton is installed, and on CUDA when a GPU is present."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

from restuning.fanout import StackedGroup
from restuning.features import Features
from restuning.kernels import grouped_adapter as ga
from restuning.tuners import TaskModule
from tests.fixtures.tuners import FakeBackboneRef, make_config, make_features, make_norm, make_task

DIM = 40  # not a multiple of the kernel's 64-wide chunks: the masks matter
BACKBONE = FakeBackboneRef(dim=DIM, depth=4)
VARIANTS = [
    ("sum", "fixed", 5),
    ("lerp", "channel", 5),
    ("sum", "scalar", 16),
    ("lerp", "fixed", 33),  # r past one 32-wide rank tile
]
VARIANT_IDS = [f"{c}-{s}-r{r}" for c, s, r in VARIANTS]


def _tasks(n: int, combine: str, scale_mode: str, rank: int, **extra: object) -> list[TaskModule]:
    norm = make_norm(DIM)
    return [
        make_task(
            make_config(  # type: ignore[arg-type]
                f"t{i}",
                BACKBONE,
                layers=(2, 4),
                bottleneck=rank,
                combine=combine,
                lam=0.3,
                scale_mode=scale_mode,
                scale=0.7,
                **extra,
            ),
            norm,
            seed=i,
        )
        for i in range(n)
    ]


def _cls_features(batch: int, seed: int = 1) -> Features:
    return make_features(range(5), batch, tokens=1, dim=DIM, seed=seed)


def _per_task(modules: list[TaskModule], features: Features) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([m(features) for m in modules])  # (K, B, C)


def _stacked_params(group: StackedGroup) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    stack = group._stack
    assert stack is not None
    return {key: dict(p) for key, p in stack.tuners.items()}


@pytest.mark.parametrize(("combine", "scale_mode", "rank"), VARIANTS, ids=VARIANT_IDS)
def test_reference_equals_per_task_modules_and_stacked_group(
    combine: str, scale_mode: str, rank: int
) -> None:
    modules = _tasks(3, combine, scale_mode, rank)
    features = _cls_features(batch=7)
    want = _per_task(modules, features)
    group = StackedGroup(modules, "stacked")
    bypass = modules[0].config.bypass
    h = ga.grouped_adapter_reference(
        features.data[:, :, 0], features.spec.layers, bypass, _stacked_params(group)
    )  # (K, B, D)
    assert h.shape == (3, 7, DIM)
    # The same h through the norm and heads every path shares equals the modules.
    got = group._norm_pool_heads(group._stack, h.unsqueeze(2), 3, 7)  # type: ignore[arg-type]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(group.forward_all(features, "bmm"), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(group.forward_all(features, "grouped"), want, rtol=0, atol=1e-5)
    # And each task's rows from the row-indexed stacked path.
    rows = [torch.arange(7)] * 3
    for got_k, want_k in zip(group(features, rows), want, strict=True):
        torch.testing.assert_close(got_k, want_k, rtol=0, atol=1e-5)


def test_reference_one_task_and_one_row() -> None:
    modules = _tasks(1, "sum", "fixed", 4)
    features = _cls_features(batch=1)
    group = StackedGroup(modules, "stacked")
    torch.testing.assert_close(
        group.forward_all(features, "grouped"), _per_task(modules, features), rtol=0, atol=1e-5
    )


def test_forward_all_rows_are_independent() -> None:
    """A row's outputs do not depend on the other rows (padding rows change nothing)."""
    modules = _tasks(4, "lerp", "channel", 8)
    features = _cls_features(batch=6)
    group = StackedGroup(modules, "stacked")
    full = group.forward_all(features, "grouped")
    garbage = features.data.clone()
    garbage[:, 3:] = 1e3  # what a padded bucket might hold
    mixed = group.forward_all(Features(features.spec, garbage), "grouped")
    torch.testing.assert_close(mixed[:, :3], full[:, :3], rtol=0, atol=0)


def test_forward_all_on_all_token_features_keeps_cls_rows() -> None:
    """All-token features (a batch that also serves mean-pooled tasks) give the same answers."""
    modules = _tasks(2, "sum", "fixed", 4)
    features = make_features(range(5), 3, tokens=5, dim=DIM, seed=2)
    group = StackedGroup(modules, "stacked")
    want = _per_task(modules, features)
    for impl in ("bmm", "grouped"):
        torch.testing.assert_close(
            group.forward_all(features, impl),  # type: ignore[arg-type]
            want,
            rtol=0,
            atol=1e-5,
        )


def test_forward_all_in_a_lower_precision_dtype_is_close() -> None:
    """Stacks cast to bfloat16 (what a GPU runs) stay within bf16 tolerance of float32."""
    modules = _tasks(3, "sum", "fixed", 8)
    features = _cls_features(batch=5)
    want = _per_task(modules, features)
    group = StackedGroup(modules, "stacked", dtype=torch.bfloat16)
    for impl in ("bmm", "grouped"):
        got = group.forward_all(features, impl)  # type: ignore[arg-type]
        assert got.dtype == torch.bfloat16
        scale = want.abs().max().item()
        assert (got.float() - want).abs().max().item() <= 0.05 * scale


def test_forward_all_needs_a_stack() -> None:
    group = StackedGroup(_tasks(1, "sum", "fixed", 4), "loop")
    with pytest.raises(ValueError, match="stacked"):
        group.forward_all(_cls_features(2))


def test_supports_only_cls_res_adapter_within_rank() -> None:
    norm = make_norm(DIM)
    ok = make_config("a", BACKBONE)
    assert ga.supports(ok)
    assert not ga.supports(make_config("b", BACKBONE, pooling="mean"))
    assert not ga.supports(make_config("c", BACKBONE, tuner="res_prefix"))
    big = make_config("d", BACKBONE, bottleneck=ga.MAX_RANK + 1)
    assert not ga.supports(big)
    del norm


def test_chooser_respects_the_setting_and_the_shape() -> None:
    cfg = make_config("a", BACKBONE)
    calls: list[str] = []

    def run(impl: str) -> None:
        calls.append(impl)

    cpu = torch.device("cpu")
    choose = ga.choose_bypass_impl
    assert choose(cfg, 8, 4, "off", run, cpu, torch.float32) == "bmm"
    assert choose(cfg, 8, 4, "on", run, cpu, torch.float32) == "grouped"
    # auto off CUDA: nothing to measure, the batched matmuls.
    assert choose(cfg, 8, 4, "auto", run, cpu, torch.float32) == "bmm"
    # A shape the kernel does not take never gets it, even forced.
    mean = make_config("m", BACKBONE, pooling="mean")
    assert choose(mean, 8, 4, "on", run, cpu, torch.float32) == "bmm"
    assert calls == []  # nothing was timed on the CPU


_INTERPRETED: list[bool] = []
"""Non-empty once this module imported Triton with its interpreter on."""


@pytest.fixture
def interpreted_triton(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Triton's interpreter (kernels run with numpy on CPU tensors), when Triton is installed."""
    # Triton reads the switch when it is first imported, so it must be set before that.
    if "triton" in sys.modules and not _INTERPRETED:
        pytest.skip("Triton was imported without its interpreter in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    _INTERPRETED.append(True)
    ga._kernel.cache_clear()
    yield
    ga._kernel.cache_clear()


@pytest.mark.parametrize(("combine", "scale_mode", "rank"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.usefixtures("interpreted_triton")
def test_triton_kernel_interpreted_equals_reference(
    combine: str, scale_mode: str, rank: int, dtype: torch.dtype
) -> None:
    modules = _tasks(3, combine, scale_mode, rank)
    group = StackedGroup(modules, "stacked", dtype=dtype)
    features = _cls_features(batch=19)  # two row tiles of 16
    x = features.data[:, :, 0].to(dtype)
    bypass = modules[0].config.bypass
    params = _stacked_params(group)
    want = ga.grouped_adapter_reference(x, features.spec.layers, bypass, params)
    got = ga.grouped_adapter_triton(x, features.spec.layers, bypass, params)
    atol = 1e-5 if dtype == torch.float32 else 2e-3 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("combine", "scale_mode", "rank"), VARIANTS, ids=VARIANT_IDS)
def test_triton_kernel_on_cuda_matches_reference_in_bf16(
    combine: str, scale_mode: str, rank: int
) -> None:
    modules = [m.cuda() for m in _tasks(5, combine, scale_mode, rank)]
    group = StackedGroup(modules, "stacked", dtype=torch.bfloat16)
    features = _cls_features(batch=64)
    x = features.data[:, :, 0].to("cuda", torch.bfloat16)
    bypass = modules[0].config.bypass
    params = _stacked_params(group)
    want = ga.grouped_adapter_reference(x, features.spec.layers, bypass, params).float()
    got = ga.grouped_adapter_triton(x, features.spec.layers, bypass, params).float()
    # Same rounding points; only the order of float32 sums differs (then one bf16 rounding).
    assert (got - want).abs().max().item() <= 1e-2 * max(1.0, want.abs().max().item())

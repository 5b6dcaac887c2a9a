"""Res-Tuner modules: registry, state_dict contract, strict build, reference init, sizes, and
the detached backbone (training a bypass never touches the backbone)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from restuning.features import FeatureSpec
from restuning.tuners import TUNERS, ResTuner, build_task, init_task, register_tuner
from restuning.tuners.res_adapter import ResAdapter
from tests.fixtures.tuners import FakeBackboneRef, make_config, make_norm, make_task
from tuners_store.config import parameter_count, tensor_specs

KINDS = ["res_adapter", "res_prefix", "res_prompt"]
SCALES = ["fixed", "scalar", "channel"]


def test_registry_holds_the_three_kinds_and_refuses_duplicates() -> None:
    assert set(TUNERS) == set(KINDS)
    assert all(issubclass(cls, ResTuner) for cls in TUNERS.values())

    class Again(ResAdapter):
        kind = "res_adapter"

    with pytest.raises(ValueError, match="already registered"):
        register_tuner(Again)
    assert TUNERS["res_adapter"] is ResAdapter


@pytest.mark.parametrize("tuner", KINDS)
@pytest.mark.parametrize("scale_mode", SCALES)
@pytest.mark.parametrize("task", ["classification", "embedding"])
def test_state_dict_is_exactly_the_contract(tuner: str, scale_mode: str, task: str) -> None:
    config = make_config(
        "t",
        FakeBackboneRef(dim=8, depth=4),
        tuner=tuner,  # type: ignore[arg-type]
        scale_mode=scale_mode,  # type: ignore[arg-type]
        task=task,  # type: ignore[arg-type]
        layers=(2, 3),
    )
    module = init_task(config, make_norm(8), seed=0)
    sd = module.state_dict()
    specs = tensor_specs(config)
    assert set(sd) == set(specs)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: s.shape for k, s in specs.items()}
    # The backbone's norm is used but never saved, and gets no gradient.
    assert not any("norm" in k for k in sd)
    assert {n for n, _ in module.named_parameters()} == set(specs)
    assert module.feature_spec == FeatureSpec((1, 2, 3), "cls")


def test_final_norm_is_the_backbones_and_frozen() -> None:
    norm = make_norm(8)
    module = make_task(make_config("t", FakeBackboneRef(dim=8, depth=2)), norm)
    assert module.bypass.norm_weight is not None
    assert module.bypass.norm_weight.data_ptr() == norm.weight.data_ptr()
    with pytest.raises(ValueError, match="final norm"):
        make_task(make_config("t", FakeBackboneRef(dim=8, depth=2)), nn.LayerNorm(16))


def test_build_task_is_strict() -> None:
    config = make_config("t", FakeBackboneRef(dim=8, depth=2), scale_mode="scalar")
    norm = make_norm(8)
    tensors = dict(make_task(config, norm).state_dict())
    built = build_task(config, tensors, norm)
    assert all(torch.equal(built.state_dict()[k], v) for k, v in tensors.items())

    missing = {k: v for k, v in tensors.items() if k != "bypass.lateral.1.scale"}
    with pytest.raises(ValueError, match=r"missing \['bypass.lateral.1.scale'\]"):
        build_task(config, missing, norm)
    with pytest.raises(ValueError, match="unexpected"):
        build_task(config, {**tensors, "bypass.norm.weight": torch.ones(8)}, norm)
    with pytest.raises(ValueError, match="shape"):
        build_task(config, {**tensors, "head.bias": torch.zeros(4)}, norm)
    with pytest.raises(ValueError, match="mix dtypes"):
        build_task(config, {**tensors, "head.bias": tensors["head.bias"].half()}, norm)
    half = build_task(config, {k: v.half() for k, v in tensors.items()}, norm)
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_reference_init_of_the_adapter() -> None:
    dim, r = 64, 16
    config = make_config(
        "t", FakeBackboneRef(dim=dim, depth=3), bottleneck=r, scale_mode="channel", scale=0.5
    )
    module = init_task(config, make_norm(dim), seed=7)
    bound = math.sqrt(6.0 / (r + dim))  # Xavier-uniform on (r, D) and (D, r)
    for layer in range(1, 4):
        for side in ("lateral", "vertical"):
            p = module.bypass.tuner(side, layer).tensors()
            for name in ("w1", "w2"):
                assert p[name].abs().max() <= bound
                assert p[name].abs().max() > 0.5 * bound
            assert 0 < p["b1"].abs().max() < 1e-5  # N(0, 1e-6)
            assert torch.count_nonzero(p["b2"]) == 0
            assert torch.equal(p["scale"], torch.full((dim,), 0.5))
    assert torch.count_nonzero(module.head.bias) == 0
    assert 0 < module.head.weight.abs().max() < 0.1


def test_init_is_seeded() -> None:
    config = make_config("t", FakeBackboneRef(dim=8, depth=2), tuner="res_prompt")
    a, b, c = (init_task(config, make_norm(8), seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["bypass.lateral.1.wq"], c["bypass.lateral.1.wq"])


@pytest.mark.parametrize("tuner", KINDS)
def test_zero_init_last_zeroes_only_the_last_output_projection(tuner: str) -> None:
    config = make_config("t", FakeBackboneRef(dim=8, depth=4), tuner=tuner)  # type: ignore[arg-type]
    module = init_task(config, make_norm(8), seed=0, zero_init_last=True)
    out_names = TUNERS[tuner].output_params
    for layer in range(1, 5):
        for side in ("lateral", "vertical"):
            p = module.bypass.tuner(side, layer).tensors()
            weight = out_names[0]  # w2 / wo; the bias (b2 / bo) is zero at init anyway
            assert (torch.count_nonzero(p[weight]) == 0) == (layer == 4), (side, layer)
            assert torch.count_nonzero(p[out_names[1]]) == 0
            # The input projection is never zeroed.
            assert torch.count_nonzero(next(iter(p.values()))) > 0


def test_adapter_parameter_count_for_vit_base() -> None:
    config = make_config(
        "vitb",
        FakeBackboneRef(dim=768, depth=12),
        bottleneck=32,
        labels=[str(i) for i in range(100)],
    )
    module = init_task(config, nn.LayerNorm(768), seed=0)
    one = module.bypass.tuner("lateral", 1)
    assert sum(p.numel() for p in one.parameters()) == 49_952
    bypass = sum(p.numel() for p in module.bypass.parameters())
    assert bypass == 1_198_848
    head = 768 * 100 + 100
    assert sum(p.numel() for p in module.parameters()) == bypass + head == parameter_count(config)


# ---------------------------------------------------------------- detached backbone


def _graph_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """Tensors whose gradient the graph of ``loss`` would accumulate."""
    seen, stack, leaves = set(), [loss.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.append(fn.variable)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def test_training_the_bypass_leaves_the_backbone_alone(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    """Gradients reach every tuner tensor and no backbone parameter; the features carry no
    graph, so nothing of the backbone forward is kept for backward."""
    config = make_config("train", tiny_backbone, layers=(1, tiny_backbone.depth), bottleneck=4)
    module = init_task(config, tiny_backbone.final_norm, seed=0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = tiny_backbone.forward_features(images, module.feature_spec)
    assert not features.data.requires_grad
    assert features.data.grad_fn is None

    before = {n: p.detach().clone() for n, p in tiny_backbone.model.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    targets = torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        loss = nn.functional.cross_entropy(module(features), targets)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    # Every leaf of the last loss's graph is a tuner parameter: no backbone tensor is in it.
    leaves = _graph_leaves(loss)
    assert leaves
    assert {id(t) for t in leaves} <= {id(p) for p in module.parameters()}
    assert all(p.grad is not None for p in module.parameters())
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())
    after = dict(tiny_backbone.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    # The norm the bypass used is the backbone's own, unchanged.
    assert module.bypass.norm_weight is not None
    assert torch.equal(module.bypass.norm_weight, tiny_backbone.final_norm.weight)

"""The bypass computes the Res-Tuning-Bypass equations (Jiang et al., NeurIPS 2023): golden
vectors, a straight-line reference written here, and CLS-only features giving the all-token
answer for CLS tasks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from restuning.features import Features, FeatureSpec
from restuning.tuners import build_task
from tests.fixtures.tuners import (
    FakeBackboneRef,
    make_config,
    make_features,
    make_norm,
    make_task,
)
from tuners_store.config import TunerConfig

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "bypass_v1.safetensors"


# ---------------------------------------------------------------- golden vectors


def _golden_task(combine: str, pooling: str, dtype: torch.dtype) -> tuple[nn.Module, Tensor]:
    """The golden weights mapped onto our module names; returns (module, x)."""
    g = load_file(GOLDEN)
    x = g["x"].to(dtype)  # (L+1, B, N, D) = (4, 2, 5, 8)
    depth, dim = x.shape[0] - 1, x.shape[-1]
    bottleneck, classes = g["lateral.1.w1"].shape[0], g["head.weight"].shape[0]
    norm = nn.LayerNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(g["norm.weight"])
        norm.bias.copy_(g["norm.bias"])
    config = make_config(
        "golden",
        FakeBackboneRef(dim=dim, depth=depth),
        labels=[f"c{i}" for i in range(classes)],
        layers=(1, depth),
        bottleneck=bottleneck,
        combine=combine,  # type: ignore[arg-type]
        lam=0.3,
        scale_mode="channel",
        pooling=pooling,  # type: ignore[arg-type]
    )
    tensors = {
        f"bypass.{k}": v.to(dtype) for k, v in g.items() if k.startswith(("lateral.", "vertical."))
    }
    tensors["head.weight"] = g["head.weight"].to(dtype)
    tensors["head.bias"] = g["head.bias"].to(dtype)
    return build_task(config, tensors, norm.to(dtype)), x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("combine", "key"), [("sum", "sum"), ("lerp", "lerp0.3")])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_golden_vectors(combine: str, key: str, pooling: str, dtype: torch.dtype) -> None:
    module, x = _golden_task(combine, pooling, dtype)
    features = Features(FeatureSpec(tuple(range(x.shape[0])), "all"), x)
    expected = load_file(GOLDEN)[f"expected.{key}.{pooling}"].to(torch.float64)
    with torch.no_grad():
        got = module(features).to(torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- straight-line reference


def _gelu(t: Tensor) -> Tensor:
    return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))


def _softmax(s: Tensor) -> Tensor:
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _reference_tuner(config: TunerConfig, p: dict[str, Tensor], t: Tensor) -> Tensor:
    """One Res-Tuner on tokens t (B, N, D), from the equations, nothing shared with the code."""
    kind = config.bypass.tuner
    r = config.bypass.bottleneck
    if kind == "res_adapter":
        delta = _gelu(t @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]
    else:
        if kind == "res_prefix":
            keys, values = p["k"], p["v"]
        else:
            keys, values = p["prompt"] @ p["wk"].T, p["prompt"] @ p["wv"].T
        attn = _softmax((t @ p["wq"].T) @ keys.T / math.sqrt(r))
        delta = (attn @ values) @ p["wo"].T + p["bo"]
    scale = p["scale"] if "scale" in p else torch.tensor(config.bypass.scale, dtype=t.dtype)
    return t + scale * delta


def _reference_outputs(
    config: TunerConfig, sd: dict[str, Tensor], norm: nn.LayerNorm, xs: Tensor
) -> Tensor:
    """The whole task on all tokens: xs (L+1, B, N, D) indexed by layer -> (B, C)."""
    first, last = config.bypass.layers

    def tuner(side: str, layer: int, t: Tensor) -> Tensor:
        prefix = f"bypass.{side}.{layer}."
        p = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        return _reference_tuner(config, p, t)

    h = xs[first - 1]
    for layer in range(first, last + 1):
        lat = tuner("lateral", layer, xs[layer])
        vert = tuner("vertical", layer, h)
        if config.bypass.combine == "sum":
            h = lat + vert
        else:
            lam = config.bypass.lam
            h = lam * lat + (1 - lam) * vert
    mu = h.mean(dim=-1, keepdim=True)
    var = ((h - mu) ** 2).mean(dim=-1, keepdim=True)
    z = (h - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    pooled = z[:, 0] if config.pooling == "cls" else z[:, 1:].mean(dim=1)
    return pooled @ sd["head.weight"].T + sd["head.bias"]


KINDS = ["res_adapter", "res_prefix", "res_prompt"]
SCALES = ["fixed", "scalar", "channel"]


@pytest.mark.parametrize("tuner", KINDS)
@pytest.mark.parametrize("combine", ["sum", "lerp"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("scale_mode", SCALES)
def test_module_matches_reference(tuner: str, combine: str, pooling: str, scale_mode: str) -> None:
    backbone = FakeBackboneRef(dim=8, depth=4)
    config = make_config(
        "ref",
        backbone,
        tuner=tuner,  # type: ignore[arg-type]
        combine=combine,  # type: ignore[arg-type]
        lam=0.3,
        pooling=pooling,  # type: ignore[arg-type]
        scale_mode=scale_mode,  # type: ignore[arg-type]
        scale=0.7,
        layers=(2, 4),
    )
    norm = make_norm(8).double()
    module = make_task(config, norm, seed=3).double()
    features = make_features(range(5), batch=3, tokens=5, dim=8, seed=1, dtype=torch.float64)
    with torch.no_grad():
        got = module(features)
        want = _reference_outputs(config, module.state_dict(), norm, features.data)
    assert got.shape == (3, config.num_outputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_reference_detects_a_wrong_combine() -> None:
    """The comparison above can fail: sum and lerp answers differ on the same weights."""
    backbone = FakeBackboneRef(dim=8, depth=4)
    sum_cfg = make_config("s", backbone, combine="sum")
    lerp_cfg = make_config("s", backbone, combine="lerp", lam=0.3)
    norm = make_norm(8).double()
    module = make_task(sum_cfg, norm, seed=3).double()
    features = make_features(range(5), batch=2, tokens=5, dim=8, dtype=torch.float64)
    with torch.no_grad():
        want = _reference_outputs(lerp_cfg, module.state_dict(), norm, features.data)
        assert not torch.allclose(module(features), want, atol=1e-3)


# ---------------------------------------------------------------- CLS-only == all tokens


@pytest.mark.parametrize("tuner", KINDS)
@pytest.mark.parametrize("combine", ["sum", "lerp"])
def test_cls_only_features_equal_all_tokens(tuner: str, combine: str) -> None:
    backbone = FakeBackboneRef(dim=8, depth=4)
    config = make_config(
        "cls",
        backbone,
        tuner=tuner,  # type: ignore[arg-type]
        combine=combine,  # type: ignore[arg-type]
        scale_mode="channel",
        layers=(1, 3),
    )
    assert config.token_selection == "cls"
    norm = make_norm(8)
    module = make_task(config, norm, seed=5)
    all_tokens = make_features(range(5), batch=4, tokens=7, dim=8, seed=2)
    cls_rows = Features(FeatureSpec(all_tokens.spec.layers, "cls"), all_tokens.data[:, :, :1])
    assert cls_rows.data.shape[2] == 1
    with torch.no_grad():
        from_cls = module(cls_rows)
        from_all = module(all_tokens)
        # The reference runs every token through the bypass and picks CLS at the very end.
        want = _reference_outputs(config, module.state_dict(), norm, all_tokens.data)
    torch.testing.assert_close(from_cls, from_all, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_cls, want, rtol=0, atol=1e-6)


def test_mean_pooling_refuses_cls_only_features() -> None:
    backbone = FakeBackboneRef(dim=8, depth=2)
    config = make_config("m", backbone, pooling="mean")
    module = make_task(config, make_norm(8))
    assert module.feature_spec == FeatureSpec((0, 1, 2), "all")
    cls_rows = Features(FeatureSpec((0, 1, 2), "cls"), torch.randn(3, 2, 1, 8))
    with pytest.raises(ValueError, match="do not cover"):
        module(cls_rows)

"""Task modules to artifact bytes and back: exact, validated first, never unpickled."""

from __future__ import annotations

import io

import pytest
import torch

from restuning.artifact_io import load_task, save_task
from tests.fixtures.tuners import (
    FakeBackboneRef,
    make_artifact,
    make_config,
    make_features,
    make_norm,
    make_task,
)
from tuners_store.artifact import ArtifactError, read_header

BACKBONE = FakeBackboneRef(dim=8, depth=3)


@pytest.mark.parametrize("tuner", ["res_adapter", "res_prefix", "res_prompt"])
def test_round_trip_is_exact(tuner: str) -> None:
    config = make_config(
        "rt",
        BACKBONE,
        tuner=tuner,  # type: ignore[arg-type]
        scale_mode="scalar",
        pooling="mean",
    )
    norm = make_norm(8)
    module = make_task(config, norm, seed=4)
    data = save_task(module)
    assert read_header(data).config == config
    loaded = load_task(data, norm, expect_fingerprint=BACKBONE.fingerprint)
    assert loaded.config == config
    before, after = module.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    features = make_features(range(4), 3, 5, 8)
    with torch.no_grad():
        assert torch.equal(module(features), loaded(features))


def test_half_precision_artifacts_and_load_dtype() -> None:
    config = make_config("half", BACKBONE)
    data = make_artifact(config, seed=1, dtype=torch.float16)
    assert read_header(data).dtype == "F16"
    loaded = load_task(data, make_norm(8))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    norm = make_norm(8)
    bf16 = load_task(data, norm, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    # The module computes in one dtype, its copy of the norm too; the backbone's is untouched.
    assert bf16.bypass.norm_weight is not None
    assert bf16.bypass.norm_weight.dtype == torch.bfloat16
    assert norm.weight.dtype == torch.float32
    out = bf16(make_features(range(4), 2, 5, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_load_refuses_another_backbone() -> None:
    data = make_artifact(make_config("fp", BACKBONE))
    with pytest.raises(ArtifactError) as err:
        load_task(data, make_norm(8), expect_fingerprint="0" * 16)
    assert err.value.code == "backbone_mismatch"


def test_load_refuses_oversize_and_pickles(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_artifact(make_config("big", BACKBONE))
    with pytest.raises(ArtifactError) as err:
        load_task(data, make_norm(8), max_bytes=len(data) - 1)
    assert err.value.code == "artifact_too_large"

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never run on artifact bytes")

    buffer = io.BytesIO()
    torch.save(make_task(make_config("p", BACKBONE), make_norm(8)).state_dict(), buffer)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ArtifactError) as err:
        load_task(buffer.getvalue(), make_norm(8))
    assert err.value.code == "artifact_bad_format"
    # A valid artifact still loads with torch.load unavailable.
    assert load_task(data, make_norm(8)).config.name == "big"


def test_load_refuses_non_finite_weights() -> None:
    config = make_config("nan", BACKBONE)
    module = make_task(config, make_norm(8))
    with torch.no_grad():
        module.head.bias[0] = float("nan")
    with pytest.raises(ArtifactError) as err:
        load_task(save_task(module), make_norm(8))
    assert err.value.code == "artifact_non_finite"


def test_tiny_backbone_artifact_loads_onto_its_backbone(tiny_artifact, tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    module = load_task(
        tiny_artifact, tiny_backbone.final_norm, expect_fingerprint=tiny_backbone.fingerprint
    )
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = tiny_backbone.forward_features(images, module.feature_spec)
    with torch.no_grad():
        assert module(features).shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_saving_the_same_module_twice_gives_the_same_bytes(dtype: torch.dtype) -> None:
    # Versions are content-addressed by sha256: a re-save must not look like a new tuner.
    backbone = FakeBackboneRef()
    config = make_config("stable", backbone)
    module = make_task(config, make_norm(backbone.dim), seed=3).to(dtype=dtype)
    assert save_task(module) == save_task(module)

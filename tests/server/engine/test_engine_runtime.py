"""The torch runtime behind the Backbone protocol, and how settings choose weights and dtype."""

from __future__ import annotations

import logging

import pytest
import torch

from restuning.embedded import EMBEDDED_ARCH
from restuning.features import FeatureSpec
from server.engine.runtime import (
    Backbone,
    TorchRuntime,
    compute_dtype,
    load_backbone_runtime,
    resolve_weights,
)
from server.settings import Settings


def test_random_weights_load_with_a_loud_warning(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(backbone="vit_test_tiny", backbone_weights="random:3")
    with caplog.at_level(logging.WARNING, logger="server.engine.runtime"):
        backbone = load_backbone_runtime(settings)
    assert isinstance(backbone, TorchRuntime)
    assert isinstance(backbone, Backbone)
    assert backbone.is_random
    assert any("RANDOM" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert (backbone.runtime, backbone.device, backbone.dtype) == ("torch", "cpu", "float32")
    assert backbone.providers == ["torch-cpu"]
    features = backbone.forward_features(torch.zeros(2, 3, 32, 32), FeatureSpec((0, 2), "cls"))
    assert tuple(features.data.shape) == (2, 2, 1, backbone.dim)


def test_same_weights_same_fingerprint_other_seed_other_fingerprint() -> None:
    a = load_backbone_runtime(Settings(backbone="vit_test_tiny", backbone_weights="random:1"))
    b = load_backbone_runtime(Settings(backbone="vit_test_tiny", backbone_weights="random:1"))
    c = load_backbone_runtime(Settings(backbone="vit_test_tiny", backbone_weights="random:2"))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_empty_weights_need_the_embedded_architecture() -> None:
    settings = Settings(backbone="vit_test_tiny", backbone_weights="")
    with pytest.raises(ValueError, match=EMBEDDED_ARCH):
        resolve_weights(settings)
    explicit = Settings(backbone="vit_test_tiny", backbone_weights="random:0")
    assert resolve_weights(explicit) == ("vit_test_tiny", "random:0")


def test_auto_dtype_is_bfloat16_on_cuda_only() -> None:
    assert compute_dtype(Settings(device="cpu")) == torch.float32
    assert compute_dtype(Settings(device="cuda:0")) == torch.bfloat16
    assert compute_dtype(Settings(device="cuda", dtype="float16")) == torch.float16

"""bench/training_memory.py: the allocation tracker counts what it should, and the bypass keeps
none of the backbone's activations for backward while the tuners-inside variant keeps them all."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench.training_memory import (
    SavedTensors,
    TensorBytesTracker,
    make_steps,
    parameter_storages,
    run,
    saved_tensors,
)
from restuning.backbone import TorchBackbone
from tests.fixtures.training_data import one_torch_thread  # noqa: F401  (pytestmark fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH = 16


def test_tracker_counts_new_storages_until_freed() -> None:
    base = torch.ones(256)
    tracker = TensorBytesTracker()
    with tracker:
        fresh = base * 2  # new storage: 1 KiB
        view = fresh.view(16, 16)  # same storage
        base.add_(1)  # in place on a storage that existed before
        assert tracker.live == 1024
        del fresh, view
        assert tracker.live == 0
        bigger = torch.zeros(1024)
    assert tracker.peak == 4096
    del bigger
    assert tracker.live == 0


def saved_by(run_step: Callable[[], torch.Tensor], exclude: set[int]) -> SavedTensors:
    """What autograd keeps for backward during one forward (then backward, to free it)."""
    with saved_tensors(exclude) as saved:
        out = run_step()
    torch.autograd.backward(out.sum())
    return saved


def test_bypass_holds_no_backbone_activations(tiny_backbone: TorchBackbone) -> None:
    images = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    steps = {s.name: s for s in make_steps(tiny_backbone, images)}
    exclude = parameter_storages(
        tiny_backbone.model, steps["inside"].module, steps["bypass_cls"].module
    )
    saved = {name: saved_by(s.run, exclude) for name, s in steps.items()}
    tokens = 1 + (32 // 8) ** 2

    # The backbone forward inside the step adds nothing autograd keeps: same bytes as training on
    # features computed beforehand.
    assert saved["bypass_cls"].nbytes == saved["bypass_cached"].nbytes > 0
    # CLS pooling: every saved tensor holds one token per image, never the patch tokens.
    assert all(tokens not in shape for shape in saved["bypass_cls"].shapes)
    # Inside, gradients cross every frozen block: attention and MLP activations are kept.
    hidden = 4 * tiny_backbone.dim
    assert any(shape[-1] == hidden and tokens in shape for shape in saved["inside"].shapes)
    assert not any(shape[-1] == hidden for shape in saved["bypass_all_tokens"].shapes)
    assert saved["inside"].nbytes > 1.5 * saved["bypass_all_tokens"].nbytes


def test_quick_report_compares_every_variant() -> None:
    report = run(quick=True)
    assert report["paper_peak_change_pct"] == -49.7
    (model,) = report["models"]
    variants = model["variants"]
    assert set(variants) == {"inside", "bypass_all_tokens", "bypass_cls", "bypass_cached"}
    inside = variants["inside"]["peak_bytes"]
    for name in ("bypass_all_tokens", "bypass_cls", "bypass_cached"):
        assert 0 < variants[name]["peak_bytes"] < inside
        assert variants[name]["peak_change_pct"] < 0
        assert variants[name]["saved_bytes"] < variants["inside"]["saved_bytes"]

"""Stacked fan-out == one task at a time == the per-task module, on row subsets and mixed
groups; groups are immutable."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from restuning.fanout import (
    GroupedFanout,
    StackedGroup,
    choose_head_layout,
    choose_strategy,
)
from restuning.features import Features, FeatureSpec
from restuning.tuners import TaskModule
from tests.fixtures.models import tiny_backbone_factory
from tests.fixtures.tuners import FakeBackboneRef, make_config, make_features, make_norm, make_task

KINDS = ["res_adapter", "res_prefix", "res_prompt"]
BACKBONE = FakeBackboneRef(dim=8, depth=4)
BATCH = 6


def _tasks(n: int, **config: object) -> list[TaskModule]:
    norm = make_norm(8)
    return [
        make_task(make_config(f"t{i}", BACKBONE, **config), norm, seed=i)  # type: ignore[arg-type]
        for i in range(n)
    ]


def _rows(*sets: list[int]) -> list[Tensor]:
    return [torch.tensor(s, dtype=torch.long) for s in sets]


# Dense: every task on every row (the stack runs on shared rows).
DENSE = _rows(*([list(range(BATCH))] * 5))
# Mixed: overlapping, reordered, repeated and empty row sets.
MIXED = _rows([0, 1, 2, 3, 4, 5], [5, 1], [], [3], [2, 2, 0])
# Sparse: each task asks for few rows (the stack gathers each task's own rows).
SPARSE = _rows([0], [5], [], [3], [4, 1])
# Few tasks asked, scattered (their tensors are taken out of the stack) or contiguous (a view).
SCATTERED = _rows([1, 2], [], [], [], [0, 5])
CONTIGUOUS = _rows([], [3], [3, 4], [], [])
ROW_SETS = [DENSE, MIXED, SPARSE, SCATTERED, CONTIGUOUS]
ROW_IDS = ["dense", "mixed", "sparse", "scattered", "contiguous"]


def _one_at_a_time(
    modules: list[TaskModule], features: Features, rows: list[Tensor]
) -> list[Tensor]:
    with torch.no_grad():
        return [m(features.rows(r)) for m, r in zip(modules, rows, strict=True)]


def _assert_all_close(got: list[Tensor], want: list[Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tuner", KINDS)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("rows", ROW_SETS, ids=ROW_IDS)
@pytest.mark.parametrize("scale_mode", ["fixed", "channel"])
def test_stacked_equals_one_task_at_a_time(
    tuner: str, pooling: str, rows: list[Tensor], scale_mode: str
) -> None:
    modules = _tasks(
        5,
        tuner=tuner,
        pooling=pooling,
        scale_mode=scale_mode,
        combine="lerp",
        lam=0.3,
        layers=(2, 4),
    )
    features = make_features(range(5), BATCH, tokens=5, dim=8, seed=1)
    want = _one_at_a_time(modules, features, rows)
    for strategy in ("stacked", "loop"):
        group = StackedGroup(modules, strategy)  # type: ignore[arg-type]
        assert group.strategy == strategy
        _assert_all_close(group(features, rows), want)
    # A stack split into task chunks (tiny activation cap) gives the same answers.
    _assert_all_close(StackedGroup(modules, "stacked", max_stack_elements=1)(features, rows), want)


# Heads of every kind and of several widths on one bypass shape: (kind, width) per task.
# Widths [3, 7, 2, 5, 6] pad to 35 columns for 23 (x1.5): one padded matmul.
# Widths [2, 2, 3, 2, 40] pad to 200 for 49 (x4.1): one matmul per task.
MIXED_HEADS = {
    "padded": [
        ("classification", 3),
        ("multilabel", 7),
        ("regression", 2),
        ("classification", 5),
        ("embedding", 6),
    ],
    "segmented": [
        ("classification", 2),
        ("regression", 2),
        ("multilabel", 3),
        ("classification", 2),
        ("embedding", 40),
    ],
}


def _mixed_heads(layout: str, **config: object) -> list[TaskModule]:
    norm = make_norm(8)
    modules = []
    for i, (kind, width) in enumerate(MIXED_HEADS[layout]):
        labels = [f"c{j}" for j in range(width)] if kind != "embedding" else None
        cfg = make_config(
            f"h{i}",
            BACKBONE,
            task=kind,  # type: ignore[arg-type]
            labels=labels,
            embedding_dim=width,
            **config,  # type: ignore[arg-type]
        )
        modules.append(make_task(cfg, norm, seed=10 + i))
    assert [m.config.num_outputs for m in modules] == [w for _, w in MIXED_HEADS[layout]]
    return modules


@pytest.mark.parametrize("layout", list(MIXED_HEADS))
@pytest.mark.parametrize("tuner", KINDS)
@pytest.mark.parametrize("rows", ROW_SETS, ids=ROW_IDS)
def test_mixed_heads_stack_and_equal_one_task_at_a_time(
    layout: str, tuner: str, rows: list[Tensor]
) -> None:
    """Heads of different kinds and class counts share one stack; each task's output is its
    own width and equals the task alone, whichever head layout runs."""
    modules = _mixed_heads(layout, tuner=tuner, pooling="mean", layers=(2, 4))
    features = make_features(range(5), BATCH, tokens=5, dim=8, seed=5)
    want = _one_at_a_time(modules, features, rows)
    for strategy in ("stacked", "loop"):
        group = StackedGroup(modules, strategy)  # type: ignore[arg-type]
        assert group.head_layout == layout
        _assert_all_close(group(features, rows), want)
    chunked = StackedGroup(modules, "stacked", max_stack_elements=1)
    _assert_all_close(chunked(features, rows), want)
    fanout = GroupedFanout(modules)
    assert len(fanout.groups) == 1
    _assert_all_close(fanout(features, rows), want)


@pytest.mark.parametrize("layout", list(MIXED_HEADS))
def test_mixed_heads_forward_all_pads_to_the_widest_head_with_zeros(layout: str) -> None:
    modules = _mixed_heads(layout)
    features = make_features(range(5), BATCH, tokens=5, dim=8, seed=6)
    group = StackedGroup(modules, "stacked")
    out = group.forward_all(features)  # (K, B, C)
    assert out.shape == (5, BATCH, max(group.widths))
    assert group.width == max(group.widths)
    want = _one_at_a_time(modules, features, [torch.arange(BATCH)] * 5)
    _assert_all_close([out[k, :, :c] for k, c in enumerate(group.widths)], want)
    for k, c in enumerate(group.widths):
        assert not out[k, :, c:].any()


def test_a_head_wider_than_its_config_shows_its_own_width_in_a_stack() -> None:
    """The stack cuts each output to the head's own width, not the config's: a head that
    disagrees with its config answers the wrong shape stacked as alone (and is caught)."""
    modules = _mixed_heads("padded")
    modules[1].head = torch.nn.Linear(8, modules[1].config.num_outputs + 2)
    features = make_features(range(5), BATCH, tokens=5, dim=8, seed=7)
    want = _one_at_a_time(modules, features, DENSE)
    assert want[1].shape[1] == modules[1].config.num_outputs + 2
    group = StackedGroup(modules, "stacked")
    _assert_all_close(group(features, DENSE), want)
    assert group.forward_all(features).shape[2] == group.width == max(w.shape[1] for w in want)


def test_head_layout_choice() -> None:
    assert choose_head_layout([10] * 19) == "padded"
    assert choose_head_layout([3, 7, 2, 5, 6]) == "padded"
    vtab = [102, 100, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9]
    assert choose_head_layout(vtab) == "segmented"
    assert choose_head_layout([2, 2, 3, 2, 40]) == "segmented"


def test_padding_counts_in_a_groups_bytes() -> None:
    """A padded stack weighs its padded heads; a segmented one only the heads' own tensors."""

    def head_bytes(modules: tuple[TaskModule, ...]) -> int:
        return sum((m.head.weight.numel() + m.head.bias.numel()) * 4 for m in modules)

    segmented = StackedGroup(_mixed_heads("segmented"), "stacked")
    padded = StackedGroup(_mixed_heads("padded"), "stacked")
    tuner_bytes = segmented.nbytes - head_bytes(segmented.modules)
    assert tuner_bytes > 0
    k, c, d = 5, 7, 8
    assert padded.nbytes == tuner_bytes + k * (c * d + c) * 4
    assert padded.nbytes > tuner_bytes + head_bytes(padded.modules)
    assert StackedGroup(segmented.modules[:1], "loop").nbytes == 0


def test_no_rows_at_all() -> None:
    modules = _tasks(3)
    features = make_features(range(5), BATCH, tokens=5, dim=8)
    empty = _rows([], [], [])
    for strategy in ("stacked", "loop"):
        got = StackedGroup(modules, strategy)(features, empty)  # type: ignore[arg-type]
        assert [tuple(g.shape) for g in got] == [(0, 3)] * 3


def test_stacked_rows_are_what_the_task_alone_gives_on_the_whole_batch() -> None:
    """Each row's answer depends only on that row: a subset equals slicing the full answer."""
    modules = _tasks(3, tuner="res_prompt", pooling="mean")
    features = make_features(range(5), BATCH, tokens=5, dim=8, seed=4)
    rows = _rows([4, 0], [1, 2, 3], [5])
    got = StackedGroup(modules, "stacked")(features, rows)
    with torch.no_grad():
        for m, r, g in zip(modules, rows, got, strict=True):
            torch.testing.assert_close(g, m(features)[r], rtol=0, atol=1e-5)


def test_stacked_differs_when_tasks_differ() -> None:
    """The comparison can fail: two tasks with different weights give different answers."""
    modules = _tasks(2)
    features = make_features(range(5), BATCH, tokens=5, dim=8)
    a, b = StackedGroup(modules, "stacked")(features, DENSE[:2])
    assert not torch.allclose(a, b, atol=1e-3)


def test_cls_group_runs_on_cls_rows_of_all_token_features() -> None:
    modules = _tasks(4, tuner="res_prefix")
    features = make_features(range(5), BATCH, tokens=9, dim=8, seed=2)
    cls_only = Features(FeatureSpec(features.spec.layers, "cls"), features.data[:, :, :1])
    rows = MIXED[:4]
    group = StackedGroup(modules, "stacked")
    _assert_all_close(group(features, rows), group(cls_only, rows))


def test_grouped_fanout_mixes_shapes_and_keeps_task_order() -> None:
    norm = make_norm(8)
    configs = [
        make_config("a", BACKBONE),
        make_config("b", BACKBONE, tuner="res_prefix", pooling="mean", layers=(2, 3)),
        make_config("c", BACKBONE),
        make_config("d", BACKBONE, task="regression", bottleneck=2),
        make_config("e", BACKBONE, tuner="res_prefix", pooling="mean", layers=(2, 3)),
        make_config("f", BACKBONE, task="embedding", embedding_dim=5, tuner="res_prompt"),
    ]
    modules = [make_task(c, norm, seed=i) for i, c in enumerate(configs)]
    fanout = GroupedFanout(modules)
    assert sorted(len(m) for _, m in fanout.groups) == [1, 1, 2, 2]
    assert fanout.feature_spec == FeatureSpec((0, 1, 2, 3, 4), "all")
    features = make_features(range(5), BATCH, tokens=5, dim=8, seed=3)
    rows = _rows([0, 1, 2, 3, 4, 5], [2], [5, 4], [], [0, 3], [1, 1])
    got = fanout(features, rows)
    _assert_all_close(got, _one_at_a_time(modules, features, rows))
    assert [g.shape[1] for g in got] == [3, 3, 3, 2, 3, 5]
    everyone = fanout(features)
    _assert_all_close(everyone, _one_at_a_time(modules, features, [torch.arange(BATCH)] * 6))


def test_groups_are_immutable() -> None:
    modules = _tasks(3)
    group = StackedGroup(modules[:2], "stacked")
    features = make_features(range(5), BATCH, tokens=5, dim=8)
    rows = DENSE[:2]
    before = group(features, rows)

    extra = make_task(make_config("t2", BACKBONE), make_norm(8), seed=99)
    bigger = group.with_module(extra)
    assert group.names == ("t0", "t1")
    assert bigger.names == ("t0", "t1", "t2")
    replaced = group.with_module(make_task(make_config("t0", BACKBONE), make_norm(8), seed=42))
    assert replaced.names == ("t1", "t0")
    smaller = group.without("t0")
    assert smaller is not None
    assert smaller.names == ("t1",)
    assert StackedGroup(modules[:1]).without("t0") is None
    # Training the modules after building does not leak into the stacked copy.
    with torch.no_grad():
        for p in modules[0].parameters():
            p.add_(1.0)
    _assert_all_close(group(features, rows), before)


def test_group_checks_its_inputs() -> None:
    a = _tasks(1)[0]
    other = make_task(make_config("o", BACKBONE, bottleneck=2), make_norm(8))
    with pytest.raises(ValueError, match="stack_key"):
        StackedGroup([a, other])
    with pytest.raises(ValueError, match="duplicate"):
        StackedGroup([a, a])
    with pytest.raises(ValueError, match="at least one"):
        StackedGroup([])
    with pytest.raises(ValueError, match="row sets"):
        StackedGroup([a])(make_features(range(5), 2, 5, 8), [])


def test_strategy_choice() -> None:
    assert choose_strategy(1) == "loop"
    assert choose_strategy(4) == "stacked"
    assert StackedGroup(_tasks(1)).strategy == "loop"
    assert StackedGroup(_tasks(3)).strategy == "stacked"


def test_fanout_on_real_backbone_features() -> None:
    backbone = tiny_backbone_factory(1)
    norm = backbone.final_norm
    configs = [make_config(f"r{i}", backbone, layers=(1, 2)) for i in range(3)]
    configs.append(make_config("m", backbone, pooling="mean", layers=(2, 2)))
    modules = [make_task(c, norm, seed=i) for i, c in enumerate(configs)]
    fanout = GroupedFanout(modules)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = backbone.forward_features(images, fanout.feature_spec)
    rows = _rows([0, 1, 2], [2], [1, 0], [0, 2])
    _assert_all_close(fanout(features, rows), _one_at_a_time(modules, features, rows))

"""``restune train --search``: every candidate shape is trained on the same split and printed
with its validation score and serving cost; the artifact is the best one (tiny backbone)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from restuning.artifact_io import load_task
from restuning.backbone import TorchBackbone
from restuning.train.search import CANDIDATES, serving_cost
from restuning.tuners import init_task
from tests.fixtures.training_data import write_digit_folder
from tests.fixtures.tuners import make_config
from tests.restuning.test_training_cli import TINY, restune

LINE = re.compile(
    r"^search (\S+) +val accuracy ([0-9.]+), serving ([0-9.]+)x one forward at K=19, ", re.M
)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digit_folder(tmp_path_factory.mktemp("search-digits"), (3, 8), per_class=10)


def test_search_prints_every_candidate_and_keeps_the_best(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    out = tmp_path / "best.safetensors"
    done = restune(
        "train", "--data", str(digit_folder), "--name", "best", "--out", str(out), *TINY,
        "--epochs", "2", "--bottleneck", "4", "--search", "--quiet",
        "--cache-dir", str(tmp_path / "cache"), home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [(name, float(score), float(cost)) for name, score, cost in LINE.findall(done.stdout)]
    assert [name for name, _, _ in rows] == [c.name for c in CANDIDATES]
    assert all(cost > 0 for _, _, cost in rows)
    kept = re.search(r"^search: keeping (\S+)$", done.stdout, re.M)
    assert kept is not None
    best_score = max(score for _, score, _ in rows)
    # The first candidate reaching the best score wins (the cheaper one on a tie).
    assert kept.group(1) == next(name for name, score, _ in rows if score == best_score)
    candidate = next(c for c in CANDIDATES if c.name == kept.group(1))
    config = load_task(out.read_bytes(), tiny_backbone.final_norm).config
    assert config.bypass.tuner == candidate.tuner
    assert config.pooling == candidate.pooling
    assert config.training.val_score == pytest.approx(best_score, abs=1e-4)


def test_serving_cost_is_measured_for_cls_and_all_token_tasks(
    tiny_backbone: TorchBackbone,
) -> None:
    costs = {}
    for pooling in ("cls", "mean"):
        config = make_config(
            f"cost-{pooling}",
            tiny_backbone,
            labels=["a", "b"],
            layers=(1, tiny_backbone.depth),
            pooling=pooling,  # type: ignore[arg-type]
        )
        module = init_task(config, tiny_backbone.final_norm, seed=0)
        costs[pooling] = serving_cost(tiny_backbone, module, tasks=4, batch=2, repeats=1)
    assert costs["cls"] > 0
    assert costs["mean"] > 0
    with pytest.raises(ValueError, match="out of range"):
        serving_cost(tiny_backbone, module, tasks=0)


def test_default_layers_are_the_last_blocks_and_all_means_every_block() -> None:
    from restuning.cli import DEFAULT_TOP_LAYERS, _parse_layers

    assert _parse_layers(None, 12) == (12 - DEFAULT_TOP_LAYERS + 1, 12)
    assert _parse_layers(None, 2) == (1, 2)
    assert _parse_layers("all", 12) is None
    assert _parse_layers("3-5", 12) == (3, 5)
    with pytest.raises(ValueError, match="FIRST-LAST"):
        _parse_layers("last", 12)

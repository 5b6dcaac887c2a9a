"""Demo tuners trained at first start from images that ship offline with scikit-learn/-image.

``restune serve --demo`` (``RESTUNE_DEMO=true``) registers these into an empty store, so the
playground has real tasks on the real default backbone without any download. All tasks read
the same CLS-row features (every layer), so each image goes through the backbone once and the
features are cached: a second start (or a retrain) skips the backbone entirely.

Run it by hand (prints each task's validation score and the time taken)::

    python -m restuning.demo [--out DIR] [--per-class N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from restuning.artifact_io import save_task
from restuning.features import FeatureSpec
from restuning.preprocess import PreprocessMode
from restuning.train.api import TaskOptions, train_task
from restuning.train.demo_data import load_demo
from restuning.train.feature_cache import FeatureBackbone, FeatureCache
from restuning.train.loop import TrainOptions
from restuning.train.progress import Progress, Reporter

DIGITS_PER_CLASS = 100
"""Digits kept per class by default: 1,000 of the 1,797 bound the first-start backbone time."""


@dataclass(frozen=True)
class DemoTask:
    """One demo tuner: its name, the built-in set it learns, how it is described."""

    name: str
    """Tuner name (what clients ask for)."""
    dataset: str
    """Built-in set (``restuning.train.demo_data.DEMO_SETS``)."""
    description: str
    per_class: int | None = None
    """Images per class (None: all of the set)."""
    epochs: int = 30


def demo_tasks() -> list[DemoTask]:
    """The demo tuners, in registration order."""
    return [
        DemoTask(
            "digit",
            "digits",
            "Handwritten digit 0-9 (dark ink on light paper; trained on scikit-learn digits).",
            per_class=DIGITS_PER_CLASS,
        ),
        DemoTask(
            "parity",
            "parity",
            "Is the handwritten digit even or odd?",
            per_class=DIGITS_PER_CLASS,
        ),
        DemoTask(
            "digit-props",
            "digit-props",
            "Properties of a handwritten digit: even, prime, square, five-plus (multilabel).",
            per_class=DIGITS_PER_CLASS,
        ),
        DemoTask(
            "face",
            "faces",
            "Is this grey close-up a face? (scikit-image lfw_subset)",
        ),
        DemoTask(
            "texture",
            "textures",
            "Brick, grass or gravel texture (crops of scikit-image photos).",
        ),
    ]


def demo_spec(backbone: FeatureBackbone) -> FeatureSpec:
    """The features every demo task reads: CLS rows of x_0..x_L."""
    return FeatureSpec(tuple(range(backbone.depth + 1)), "cls")


def train_demo_artifacts(
    backbone: FeatureBackbone,
    cache_dir: Path | None,
    progress: Progress = True,
    *,
    per_class: int | None = None,
    epochs: int | None = None,
    tasks: Sequence[DemoTask] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_trained: Callable[[str, bytes], None] | None = None,
    preprocess: PreprocessMode = "exact",
) -> list[tuple[str, bytes]]:
    """Train every demo task on ``backbone``; returns ``(name, artifact bytes)`` pairs.

    ``per_class`` / ``epochs`` override every task's (quick runs and tests). Features are
    cached under ``cache_dir`` (None: in memory, for this call only). ``on_trained`` gets each
    artifact as soon as its task is trained, before the next one starts (the server registers
    it there, so the first demo task answers minutes before the last is trained).
    ``preprocess``: the server's mode, so the demo tuners learn from the pixels they serve.
    """
    reporter = Reporter(progress, should_stop)
    cache = FeatureCache(cache_dir, backbone, demo_spec(backbone), preprocess=preprocess)
    artifacts: list[tuple[str, bytes]] = []
    for task in tasks if tasks is not None else demo_tasks():
        reporter.check()
        data = load_demo(task.dataset, per_class if per_class is not None else task.per_class)
        trained = train_task(
            data,
            task.name,
            backbone,
            task=TaskOptions(description=task.description),
            options=TrainOptions(epochs=epochs or task.epochs),
            cache=cache,
            progress=progress,
            should_stop=should_stop,
        )
        artifact = save_task(trained.module)
        if on_trained is not None:
            on_trained(task.name, artifact)
        artifacts.append((task.name, artifact))
    return artifacts


def main(argv: Sequence[str] | None = None) -> int:
    """Train the demo tuners on the embedded default backbone and report their scores."""
    from restuning.artifact_io import load_task
    from restuning.backbone import load_backbone
    from restuning.embedded import default_backbone, restune_home

    parser = argparse.ArgumentParser(prog="python -m restuning.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="write NAME.safetensors here")
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $RESTUNE_HOME/features"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    backbone = load_backbone(*default_backbone())
    cache_dir = args.cache_dir or restune_home() / "features"
    artifacts = train_demo_artifacts(
        backbone, cache_dir, True, per_class=args.per_class, epochs=args.epochs
    )
    for name, data in artifacts:
        training = load_task(data, backbone.final_norm).config.training
        print(
            f"{name:12s} {training.val_metric} {training.val_score:.4f}  "
            f"({training.train_size} train / {training.val_size} val, {len(data)} bytes)"
        )
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.safetensors").write_bytes(data)
    print(f"total {time.perf_counter() - started:.1f} s (backbone {backbone.arch})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost of bypass tasks relative to one backbone forward (issue 2).

ViT-S/16 at 224 px (random weights: timing only), res_adapter on all 12 layers, r = 32,
100 classes. Measures, each as a multiple of one plain backbone forward at the same batch:

- one task on all-token features (a mean-pooled task) vs on CLS rows only (a CLS task);
- the fan-out of K CLS tasks of one shape, stacked (batched ops over a task axis) vs a Python
  loop over the per-task modules, at batch 1 and 8, K = 1, 4, 19, 64;
- the stacked fan-out of K all-token tasks at batch 8;
- the one-off cost of building a stacked group (what hot registration pays, off the request
  path);
- 19 CLS tasks with VTAB-1k's class counts (2 to 397) beside 19 alike heads (100 classes),
  at batch 1 and 8: grouped by the whole shape (head kind and class count: 15 groups) as the
  engine grouped before, and in one stack with the heads padded to the widest or run one
  matmul per task (``--heads`` runs only this part).

Run: ``python -m bench.fanout_cost [--quick] [--threads 1 --clock cpu]``, which writes
``bench/results/fanout_cost.json``. Times are the best of several repeats, in milliseconds,
on whatever device torch uses here (CPU unless ``--device cuda``); compare ratios, not
absolute times, across machines. On a busy shared machine, ``--threads 1 --clock cpu``
measures the work itself (process CPU time) rather than the neighbours' load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from restuning.backbone import TorchBackbone, load_backbone
from restuning.fanout import StackedGroup
from restuning.features import FeatureSpec
from restuning.tuners import TaskModule, init_task
from tuners_store.config import BackboneRef, BypassConfig, Pooling, TunerConfig

ARCH = "vit_small_patch16_224"
BOTTLENECK = 32
CLASSES = 100
RESULTS = Path(__file__).resolve().parent / "results" / "fanout_cost.json"
VTAB_1K_CLASSES: dict[str, int] = {
    "caltech101": 102,
    "cifar100": 100,
    "dtd": 47,
    "flowers102": 102,
    "pets": 37,
    "svhn": 10,
    "sun397": 397,
    "camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti_dist": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}
"""The 19 VTAB-1k tasks' class counts: a real mix of heads on one bypass shape."""


@dataclass(frozen=True)
class Timer:
    """Best (minimum) time of a call in ms, after one warm-up call.

    The minimum, not the median: on a shared machine other processes only ever add time,
    and both sides of every ratio are measured the same way. ``clock="cpu"`` counts this
    process's CPU time instead of wall time: with one thread it is the work itself, untouched
    by other processes' load (on a GPU, use wall time).
    """

    device: torch.device
    min_repeats: int
    min_seconds: float
    clock: Literal["wall", "cpu"] = "wall"

    def ms(self, fn: Callable[[], object]) -> float:
        """Time ``fn`` at least ``min_repeats`` times and for at least ``min_seconds``."""
        fn()
        self._sync()
        now = time.process_time if self.clock == "cpu" else time.perf_counter
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < self.min_repeats or time.perf_counter() - started < self.min_seconds:
            t0 = now()
            fn()
            self._sync()
            times.append((now() - t0) * 1000.0)
        return min(times)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _config(
    name: str, backbone: TorchBackbone, pooling: Pooling, classes: int = CLASSES
) -> TunerConfig:
    return TunerConfig(
        name=name,
        task="classification",
        labels=tuple(f"class{i}" for i in range(classes)),
        backbone=BackboneRef(
            arch=backbone.arch,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            depth=backbone.depth,
        ),
        bypass=BypassConfig(layers=(1, backbone.depth), bottleneck=BOTTLENECK),
        pooling=pooling,
    )


def _tasks(backbone: TorchBackbone, k: int, pooling: Pooling) -> list[TaskModule]:
    return [
        init_task(_config(f"{pooling}{i}", backbone, pooling), backbone.final_norm, seed=i)
        for i in range(k)
    ]


def run(
    quick: bool = False,
    device: str = "cpu",
    arch: str = ARCH,
    clock: Literal["wall", "cpu"] = "wall",
) -> dict[str, Any]:
    """Measure and return the report (see the module docstring); ``quick`` trims the grid.

    ``arch`` is any preset (tests use ``vit_test_tiny``); the tuners span all its blocks.
    """
    dev = torch.device(device)
    batches = (1, 8)
    task_counts = (1, 4) if quick else (1, 4, 19, 64)
    all_token_counts = (1, 4) if quick else (1, 4, 19, 64)
    timer = Timer(dev, 3 if quick else 7, 0.05 if quick else 1.0, clock)

    backbone = load_backbone(arch, "random:0", device=dev)
    _, height, width = backbone.data_config.input_size
    cls_tasks = _tasks(backbone, max(task_counts), "cls")
    mean_tasks = _tasks(backbone, max(all_token_counts), "mean")
    gen = torch.Generator().manual_seed(0)

    report: dict[str, Any] = {
        "arch": arch,
        "weights": "random:0",
        "tuner": {"kind": "res_adapter", "layers": [1, backbone.depth], "r": BOTTLENECK},
        "classes": CLASSES,
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "quick": quick,
        "clock": clock,
        "unit": "ms (best of repeats); x = multiple of one plain backbone forward at that batch",
        "backbone": {},
        "one_task": {},
        "fanout_cls": [],
        "fanout_all_tokens": [],
        "build_ms": {},
    }
    with torch.inference_mode():
        for batch in batches:
            images = torch.randn(batch, 3, height, width, generator=gen).to(dev)
            _measure_batch(
                report,
                timer,
                backbone,
                images,
                cls_tasks,
                mean_tasks,
                task_counts,
                all_token_counts,
            )
        k_max = len(cls_tasks)
        build = Timer(dev, 3, 0.0, clock)
        report["build_ms"][str(k_max)] = build.ms(partial(StackedGroup, cls_tasks, "stacked"))
    alike = _tasks(backbone, len(VTAB_1K_CLASSES), "cls")
    report["fanout_heads"] = _heads_rows(backbone, timer, alike)
    return report


def run_heads(
    quick: bool = False,
    device: str = "cpu",
    arch: str = ARCH,
    clock: Literal["wall", "cpu"] = "wall",
) -> dict[str, Any]:
    """Only the VTAB-1k heads part (see the module docstring)."""
    dev = torch.device(device)
    timer = Timer(dev, 3 if quick else 7, 0.05 if quick else 1.0, clock)
    backbone = load_backbone(arch, "random:0", device=dev)
    alike = _tasks(backbone, len(VTAB_1K_CLASSES), "cls")
    return {
        "arch": arch,
        "weights": "random:0",
        "tuner": {"kind": "res_adapter", "layers": [1, backbone.depth], "r": BOTTLENECK},
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "quick": quick,
        "clock": clock,
        "unit": "ms (best of repeats)",
        "fanout_heads": _heads_rows(backbone, timer, alike),
    }


def _heads_rows(
    backbone: TorchBackbone, timer: Timer, alike: list[TaskModule]
) -> list[dict[str, Any]]:
    """19 VTAB-1k heads vs 19 alike heads, every task on every row, at batch 1 and 8."""
    vtab = [
        init_task(_config(name, backbone, "cls", classes), backbone.final_norm, seed=i)
        for i, (name, classes) in enumerate(VTAB_1K_CLASSES.items())
    ]
    by_width: dict[int, list[TaskModule]] = {}
    for m in vtab:
        by_width.setdefault(m.config.num_outputs, []).append(m)
    # As the engine grouped by the whole shape: one group per class count (auto strategy).
    per_shape = [StackedGroup(ms) for ms in by_width.values()]
    padded = StackedGroup(vtab, "stacked", heads="padded")
    segmented = StackedGroup(vtab, "stacked", heads="segmented")
    chosen = StackedGroup(vtab, "stacked")
    alike_group = StackedGroup(alike, "stacked")
    layers = tuple(range(backbone.depth + 1))
    spec = FeatureSpec(layers, "cls")
    _, height, width = backbone.data_config.input_size
    gen = torch.Generator().manual_seed(1)
    rows_out: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch in (1, 8):
            images = torch.randn(batch, 3, height, width, generator=gen).to(timer.device)
            feats = backbone.forward_features(images, spec)  # (13, B, 1, D)
            every = [torch.arange(batch, device=images.device)] * len(vtab)

            def by_shape(feats: Any = feats, every: list[torch.Tensor] = every) -> None:
                start = 0
                for g in per_shape:
                    g(feats, every[start : start + len(g.modules)])
                    start += len(g.modules)

            rows_out.append(
                {
                    "batch": batch,
                    "K": len(vtab),
                    "alike_ms": timer.ms(partial(alike_group, feats, every)),
                    "vtab_per_shape_groups_ms": timer.ms(by_shape),
                    "vtab_padded_ms": timer.ms(partial(padded, feats, every)),
                    "vtab_segmented_ms": timer.ms(partial(segmented, feats, every)),
                    "vtab_chosen_ms": timer.ms(partial(chosen, feats, every)),
                    "vtab_chosen_layout": chosen.head_layout,
                    "per_shape_groups": len(per_shape),
                    "padding_x": len(vtab) * max(by_width) / sum(VTAB_1K_CLASSES.values()),
                }
            )
    return rows_out


def _measure_batch(
    report: dict[str, Any],
    timer: Timer,
    backbone: TorchBackbone,
    images: torch.Tensor,
    cls_tasks: list[TaskModule],
    mean_tasks: list[TaskModule],
    task_counts: tuple[int, ...],
    all_token_counts: tuple[int, ...],
) -> None:
    """Every cell of one batch size, appended to ``report``."""
    batch = int(images.shape[0])
    layers = tuple(range(backbone.depth + 1))
    cls_spec, all_spec = FeatureSpec(layers, "cls"), FeatureSpec(layers, "all")
    forward_ms = timer.ms(partial(backbone.model, images))
    capture_cls_ms = timer.ms(partial(backbone.forward_features, images, cls_spec))
    cell: dict[str, float] = {"forward_ms": forward_ms, "capture_all_layers_cls_ms": capture_cls_ms}
    report["backbone"][str(batch)] = cell
    cls_feats = backbone.forward_features(images, cls_spec)  # (13, B, 1, D)
    every = torch.arange(batch, device=images.device)

    if batch == 8:
        all_feats = backbone.forward_features(images, all_spec)  # (13, B, N, D)
        cell["capture_all_layers_all_tokens_ms"] = timer.ms(
            partial(backbone.forward_features, images, all_spec)
        )
        all_ms = timer.ms(partial(mean_tasks[0], all_feats))
        cls_ms = timer.ms(partial(cls_tasks[0], cls_feats))
        report["one_task"] = {
            "batch": batch,
            "all_tokens_ms": all_ms,
            "cls_only_ms": cls_ms,
            "all_tokens_x": all_ms / forward_ms,
            "cls_only_x": cls_ms / forward_ms,
            "all_over_cls": all_ms / cls_ms,
        }
        for k in all_token_counts:
            group = StackedGroup(mean_tasks[:k], "stacked")
            ms = timer.ms(partial(group, all_feats, [every] * k))
            report["fanout_all_tokens"].append(
                {"batch": batch, "K": k, "stacked_ms": ms, "stacked_x": ms / forward_ms}
            )

    for k in task_counts:
        rows = [every] * k
        stacked_ms = timer.ms(partial(StackedGroup(cls_tasks[:k], "stacked"), cls_feats, rows))
        loop_ms = timer.ms(partial(StackedGroup(cls_tasks[:k], "loop"), cls_feats, rows))
        report["fanout_cls"].append(
            {
                "batch": batch,
                "K": k,
                "stacked_ms": stacked_ms,
                "loop_ms": loop_ms,
                "stacked_x": stacked_ms / forward_ms,
                "loop_x": loop_ms / forward_ms,
                "capture_plus_stacked_x": (capture_cls_ms + stacked_ms) / forward_ms,
                "stacked_per_task_ms": stacked_ms / k,
            }
        )


def _print(report: dict[str, Any]) -> None:
    for batch, b in report["backbone"].items():
        print(f"backbone batch {batch}: forward {b['forward_ms']:.1f} ms")
    t = report["one_task"]
    print(
        f"one task, batch 8: all tokens {t['all_tokens_ms']:.2f} ms ({t['all_tokens_x']:.3f}x), "
        f"CLS only {t['cls_only_ms']:.3f} ms ({t['cls_only_x']:.4f}x)"
    )
    print("CLS fan-out   batch  K   stacked ms (x)        loop ms (x)")
    for r in report["fanout_cls"]:
        print(
            f"              {r['batch']:>5} {r['K']:>3}  "
            f"{r['stacked_ms']:8.2f} ({r['stacked_x']:.3f})"
            f"   {r['loop_ms']:8.2f} ({r['loop_x']:.3f})"
        )
    for r in report["fanout_all_tokens"]:
        print(
            f"all-token fan-out batch {r['batch']} K {r['K']}: "
            f"{r['stacked_ms']:.1f} ms ({r['stacked_x']:.3f}x)"
        )
    print(f"build stacked group: {report['build_ms']}")
    _print_heads(report)


def _print_heads(report: dict[str, Any]) -> None:
    print("19 heads      batch  alike   VTAB: per-shape groups  padded  segmented  (chosen)")
    for r in report.get("fanout_heads", []):
        print(
            f"              {r['batch']:>5} {r['alike_ms']:7.2f}   "
            f"{r['vtab_per_shape_groups_ms']:7.2f} ({r['per_shape_groups']})"
            f"        {r['vtab_padded_ms']:7.2f} {r['vtab_segmented_ms']:8.2f}"
            f"   {r['vtab_chosen_layout']}"
        )


def main() -> None:
    """CLI: run, print a summary and write ``bench/results/fanout_cost.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid, fewer repeats")
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time"
    )
    parser.add_argument("--heads", action="store_true", help="only the VTAB-1k heads part")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads > 0:
        # One thread is steadier on a busy shared machine (no OpenMP barrier waits).
        torch.set_num_threads(args.threads)
    if args.heads:
        report = run_heads(args.quick, args.device, clock=args.clock)
        _print_heads(report)
        args.out = args.out or RESULTS.with_name("fanout_heads.json")
    else:
        report = run(args.quick, args.device, clock=args.clock)
        _print(report)
        args.out = args.out or RESULTS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""What one failing tuner costs the healthy tasks of its batch, with and without quarantine.

K CLS tasks of one shape share a stacked group; a (K+1)-th of the same shape is broken: its
head is one class wider than its config says, so stacking it raises and alone it answers the
wrong shape. The engine's fan-out is timed on cached features (the backbone forward is the
same in every case and would only blur the comparison) in three cases, interleaved round by
round:

- ``healthy``: the K tasks alone, one stacked group;
- ``quarantined``: K + the failing task once it is known: the K run stacked, the culprit runs
  alone and fails (the engine's steady state after the first failure);
- ``no_breaker``: K + the failing task with the quarantine cleared before every batch: each
  batch pays the failed stacked attempt, every task alone (to find the culprit), and the
  healthy group again.

Plus one backbone forward at the same batch, the unit the fan-out costs are quoted in.

Run: ``python -m bench.isolation_cost [--quick] [--arch vit_test_tiny]`` (one torch thread,
process CPU time: the work itself, whatever else loads the machine); writes
``bench/results/isolation_cost.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.timing import interleaved, median_ratio, once_ms
from restuning.backbone import load_backbone
from restuning.features import FeatureSpec
from restuning.tuners import init_task
from server.engine.engine import BatchItem, Engine
from server.engine.feature_cache import FeatureCache
from server.engine.loaded_tuner import LoadedTuner, module_nbytes
from server.engine.runtime import TorchRuntime
from tuners_store.config import BackboneRef, BypassConfig, TunerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "isolation_cost.json"
BATCH = 8
BOTTLENECK = 32
CLASSES = 100


def _tuner(name: str, backbone: Any, seed: int) -> LoadedTuner:
    config = TunerConfig(
        name=name,
        task="classification",
        labels=tuple(f"c{i}" for i in range(CLASSES)),
        backbone=BackboneRef(
            arch=backbone.arch,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            depth=backbone.depth,
        ),
        bypass=BypassConfig(layers=(1, backbone.depth), bottleneck=BOTTLENECK),
        pooling="cls",
    )
    module = init_task(config, backbone.final_norm, seed=seed)
    digest = hashlib.sha256(name.encode()).hexdigest()
    return LoadedTuner(name, 1, digest, config, module, module_nbytes(module))


def run(arch: str, tasks: int, rounds: int) -> dict[str, Any]:
    backbone = load_backbone(arch, "random:0")
    runtime = TorchRuntime(backbone)
    healthy = [_tuner(f"t{i:02d}", backbone, i) for i in range(tasks)]
    broken = _tuner("zz_broken", backbone, 99)
    broken.module.head = nn.Linear(backbone.dim, CLASSES + 1)  # cannot stack; answers (B, C+1)
    _, height, width = backbone.data_config.input_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(BATCH, 3, height, width, generator=gen)  # (B, 3, H, W)

    def items(tuners: list[LoadedTuner]) -> list[BatchItem]:
        return [BatchItem(pixels[i], f"img{i}", tuple(tuners), 1) for i in range(BATCH)]

    cache = FeatureCache(1 << 30)
    engines = {name: Engine(runtime, cache) for name in ("healthy", "quarantined", "no_breaker")}
    batches = {
        "healthy": items(healthy),
        "quarantined": items([*healthy, broken]),
        "no_breaker": items([*healthy, broken]),
    }
    for name, engine in engines.items():  # warm: features cached, groups built, culprit known
        engine.run_batch(batches[name])

    def no_breaker() -> None:
        engine = engines["no_breaker"]
        engine.forget_tuner(broken)  # forgets the quarantine (and no group holds it)
        engine.run_batch(batches["no_breaker"])

    candidates = {
        "healthy": lambda: engines["healthy"].run_batch(batches["healthy"]),
        "quarantined": lambda: engines["quarantined"].run_batch(batches["quarantined"]),
        "no_breaker": no_breaker,
    }
    times = interleaved(candidates, rounds=rounds, clock="cpu")
    spec = FeatureSpec(tuple(range(backbone.depth + 1)), "cls")
    forward = [once_ms(lambda: runtime.forward_features(pixels, spec), "cpu") for _ in range(3)]
    forward_ms = statistics.median(forward)
    report: dict[str, Any] = {
        "arch": arch,
        "batch": BATCH,
        "healthy_tasks": tasks,
        "threads": torch.get_num_threads(),
        "clock": "cpu",
        "backbone_forward_ms": round(forward_ms, 2),
        "fanout_ms": {k: round(statistics.median(v), 2) for k, v in times.items()},
        "vs_healthy": {k: round(median_ratio(v, times["healthy"]), 2) for k, v in times.items()},
        "in_backbone_forwards": {
            k: round(statistics.median(v) / forward_ms, 3) for k, v in times.items()
        },
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--tasks", type=int, default=19)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 9")
    args = parser.parse_args()
    torch.set_num_threads(1)  # with the CPU clock: the work itself, not the neighbours' load
    report = run(args.arch, args.tasks, 3 if args.quick else 9)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Eager float32 CPU throughput of the backbone at 224 px (issue 2).

For ViT-S/16 (AugReg) and ViT-S/14 (DINOv2, 518-native, served at 224 with a resampled
position grid), random weights, batch 1 and 8, ``torch.set_num_threads(2)``. Two paths:

- ``full``: every block and the final norm over all tokens (timm's ``forward_features``);
- ``capture_cls``: ``TorchBackbone.forward_features`` with layers 0..12, CLS rows only, the
  serving path of CLS-pooled bypasses (its last block runs for the CLS row alone).

The two paths run interleaved, round after round, so the machine's drift hits both alike;
medians over rounds. Also the single-thread process CPU time of each path, which a busy
shared machine distorts far less than wall time.
Run: ``python -m bench.backbone_eager [--quick]`` -> ``bench/results/backbone_eager.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.machine import machine_info
from bench.timing import interleaved, median_ratio
from restuning.backbone import TorchBackbone, load_backbone
from restuning.features import FeatureSpec

RESULTS = Path(__file__).resolve().parent / "results" / "backbone_eager.json"
ARCHS = ("vit_small_patch16_224", "vit_small_patch14_dinov2")
BATCHES = (1, 8)
THREADS = 2


def _measure(backbone: TorchBackbone, batch: int, rounds: int, cpu_repeats: int) -> dict[str, Any]:
    _, height, width = backbone.data_config.input_size
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    spec = FeatureSpec(tuple(range(backbone.depth + 1)), "cls")

    def full() -> object:
        with torch.inference_mode():
            return backbone.model(images)

    def capture_cls() -> object:
        return backbone.forward_features(images, spec)

    candidates = {"full": full, "capture_cls": capture_cls}
    for fn in candidates.values():  # warm-up (allocator, oneDNN kernels, pos-embed cache)
        fn()
    times = interleaved(candidates, rounds=rounds)
    row: dict[str, Any] = {"arch": backbone.arch, "input": f"{height}x{width}", "batch": batch}
    for name, samples in times.items():
        ms = statistics.median(samples)
        row[name] = {"ms_per_batch": round(ms, 2), "img_per_s": round(batch * 1e3 / ms, 1)}
    row["capture_cls_over_full"] = round(median_ratio(times["capture_cls"], times["full"]), 3)
    # On a shared, oversubscribed box the 2-thread wall clock mostly measures the neighbours
    # (threads wait at barriers for a descheduled peer). One thread's CPU time does not.
    torch.set_num_threads(1)
    try:
        row["cpu_time_1thread_ms"] = {
            name: round(statistics.median(_cpu_ms(fn) for _ in range(cpu_repeats)), 2)
            for name, fn in candidates.items()
        }
    finally:
        torch.set_num_threads(THREADS)
    return row


def _cpu_ms(fn: Callable[[], object]) -> float:
    """Process CPU time of one call, in ms."""
    started = time.process_time()
    fn()
    return (time.process_time() - started) * 1e3


def run(quick: bool = False) -> dict[str, Any]:
    """Measure every (arch, batch) for both paths; returns a JSON-able dict."""
    torch.set_num_threads(THREADS)
    rounds, cpu_repeats = (3, 2) if quick else (15, 5)
    rows = [
        _measure(load_backbone(arch, "random:0"), batch, rounds, cpu_repeats)
        for arch in ARCHS
        for batch in BATCHES
    ]
    return {
        "bench": "backbone_eager",
        "quick": quick,
        "dtype": "float32",
        "rounds": rounds,
        "machine": machine_info(threads=THREADS),
        "results": rows,
    }


def main() -> None:
    """CLI: run, print the JSON and write ``bench/results/backbone_eager.json``."""
    parser = argparse.ArgumentParser(description="Eager fp32 CPU backbone throughput")
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 15")
    args = parser.parse_args()
    result = run(quick=args.quick)
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()

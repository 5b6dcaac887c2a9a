"""Backbone runtimes on the CPU: torch eager vs ONNX Runtime float32 vs ONNX Runtime int8 (issue 5).

One run measures, on the same machine and minutes:

1. ``matmul_peak``: the machine's float32 matmul rate (torch, 2048 x 2048, on 2 threads and on
   1), at the start and at the end of the run, and in every timing round (a shared box
   drifts, and when it is oversubscribed 1 thread can outrun 2);
2. ``throughput``: for ViT-S/16 and ViT-B/16 (random weights, 224 px), batch 1 and 8, the
   serving path (CLS rows of layers 0..12) under each runtime (2 threads each; torch on 1
   thread as a control), in interleaved rounds: images/s, and the fraction of the same
   round's matmul peak reached, from the FLOPs of one image computed from the config
   (multiply-add = 2 FLOPs; the int8 rows count the same FLOPs against the float32 peak);
3. ``parity``: ONNX Runtime features vs torch on real photos (max abs and relative diff);
4. ``int8_accuracy``: what int8 does to answers. When the demo tasks exist
   (``restuning.demo``), each is trained on float32 torch features of the real DINOv2 backbone
   and its validation metric is recomputed on int8 features of the same images (the tuners a
   server holds were trained on float32 features). Otherwise, top-1 agreement of a nearest
   centroid on photos and feature cosine similarity. ``mode`` says which.

The decision (``int8_default``) is on only when every demo task's metric moves by at most
``INT8_MAX_DROP`` and int8 is faster.

Run: ``python -m bench.runtimes [--quick]`` -> ``bench/results/runtimes.json`` (quick mode writes
nothing unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.machine import machine_info
from bench.timing import interleaved, median_ratio, once_ms
from restuning.backbone import TorchBackbone, load_backbone
from restuning.features import FeatureSpec
from restuning.onnx_quant import cpu_has_vnni
from restuning.preprocess import preprocess_batch
from restuning.vit import ViTConfig
from server.engine.runtime_onnx import OnnxBackbone

RESULTS = Path(__file__).resolve().parent / "results" / "runtimes.json"
THREADS = 2
ARCHS = ("vit_small_patch16_224", "vit_base_patch16_224")
BATCHES = (1, 8)
INT8_MAX_DROP = 0.005
"""Largest drop of a demo task's validation metric (absolute, e.g. accuracy 0.5 points) for
int8 to be the default."""
PEAK = "matmul_peak"
RUNTIMES = ("torch", "torch_1thread", "onnx_fp32", "onnx_int8")
"""``torch_1thread`` is a control: on a loaded box torch's 2 OpenMP threads can lose more to
waiting on each other than they gain, which would flatter the other runtimes."""


# ---------------------------------------------------------------------------- FLOPs and peak


def flops_per_image(config: ViTConfig, height: int, width: int, *, cls_capture: bool) -> float:
    """Matmul FLOPs of one image (multiply-add = 2): patch embedding, then every block.

    With ``cls_capture`` the last block runs for the CLS row only (keys and values still for
    every token), as ``VisionTransformer.intermediates`` does for CLS-only capture.
    """
    d = config.embed_dim
    hidden = int(d * config.mlp_ratio)
    patches = (height // config.patch_size) * (width // config.patch_size)
    n = patches + config.num_prefix_tokens
    patch_embed = 2 * patches * (config.in_chans * config.patch_size**2) * d

    def block(queries: int) -> float:
        qkv = 2 * queries * d * d + 2 * n * d * 2 * d  # q for the queries, k and v for all
        attention = 2 * 2 * queries * n * d  # scores and the weighted sum of values
        out_proj = 2 * queries * d * d
        mlp = 2 * 2 * queries * d * hidden
        return qkv + attention + out_proj + mlp

    blocks = config.depth * block(n)
    if cls_capture:
        blocks += block(1) - block(n)
    return float(patch_embed + blocks)


class MatmulProbe:
    """One ``size`` x ``size`` float32 matmul on ``threads`` threads: the machine's peak."""

    def __init__(self, size: int, threads: int = THREADS) -> None:
        self.threads = threads
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(size, size, generator=gen)
        self.b = torch.randn(size, size, generator=gen)
        self.out = torch.empty(size, size)
        self.gflop = 2 * size**3 / 1e9

    def __call__(self) -> None:
        torch.set_num_threads(self.threads)
        try:
            torch.mm(self.a, self.b, out=self.out)
        finally:
            torch.set_num_threads(THREADS)

    def gflops(self, ms: float) -> float:
        """The rate of one call that took ``ms``."""
        return self.gflop / (ms / 1e3)


def peak_fraction(batch: int, gflop_per_image: float, ms: float, peak_gflops: float) -> float:
    """Share of ``peak_gflops`` reached by a batch of ``batch`` images that took ``ms``."""
    return batch * gflop_per_image / (ms / 1e3) / peak_gflops


def matmul_peak_gflops(probe: MatmulProbe, repeats: int) -> float:
    """Best GFLOP/s of ``repeats`` calls of ``probe`` after a warm-up."""
    probe()
    return max(probe.gflops(once_ms(probe)) for _ in range(repeats))


# ---------------------------------------------------------------------------- runtimes


def _photos(n: int, backbone: TorchBackbone, seed: int = 0) -> torch.Tensor:
    """(n, 3, H, W): crops of the colour photographs bundled with scikit-image."""
    import numpy as np
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        photo = sources[i % len(sources)]
        height, width = photo.shape[:2]
        side = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        images.append(Image.fromarray(photo[top : top + side, left : left + side, :3]))
    return preprocess_batch(images, backbone.data_config)


def _open_runtimes(
    backbone: TorchBackbone, cache_dir: Path
) -> tuple[OnnxBackbone, OnnxBackbone, dict[str, float]]:
    """float32 and int8 ONNX backbones of ``backbone`` (exported once, cached)."""
    started = time.perf_counter()
    fp32 = OnnxBackbone.from_torch(backbone, cache_dir, threads=THREADS)
    fp32_s = time.perf_counter() - started
    started = time.perf_counter()
    int8 = OnnxBackbone.from_torch(backbone, cache_dir, threads=THREADS, int8=True)
    return (
        fp32,
        int8,
        {"fp32_s": round(fp32_s, 1), "int8_s": round(time.perf_counter() - started, 1)},
    )


def _diff(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    abs_diff = float((got - want).abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(got, want, dim=-1).mean())
    return {
        "max_abs": abs_diff,
        "rel": abs_diff / float(want.abs().max()),
        "mean_cosine": round(cosine, 6),
    }


def measure_arch(
    arch: str,
    cache_dir: Path,
    probes: Sequence[MatmulProbe],
    *,
    batches: Sequence[int],
    rounds: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Throughput rows and parity of one preset under every runtime.

    ``probes`` run in every round next to the runtimes: each round's fraction of the peak
    divides by that round's best matmul rate (2 threads, or 1 when the box is so busy that
    one thread gets more done), so a machine whose speed drifts (other work on a shared box)
    still gives comparable fractions.
    """
    torch.set_num_threads(THREADS)
    backbone = load_backbone(arch, "random:0")
    fp32, int8, export_s = _open_runtimes(backbone, cache_dir)
    _, height, width = backbone.data_config.input_size
    spec = FeatureSpec(tuple(range(backbone.depth + 1)), "cls")
    gflop = flops_per_image(backbone.config, height, width, cls_capture=True) / 1e9

    def torch_one_thread(x: torch.Tensor) -> object:
        torch.set_num_threads(1)
        try:
            return backbone.forward_features(x, spec)
        finally:
            torch.set_num_threads(THREADS)

    runtimes: dict[str, Callable[[torch.Tensor], object]] = {
        "torch": lambda x: backbone.forward_features(x, spec),
        "torch_1thread": torch_one_thread,
        "onnx_fp32": lambda x: fp32.forward_features(x, spec),
        "onnx_int8": lambda x: int8.forward_features(x, spec),
    }
    photos = _photos(4, backbone)
    every = FeatureSpec(spec.layers, "all")
    want = backbone.forward_features(photos, every).data
    parity = {
        "arch": arch,
        "export_seconds": export_s,
        "onnx_fp32": _diff(fp32.forward_features(photos, every).data, want),
        "onnx_int8": _diff(int8.forward_features(photos, every).data, want),
    }
    rows = []
    for batch in batches:
        images = _photos(batch, backbone, seed=batch)
        for step in runtimes.values():
            step(images)  # warm-up: session arenas, thread pools, pos-embed cache
        candidates: dict[str, Callable[[], object]] = {
            n: functools.partial(step, images) for n, step in runtimes.items()
        }
        probe_runs = {f"{PEAK}_{p.threads}t": p for p in probes}
        times = interleaved({**candidates, **probe_runs}, rounds=rounds)
        peaks = [
            max(p.gflops(times[key][r]) for key, p in probe_runs.items()) for r in range(rounds)
        ]
        for name in RUNTIMES:
            ms = statistics.median(times[name])
            fractions = [
                peak_fraction(batch, gflop, t, peak)
                for t, peak in zip(times[name], peaks, strict=True)
            ]
            rows.append(
                {
                    "arch": arch,
                    "batch": batch,
                    "runtime": name,
                    "ms_per_batch": round(ms, 2),
                    "img_per_s": round(batch * 1e3 / ms, 2),
                    "gflop_per_image": float(f"{gflop:.4g}"),
                    "fraction_of_matmul_peak": float(f"{statistics.median(fractions):.3g}"),
                    "matmul_peak_gflops": round(statistics.median(peaks), 1),
                    "speedup_vs_torch": round(median_ratio(times["torch"], times[name]), 3),
                    "rounds": rounds,
                }
            )
    return rows, parity


# ---------------------------------------------------------------------------- int8 accuracy


def demo_accuracy(quick: bool, cache_dir: Path) -> dict[str, Any]:
    """Demo-task validation metrics with float32 vs int8 backbone features (real DINOv2)."""
    from restuning.demo import demo_spec, demo_tasks
    from restuning.embedded import default_backbone, restune_home
    from restuning.train.api import DEFAULT_VAL_FRACTION, train_task
    from restuning.train.data import split_indices
    from restuning.train.demo_data import load_demo
    from restuning.train.feature_cache import FeatureCache, compute_features
    from restuning.train.loop import TrainOptions, predict
    from restuning.train.metrics import PRIMARY_METRIC, evaluate

    torch.set_num_threads(THREADS)
    backbone = load_backbone(*default_backbone())
    int8 = OnnxBackbone.from_torch(backbone, cache_dir, threads=THREADS, int8=True)
    spec = demo_spec(backbone)
    # float32 on disk: the int8 features are compared with the unrounded float32 ones.
    cache = FeatureCache(restune_home() / "features", backbone, spec, store_dtype="float32")
    tasks = []
    for task in demo_tasks():
        per_class = 10 if quick else task.per_class
        data = load_demo(task.dataset, per_class)
        options = TrainOptions(epochs=3 if quick else task.epochs)
        trained = train_task(
            data, task.name, backbone, options=options, cache=cache, progress=False
        )
        _, val_idx = split_indices(data, DEFAULT_VAL_FRACTION, options.seed)
        refs = [data.images[i] for i in val_idx]
        targets = data.targets[torch.from_numpy(val_idx)]
        fp32_features = cache.features(refs)  # (L', n, 1, D)
        int8_features = compute_features(int8, refs, spec)
        metric = PRIMARY_METRIC[data.task]
        module_spec = trained.module.feature_spec
        scores = {}
        outputs = {}
        for name, feats in (("fp32", fp32_features), ("int8", int8_features)):
            selected = _select(spec, feats, module_spec)
            outputs[name] = predict(trained.module, module_spec, selected, 512)
            scores[name] = evaluate(data.task, outputs[name], targets)[metric]
        same_top1 = float((outputs["fp32"].argmax(-1) == outputs["int8"].argmax(-1)).float().mean())
        tasks.append(
            {
                "task": task.name,
                "kind": data.task,
                "metric": metric,
                "val_images": len(val_idx),
                "fp32": round(scores["fp32"], 4),
                "int8": round(scores["int8"], 4),
                "change": round(scores["int8"] - scores["fp32"], 4),
                "top1_agreement": round(same_top1, 4),
                "feature_cosine": _diff(int8_features, fp32_features)["mean_cosine"],
            }
        )
    return {
        "mode": "demo_tasks",
        "backbone": backbone.arch,
        "fingerprint": backbone.fingerprint,
        "tasks": tasks,
        "worst_change": min(t["change"] for t in tasks),
    }


def _select(spec: FeatureSpec, data: torch.Tensor, wanted: FeatureSpec) -> torch.Tensor:
    from restuning.features import Features

    return Features(spec, data).select(wanted).data


def photo_agreement(arch: str, cache_dir: Path) -> dict[str, Any]:
    """Without demo tasks: int8 vs float32 features of ``arch`` on real photos."""
    backbone = load_backbone(arch, "random:0")
    int8 = OnnxBackbone.from_torch(backbone, cache_dir, threads=THREADS, int8=True)
    spec = FeatureSpec(tuple(range(backbone.depth + 1)), "cls")
    photos = _photos(16, backbone, seed=7)
    want = backbone.forward_features(photos, spec).data  # (L', B, 1, D)
    got = int8.forward_features(photos, spec).data
    # Top-1 of a nearest-centroid classifier whose classes are the 4 source photos.
    last_w, last_g = want[-1, :, 0], got[-1, :, 0]  # (B, D)
    labels = torch.arange(photos.shape[0]) % 4
    centroids = torch.stack([last_w[labels == c].mean(0) for c in range(4)])
    top1_w = torch.cdist(last_w, centroids).argmin(-1)
    top1_g = torch.cdist(last_g, centroids).argmin(-1)
    return {
        "mode": "photo_features",
        "backbone": arch,
        "feature_cosine": _diff(got, want)["mean_cosine"],
        "top1_agreement": float((top1_w == top1_g).float().mean()),
        "worst_change": None,
    }


def _demo_available() -> bool:
    return importlib.util.find_spec("restuning.demo") is not None


# ---------------------------------------------------------------------------- the run


def run(
    quick: bool = False,
    *,
    archs: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    accuracy: bool = True,
) -> dict[str, Any]:
    """Measure everything once; returns a JSON-able dict (see the module docstring).

    ``quick``: small matmuls, 2 rounds and, unless ``archs`` says otherwise, the tiny test
    backbone (a smoke run). ``cache_dir``: where exports are cached (default
    ``$RESTUNE_HOME/onnx``).
    """
    from restuning.embedded import restune_home

    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    chosen = tuple(archs) if archs is not None else (("vit_test_tiny",) if quick else ARCHS)
    cache = cache_dir or restune_home() / "onnx"
    size, repeats, rounds = (512, 3, 2) if quick else (2048, 10, 7)
    probes = [MatmulProbe(size, THREADS), MatmulProbe(size, 1)]
    peak_before = {p.threads: matmul_peak_gflops(p, repeats) for p in probes}
    rows: list[dict[str, Any]] = []
    parity = []
    for arch in chosen:
        arch_rows, arch_parity = measure_arch(arch, cache, probes, batches=BATCHES, rounds=rounds)
        rows += arch_rows
        parity.append(arch_parity)
    peak_after = {p.threads: matmul_peak_gflops(p, repeats) for p in probes}
    acc: dict[str, Any] | None = None
    if accuracy:
        if not quick and _demo_available():
            acc = demo_accuracy(quick, cache)
        else:
            acc = photo_agreement(chosen[0], cache)
    int8_rows = [r for r in rows if r["runtime"] == "onnx_int8"]
    faster = bool(int8_rows) and all(r["speedup_vs_torch"] > 1.0 for r in int8_rows)
    worst = acc.get("worst_change") if acc else None
    negligible = worst is not None and worst >= -INT8_MAX_DROP
    return {
        "benchmark": "runtimes",
        "machine": machine_info(THREADS),
        "avx512_vnni": cpu_has_vnni(),
        "threads": THREADS,
        "matmul_peak_gflops": {
            "size": size,
            "before": {f"{t}_threads": round(v, 1) for t, v in peak_before.items()},
            "after": {f"{t}_threads": round(v, 1) for t, v in peak_after.items()},
        },
        "throughput": rows,
        "parity": parity,
        "int8_accuracy": acc,
        "int8_default": negligible and faster,
        "int8_rule": (
            f"on by default only if every demo task's metric drops by <= {INT8_MAX_DROP} "
            "and int8 is faster than torch at every measured batch"
        ),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    """CLI: run, print the JSON and write ``bench/results/runtimes.json``."""
    parser = argparse.ArgumentParser(description="torch vs ONNX Runtime fp32/int8 on the CPU")
    parser.add_argument("--quick", action="store_true", help="tiny model, a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-accuracy", action="store_true", help="skip the int8 accuracy part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(
            quick=args.quick,
            cache_dir=Path(tmp) if args.quick else None,
            accuracy=not args.no_accuracy,
        )
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()

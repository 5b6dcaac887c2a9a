"""The GPU engine measured on one CUDA device, as one prepared script (< 8 minutes on an H200).

ViT-B/16 at 224 px in bf16, random weights (timing only), CLS-pooled res_adapter tasks
(r = 32 on all 12 layers, 100 classes). Sections, every ratio taken within this run:

1. ``backbone``: one plain forward (all tokens, all blocks, final norm) eager vs replayed from a
   CUDA graph at batch 1, 8, 64, 512. The graphed time is the unit of the next section.
2. ``engine``: one engine step (CLS capture + every task's bypass + heads, one CUDA graph plan
   as the server replays it, plus the one device-to-host copy of the outputs) at K = 1, 19,
   64, 256 tasks and batch 1, 8, 64, as a multiple of one plain graphed forward at that batch
   (GPU time, CUDA events). At batch 64 with K = 64 and 256 both fan-out implementations
   (batched matmuls and the grouped Triton kernel) are measured side by side.
3. ``server``: ``restune serve`` on this GPU under a local load generator (several JPEGs per
   request, 19 tasks per image) next to the engine alone (``GpuEngine.run_batch`` with answers,
   same batch) on the same pixels: ``end_to_end / engine``.
4. ``decode``: JPEG decode + preprocess, PIL in a thread pool vs nvJPEG batches on the GPU.
5. ``parity``: GPU bf16 outputs vs CPU float32 outputs of the same tasks and images, and one
   image alone vs inside a full bucket.

Run on a lent GPU machine: see docs/GPU.md (wheels for the server section travel with the
tree). ``--cpu-smoke`` runs every section but the server on the tiny preset on the CPU in
seconds (the test suite does). Writes ``bench/results/gpu-<device>.json`` after every section
(a section that fails is recorded under ``errors`` and the next one runs) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from restuning.artifact_io import save_task
from restuning.backbone import TorchBackbone, load_backbone
from restuning.preprocess import preprocess
from restuning.tuners import TaskModule
from server.engine.cuda_graphs import (
    CudaGraphPlan,
    DensePlan,
    PlanFactory,
    graph_key,
    group_tuners,
)
from server.engine.decode import decode_image
from server.engine.engine import BatchItem, Engine
from server.engine.feature_cache import FeatureCache
from server.engine.gpu_engine import GpuEngine
from server.engine.loaded_tuner import LoadedTuner, module_nbytes
from server.engine.runtime import TorchRuntime
from tuners_store.config import BackboneRef, BypassConfig, TunerConfig

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = 100
BOTTLENECK = 32
SERVER_TASKS = 19
ADMIN_TOKEN = "bench-gpu-admin-token-0123456789"
GOALS = {
    "engine_b64_k19_max": 1.05,
    "engine_b64_k64_max": 1.08,
    "engine_b64_k256_max": 1.15,
    "engine_b1_k19_max_ms": 1.0,
    "server_over_engine_min": 0.8,
}


@dataclass(frozen=True)
class Preset:
    """What one run measures."""

    arch: str
    device: torch.device
    dtype: torch.dtype
    backbone_batches: tuple[int, ...]
    engine_tasks: tuple[int, ...]
    engine_batches: tuple[int, ...]
    repeats: int
    server: bool


FULL = Preset(
    "vit_base_patch16_224",
    torch.device("cuda"),
    torch.bfloat16,
    (1, 8, 64, 512),
    (1, 19, 64, 256),
    (1, 8, 64),
    repeats=30,
    server=True,
)
SMOKE = Preset(
    "vit_test_tiny",
    torch.device("cpu"),
    torch.float32,
    (1, 2),
    (1, 3),
    (1, 2),
    repeats=2,
    server=False,
)


# --- timing ---------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median time of ``fn`` in ms after two warm-up calls: CUDA events on a GPU, else wall."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            fn()
            end.record()
            end.synchronize()  # type: ignore[no-untyped-call]
            samples.append(float(start.elapsed_time(end)))  # type: ignore[no-untyped-call]
        else:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)


def graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (warm-up on a side stream first); eager off CUDA."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# --- tasks ----------------------------------------------------------------------------------


def task_config(backbone: TorchBackbone, name: str) -> TunerConfig:
    """A CLS-pooled res_adapter classification task on every block."""
    return TunerConfig(
        name=name,
        task="classification",
        labels=tuple(f"class{i}" for i in range(CLASSES)),
        backbone=BackboneRef(
            arch=backbone.arch,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            depth=backbone.depth,
        ),
        bypass=BypassConfig(layers=(1, backbone.depth), bottleneck=BOTTLENECK),
        pooling="cls",
    )


def make_tuners(backbone: TorchBackbone, count: int, device: torch.device) -> list[LoadedTuner]:
    """``count`` tasks with seeded random weights on ``device`` (float32, as the registry)."""
    out = []
    for i in range(count):
        config = task_config(backbone, f"task{i:03d}")
        # float32 on the device, as the registry builds them (the final norm's copy too).
        module = TaskModule(config, backbone.final_norm).to(device=device, dtype=torch.float32)
        generator = torch.Generator(device=device).manual_seed(i)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.05, generator=generator)
        sha = hashlib.sha256(f"bench-{i}".encode()).hexdigest()
        out.append(LoadedTuner(config.name, 1, sha, config, module.eval(), module_nbytes(module)))
    return out


def sample_jpegs(count: int, side: int = 256) -> list[bytes]:
    """JPEG crops of scikit-learn's sample photos (the server bench's images)."""
    from bench.server_throughput import sample_jpegs as jpegs

    return jpegs(count, side=side)


def pixels_of(backbone: TorchBackbone, jpegs: list[bytes]) -> list[torch.Tensor]:
    """Decoded and preprocessed images (3, H, W) float32 on the host."""
    return [
        preprocess(decode_image(j, i, max_bytes=1 << 24, max_pixels=1 << 26), backbone.data_config)
        for i, j in enumerate(jpegs)
    ]


# --- sections -------------------------------------------------------------------------------


def backbone_section(preset: Preset, backbone: TorchBackbone) -> dict[int, dict[str, float]]:
    """Plain forward eager vs graphed per batch; returns ms by batch."""
    rows: dict[int, dict[str, float]] = {}
    _, h, w = backbone.data_config.input_size
    for batch in preset.backbone_batches:
        images = torch.randn(batch, 3, h, w, device=preset.device, dtype=preset.dtype)

        def forward(images: torch.Tensor = images) -> torch.Tensor:
            with torch.inference_mode():
                out: torch.Tensor = backbone.model(images)
                return out

        eager = time_ms(forward, preset.device, preset.repeats)
        replay = time_ms(graphed(forward, preset.device), preset.device, preset.repeats)
        rows[batch] = {
            "eager_ms": round(eager, 3),
            "graphed_ms": round(replay, 3),
            "graphed_images_per_s": round(batch / replay * 1e3, 1),
        }
        print(f"backbone b={batch}: eager {eager:.3f} ms, graphed {replay:.3f} ms", flush=True)
    return rows


def engine_section(
    preset: Preset,
    backbone: TorchBackbone,
    plain_ms: dict[int, float],
    tuners: list[LoadedTuner],
) -> list[dict[str, Any]]:
    """One plan step per (K, batch) as a multiple of one plain graphed forward."""
    rows = []
    _, h, w = backbone.data_config.input_size
    pinned = preset.device.type == "cuda"
    for k in preset.engine_tasks:
        groups = group_tuners(tuners[:k])
        for batch in preset.engine_batches:
            impls = ["auto"]
            if batch == max(preset.engine_batches) and k >= 64:
                impls = ["off", "on"]
            for setting in impls:
                factory = PlanFactory(
                    backbone.forward_features,
                    (3, h, w),
                    preset.device,
                    preset.dtype,
                    setting,  # type: ignore[arg-type]
                )
                plan = factory(graph_key(batch, groups), groups)
                pixels = torch.randn(batch, 3, h, w, pin_memory=pinned)
                gpu_ms: list[float] = []
                wall_ms: list[float] = []
                for i in range(preset.repeats + 2):
                    began = time.perf_counter()
                    out = plan.run_pixels(pixels)
                    if i >= 2:
                        wall_ms.append((time.perf_counter() - began) * 1e3)
                        gpu_ms.append(out.backbone_ms + out.fanout_ms)
                step = statistics.median(gpu_ms)
                body = plan.body if isinstance(plan, CudaGraphPlan) else plan
                row = {
                    "tasks": k,
                    "batch": batch,
                    "grouped_kernel": setting,
                    "impls": sorted(set(body.impls)) if isinstance(body, DensePlan) else [],
                    "step_ms": round(step, 3),
                    "wall_ms": round(statistics.median(wall_ms), 3),
                    "x_plain_forward": round(step / plain_ms[batch], 3),
                }
                rows.append(row)
                print(
                    f"engine K={k} b={batch} ({setting}, {row['impls']}): {step:.3f} ms = "
                    f"{row['x_plain_forward']:.3f}x plain",
                    flush=True,
                )
                del plan
    return rows


def engine_alone(
    preset: Preset,
    backbone: TorchBackbone,
    tuners: list[LoadedTuner],
    pixels: list[torch.Tensor],
    batch: int,
) -> dict[str, float]:
    """``GpuEngine.run_batch`` (answers included) on ``batch`` images with every task."""
    engine = GpuEngine(
        TorchRuntime(backbone),
        FeatureCache(0),
        forward=backbone.forward_features,
        tuner_device=preset.device,
        dtype=preset.dtype,
        background=False,
    )
    items = [BatchItem(pixels[i % len(pixels)], f"img{i}", tuple(tuners), 5) for i in range(batch)]
    seconds = time_ms(lambda: engine.run_batch(items), torch.device("cpu"), preset.repeats) / 1e3
    engine.close()
    return {"batch": batch, "tasks": len(tuners), "images_per_s": round(batch / seconds, 1)}


def server_section(
    preset: Preset, backbone: TorchBackbone, tuners: list[LoadedTuner], batch: int
) -> dict[str, Any]:
    """``restune serve`` on the GPU under a separate load-generator process."""
    from bench.processes import ServeProcess

    concurrency, per_request = 16, 8
    env = {
        "RESTUNE_BACKBONE": preset.arch,
        "RESTUNE_BACKBONE_WEIGHTS": "random:0",
        "RESTUNE_DEVICE": str(preset.device),
        "RESTUNE_MAX_BATCH_IMAGES": str(batch),
        "RESTUNE_MAX_WAIT_MS": "2",
        "RESTUNE_MAX_QUEUE_IMAGES": "4096",
        "RESTUNE_FEATURE_CACHE_BYTES": "0",
        "RESTUNE_MAX_TASKS_PER_REQUEST": "64",
        "RESTUNE_MAX_ARTIFACT_BYTES": str(64 << 20),
        "RESTUNE_DECODE_THREADS": str(max(2, (os.cpu_count() or 4) - 2)),
        "RESTUNE_REQUEST_TIMEOUT_S": "120",
        "RESTUNE_LOG_LEVEL": "warning",
        "RESTUNE_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    import httpx

    with tempfile.TemporaryDirectory(prefix="restune-gpu-bench-") as tmp:
        env["RESTUNE_STORE"] = f"file://{tmp}/store"
        with (
            ServeProcess(Path(tmp) / "server", env) as server,
            httpx.Client(base_url=server.url, timeout=120.0) as client,
        ):
            ready = client.get("/readyz").json()
            headers = {**server.admin_headers, "Content-Type": "application/octet-stream"}
            for tuner in tuners:
                data = save_task(tuner.module)  # copies each tensor to the host
                client.put(f"/v1/tuners/{tuner.name}", content=data, headers=headers)
            names = ",".join(t.name for t in tuners)
            code = (
                "import asyncio, json, sys\n"
                "from bench.server_throughput import generate_load\n"
                f"r = asyncio.run(generate_load({server.url!r}, {names!r}, rounds=3,"
                f" concurrency={concurrency}, per_request={per_request}))\n"  # warm-up run
                f"r = asyncio.run(generate_load({server.url!r}, {names!r}, rounds=12,"
                f" concurrency={concurrency}, per_request={per_request}))\n"
                "print(json.dumps(r))\n"
            )
            root = Path(__file__).resolve().parents[1]
            done = subprocess.run(
                [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
            )
            load = json.loads(done.stdout.strip().splitlines()[-1])
            metrics = client.get("/metrics").text
    fallbacks = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("restune_cuda_graph_fallbacks_total")
    )
    return {
        "backbone": ready.get("backbone"),
        "concurrency": concurrency,
        "images_per_request": per_request,
        "tasks_per_image": len(tuners),
        "cuda_graph_fallbacks": fallbacks,
        **load,
    }


def decode_section(preset: Preset, backbone: TorchBackbone, jpegs: list[bytes]) -> dict[str, Any]:
    """Images/s of decode + preprocess: PIL in a thread pool, and nvJPEG batches on the GPU."""
    from server.engine.decode_gpu import GpuImageDecoder, gpu_decode_available

    threads = max(1, (os.cpu_count() or 2) - 2)
    dc = backbone.data_config

    def one(data: bytes) -> torch.Tensor:
        return preprocess(decode_image(data, 0, max_bytes=1 << 24, max_pixels=1 << 26), dc)

    def pil() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, jpegs))

    out: dict[str, Any] = {"images": len(jpegs), "pil_threads": threads}
    out["pil_images_per_s"] = round(len(jpegs) / time_ms(pil, torch.device("cpu"), 3) * 1e3, 1)
    if gpu_decode_available(preset.device):
        decoder = GpuImageDecoder(dc, preset.device, max_bytes=1 << 24, max_pixels=1 << 26)

        def gpu() -> None:
            decoder.prepare(jpegs)
            torch.cuda.synchronize()

        seconds = time_ms(gpu, torch.device("cpu"), 5) / 1e3
        out["gpu_images_per_s"] = round(len(jpegs) / seconds, 1)
    return out


def parity_section(
    preset: Preset, backbone: TorchBackbone, tuners: list[LoadedTuner], pixels: list[torch.Tensor]
) -> dict[str, Any]:
    """GPU (preset dtype, graphs) vs CPU float32 eager; one image alone vs in a full bucket."""
    cpu_backbone = load_backbone(preset.arch, "random:0")
    cpu_tuners = [
        LoadedTuner(
            t.name, t.version, t.sha256, t.config, _cpu_copy(t.module, cpu_backbone), t.nbytes
        )
        for t in tuners
    ]
    batch = min(8, len(pixels))
    items_cpu = [BatchItem(pixels[i], f"p{i}", tuple(cpu_tuners), CLASSES) for i in range(batch)]
    items_dev = [BatchItem(pixels[i], f"p{i}", tuple(tuners), CLASSES) for i in range(batch)]
    want = Engine(TorchRuntime(cpu_backbone), FeatureCache(0)).run_batch(items_cpu)
    engine = GpuEngine(
        TorchRuntime(backbone),
        FeatureCache(0),
        forward=backbone.forward_features,
        tuner_device=preset.device,
        dtype=preset.dtype,
        background=False,
    )
    got = engine.run_batch(items_dev)
    worst_prob = 0.0
    top1_same = 0
    total = 0
    for g, w in zip(got.items, want.items, strict=True):
        for name, answer in w.answers.items():
            ref = {x["label"]: x["score"] for x in answer["labels"]}
            mine = {x["label"]: x["score"] for x in g.answers[name]["labels"]}
            worst_prob = max(worst_prob, max(abs(mine[label] - ref[label]) for label in ref))
            top1_same += answer["labels"][0]["label"] == g.answers[name]["labels"][0]["label"]
            total += 1
    alone = engine.run_batch(items_dev[:1]).items[0].answers
    in_batch = got.items[0].answers
    batch_dependence = max(
        abs(a["score"] - b["score"])
        for name in alone
        for a, b in zip(alone[name]["labels"], in_batch[name]["labels"], strict=True)
    )
    engine.close()
    return {
        "images": batch,
        "tasks": len(tuners),
        "max_abs_probability_diff_vs_cpu_fp32": round(worst_prob, 5),
        "top1_agreement_vs_cpu_fp32": round(top1_same / max(1, total), 4),
        "max_abs_probability_diff_alone_vs_batch": round(batch_dependence, 6),
    }


def _cpu_copy(module: TaskModule, cpu_backbone: TorchBackbone) -> TaskModule:
    copy = TaskModule(module.config, cpu_backbone.final_norm)
    copy.load_state_dict({k: v.detach().float().cpu() for k, v in module.state_dict().items()})
    return copy.eval()


# --- the run --------------------------------------------------------------------------------


def device_slug(device: torch.device) -> str:
    """``nvidia-h200`` for a GPU named 'NVIDIA H200'; ``cpu-smoke`` on the CPU."""
    if device.type != "cuda":
        return "cpu-smoke"
    name = torch.cuda.get_device_name(device)
    return "-".join(name.lower().replace("_", " ").split())


def write_result(out: Path, result: dict[str, Any]) -> None:
    """Write the result document whole (a temporary file renamed over ``out``): a run that
    dies later keeps every section written so far."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)


def _free_device_memory(device: torch.device) -> None:
    """Between sections: what one section left on the card must not starve the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run(preset: Preset, *, with_server: bool, out: Path) -> dict[str, Any]:
    """Every section of ``preset``; the result document, written to ``out`` after each one.

    Each section runs on its own: one that raises is recorded under ``errors`` (with its
    traceback printed) and the next one runs; a section needing what a failed one made is
    recorded as skipped. Only loading the backbone ends the run early.
    """
    started = time.perf_counter()
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "bench": "gpu",
        "arch": preset.arch,
        "dtype": str(preset.dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(preset.device)
        if preset.device.type == "cuda"
        else "cpu",
        "torch": torch.__version__,
        "goals": GOALS,
        "errors": {},
    }

    def section(name: str, fn: Callable[[], Any], *, keep: bool = True) -> Any:
        """Run ``fn``; its value goes in the document under ``name`` when ``keep``."""
        began = time.perf_counter()
        print(f"--- {name}", flush=True)
        value: Any = None
        try:
            value = fn()
        except Exception as exc:
            traceback.print_exc()
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
        else:
            if keep and value is not None:
                result[name] = value
        result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - began, 1)
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_result(out, result)
        _free_device_memory(preset.device)
        return value

    def needs(*names: str) -> None:
        missing = [n for n in names if n not in result]
        if missing:
            raise RuntimeError(f"skipped: section {', '.join(missing)} has no result")

    backbone = section(
        "load",
        lambda: load_backbone(preset.arch, "random:0", device=preset.device, dtype=preset.dtype),
        keep=False,
    )
    if backbone is None:
        return result

    def backbone_rows() -> dict[int, dict[str, float]]:
        batches = tuple(dict.fromkeys((*preset.backbone_batches, *preset.engine_batches)))
        return backbone_section(dataclasses.replace(preset, backbone_batches=batches), backbone)

    section("backbone", backbone_rows)
    tuners: list[LoadedTuner] | None = section(
        "tuners", lambda: make_tuners(backbone, max(preset.engine_tasks), preset.device), keep=False
    )

    def engine() -> list[dict[str, Any]]:
        needs("backbone")
        if tuners is None:
            raise RuntimeError("skipped: no tuners")
        plain = {b: r["graphed_ms"] for b, r in result["backbone"].items()}
        return engine_section(preset, backbone, plain, tuners)

    section("engine", engine)
    jpegs = sample_jpegs(64)
    pixels = pixels_of(backbone, jpegs)
    batch = max(preset.engine_batches)
    server_tasks = (tuners or [])[: min(SERVER_TASKS, len(tuners or []))]

    def alone() -> dict[str, float]:
        if not server_tasks:
            raise RuntimeError("skipped: no tuners")
        return engine_alone(preset, backbone, server_tasks, pixels, batch)

    section("engine_alone", alone)
    if with_server:

        def server() -> dict[str, Any]:
            if not server_tasks:
                raise RuntimeError("skipped: no tuners")
            row = server_section(preset, backbone, server_tasks, batch)
            if "engine_alone" in result:
                row["over_engine_alone"] = round(
                    row["images_per_s"] / result["engine_alone"]["images_per_s"], 3
                )
            return row

        section("server", server)
    section("decode", lambda: decode_section(preset, backbone, jpegs))

    def parity() -> dict[str, Any]:
        if not server_tasks:
            raise RuntimeError("skipped: no tuners")
        return parity_section(preset, backbone, server_tasks, pixels)

    section("parity", parity)
    return result


def table(result: dict[str, Any]) -> str:
    """The headline numbers as a Markdown table (sections that failed are listed last)."""
    lines = [f"restune GPU bench: {result['arch']} {result['dtype']} on {result['device']}", ""]
    if "backbone" in result:
        lines += ["| backbone batch | eager ms | graphed ms | graphed img/s |", "|---|---|---|---|"]
        for batch, row in sorted(result["backbone"].items()):
            lines.append(
                f"| {batch} | {row['eager_ms']} | {row['graphed_ms']} "
                f"| {row['graphed_images_per_s']} |"
            )
    if "engine" in result:
        lines += [
            "",
            "| K tasks | batch | kernel | step ms | x plain graphed forward |",
            "|---|---|---|---|---|",
        ]
        for row in result["engine"]:
            kernel = f"{row['grouped_kernel']} {'/'.join(row['impls'])}"
            lines.append(
                f"| {row['tasks']} | {row['batch']} | {kernel} | {row['step_ms']} "
                f"| {row['x_plain_forward']} |"
            )
    lines.append("")
    if "engine_alone" in result:
        alone = result["engine_alone"]
        lines.append(
            f"engine alone (answers included), batch {alone['batch']}, K {alone['tasks']}: "
            f"{alone['images_per_s']} img/s"
        )
    if "server" in result:
        s = result["server"]
        lines.append(
            f"server end to end: {s['images_per_s']} img/s, p50 {s['p50_ms']} ms, "
            f"= {s.get('over_engine_alone', 'n/a')} x engine alone "
            f"(fallbacks {s['cuda_graph_fallbacks']})"
        )
    if "decode" in result:
        d = result["decode"]
        lines.append(
            f"decode: PIL x{d['pil_threads']} threads {d['pil_images_per_s']} img/s, "
            f"GPU {d.get('gpu_images_per_s', 'n/a')} img/s"
        )
    if "parity" in result:
        p = result["parity"]
        lines.append(
            f"parity vs CPU fp32: max |dp| {p['max_abs_probability_diff_vs_cpu_fp32']}, "
            f"top-1 agreement {p['top1_agreement_vs_cpu_fp32']}; alone vs batch max |dp| "
            f"{p['max_abs_probability_diff_alone_vs_batch']}"
        )
    for name, error in result.get("errors", {}).items():
        lines.append(f"FAILED {name}: {error}")
    lines.append(f"total {result.get('seconds', 0)} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny preset on the CPU")
    parser.add_argument("--no-server", action="store_true", help="skip the server section")
    parser.add_argument("--out", type=Path, help="result file (default results/gpu-<dev>.json)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        preset = SMOKE
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device here; use --cpu-smoke to check the script on the CPU")
        preset = FULL
    out = args.out or RESULTS / f"gpu-{device_slug(preset.device)}.json"
    result = run(preset, with_server=preset.server and not args.no_server, out=out)
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""What one tuner registration costs the server, by artifact size.

A registration (``PUT /v1/tuners/{name}``) hashes the upload, validates it, admits it against
the running backbone (build + dry run), stores it and loads it. Each is linear in the artifact's
size, so doing one of them twice shows up as milliseconds per MB. Measured with the server's own
code: :meth:`server.engine.registry.TunerRegistry.register` on a file store in a temp dir (fsync
included), backbone ``vit_small_patch16_224`` with random weights (D 384, 12 blocks). Artifacts:
res_adapter on every block with a bottleneck picked to reach each size; each round uploads new
bytes (another seed), so every registration stores and loads a new version.

Two clocks: wall time (what the client waits, fsync included) and this process's CPU time over
all its threads, which neighbours on a shared box disturb less. Both swing by hundreds of ms at
100 MB on a loaded box, more than a repeated hash costs, so each row also counts the steps one
registration runs (full-size sha256 calls and header parses, counted by wrapping
``hashlib.sha256`` and ``tuners_store.artifact.read_header``, which every version has) and
times one of each on the CPU clock: steps x cost is the part of a registration that doing a
step twice would add.

The script imports only what every version of the registry has, so the same file measures
another checkout: ``PYTHONPATH=/path/to/checkout python bench/registration_cost.py``.

Run: ``python -m bench.registration_cost [--sizes-mb 12,100] [--rounds 5]`` (JSON on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from restuning.backbone import load_backbone
from server.engine.registry import TunerRegistry
from server.engine.runtime import Backbone, TorchRuntime
from server.settings import Settings
from tuners_store import artifact, open_store
from tuners_store.artifact import pack_artifact, random_arrays
from tuners_store.config import BackboneRef, BypassConfig, TunerConfig, parameter_count

ARCH = "vit_small_patch16_224"
MiB = 1024 * 1024


def sized_config(backbone: Backbone, target_bytes: int) -> TunerConfig:
    """A res_adapter tuner on every block whose float32 artifact is about ``target_bytes``."""

    def config(bottleneck: int) -> TunerConfig:
        return TunerConfig(
            name="cost",
            task="classification",
            labels=tuple(f"class{i}" for i in range(10)),
            backbone=BackboneRef(
                arch=backbone.arch,
                fingerprint=backbone.fingerprint,
                dim=backbone.dim,
                depth=backbone.depth,
            ),
            bypass=BypassConfig(layers=(1, backbone.depth), bottleneck=bottleneck),
        )

    per_unit = 4 * (parameter_count(config(2)) - parameter_count(config(1)))
    return config(max(1, round(target_bytes / per_unit)))


@contextmanager
def counting_steps(size: int) -> Iterator[Counter[str]]:
    """Count sha256 calls over >= ``size`` bytes and header parses while the block runs."""
    counts: Counter[str] = Counter()
    real_sha256, real_read_header = hashlib.sha256, artifact.read_header

    def sha256(*args: Any, **kwargs: Any) -> Any:
        if args and len(args[0]) >= size:
            counts["sha256"] += 1
        return real_sha256(*args, **kwargs)

    def read_header(*args: Any, **kwargs: Any) -> Any:
        counts["header_parse"] += 1
        return real_read_header(*args, **kwargs)

    hashlib.sha256 = sha256  # type: ignore[assignment]
    artifact.read_header = read_header
    try:
        yield counts
    finally:
        hashlib.sha256 = real_sha256
        artifact.read_header = real_read_header


def cpu_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median CPU time of ``fn`` in ms."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append((time.process_time() - started) * 1000.0)
    return round(statistics.median(times), 1)


def step_costs(data: bytes) -> dict[str, float]:
    """CPU ms of one full-size sha256 and of one validation (which hashes once itself)."""
    return {
        "sha256": cpu_ms(lambda: hashlib.sha256(data).hexdigest()),
        "validate_incl_sha256": cpu_ms(lambda: artifact.validate_artifact(data)),
    }


async def measure(backbone: Backbone, sizes_mb: list[int], rounds: int) -> list[dict[str, Any]]:
    """Median and min registration time per size (one warm-up registration first)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="restune-bench-register-") as tmp:
        settings = Settings(
            backbone=backbone.arch,
            backbone_weights="random:0",
            store=f"file://{tmp}/tuners",
            tuner_memory_bytes=4096 * MiB,
        )
        store = open_store(settings.store)
        registry = TunerRegistry(store, backbone, settings)
        await registry.start()
        try:
            for size in sizes_mb:
                config = sized_config(backbone, size * MiB)
                payloads = [
                    pack_artifact(config, random_arrays(config, seed=seed))
                    for seed in range(rounds + 1)
                ]
                times_ms, cpu_times = [], []
                for i, data in enumerate(payloads):
                    started, cpu_started = time.perf_counter(), time.process_time()
                    await registry.register("cost", data)
                    if i:  # the first is a warm-up
                        times_ms.append((time.perf_counter() - started) * 1000.0)
                        cpu_times.append((time.process_time() - cpu_started) * 1000.0)
                await registry.settle()
                with counting_steps(len(payloads[0])) as steps:
                    counted = pack_artifact(config, random_arrays(config, seed=rounds + 1))
                    await registry.register("cost", counted)
                    await registry.settle()
                rows.append(
                    {
                        "artifact_mb": round(len(payloads[0]) / MiB, 1),
                        "bottleneck": config.bypass.bottleneck,
                        "register_ms_median": round(statistics.median(times_ms), 1),
                        "register_ms_min": round(min(times_ms), 1),
                        "register_cpu_ms_median": round(statistics.median(cpu_times), 1),
                        "steps_per_registration": dict(steps),
                        "step_cpu_ms": step_costs(payloads[0]),
                        "rounds": rounds,
                    }
                )
                del payloads
        finally:
            await registry.stop()
            await store.close()
    return rows


def main() -> None:
    """CLI: measure and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="12,100", help="artifact sizes in MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared box)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = TorchRuntime(load_backbone(ARCH, "random:0"))
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    rows = asyncio.run(measure(backbone, sizes, args.rounds))
    print(json.dumps({"bench": "registration_cost", "arch": ARCH, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

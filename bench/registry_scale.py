"""The tuner registry at scale: 1,000 registered tuners on one backbone.

Tuners: real ViT-S/16 dims (D = 384), res_adapter r = 8 on the last three blocks (10..12),
CLS pooling, 10 classes: about 43 k parameters, ~170 KB per artifact, so 1,000 of them fit
any store while every one is a real, loadable task. Backbone: ``vit_small_patch16_224`` with
random weights (timing only). Measured, with the server's own code:

- in one process (:class:`server.engine.service.InferenceService`), for a file store and a
  Redis store: registration-to-servable latency of each of the 1,000 tuners (register through
  the registry as ``PUT /v1/tuners/{name}`` does, then predict until the new version answers);
  resident memory per loaded tuner (RSS growth from 10 to 1,000 loaded, divided by 990, next
  to the tensor bytes the registry counts); predict latency of one task on that service
  (1,000 registered and loaded) and on a second one in the same process holding 10 of them,
  calls alternating between the two (same image: a feature-cache hit, so the numbers show
  what the registry's size adds; and fresh images, which pay the forward);
- across two ``restune serve`` replicas on one Redis (already holding the 1,000 tuners):
  ``PUT`` on replica A over HTTP, then predict on replica B over HTTP until it answers with
  the new tuner (a new name) or the new version (a known name: B learns it from the store's
  change feed).

Run: ``python -m bench.registry_scale [--quick]`` -> ``bench/results/registry_scale.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from bench import timing
from bench.processes import ServeProcess, redis_server
from bench.timing import summary_ms
from restuning.backbone import load_backbone
from server.engine.runtime import Backbone, TorchRuntime
from server.engine.service import InferenceService, TaskRef
from server.metrics import Metrics
from server.settings import Settings
from tuners_store.artifact import pack_artifact, random_arrays
from tuners_store.config import BackboneRef, BypassConfig, TunerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "registry_scale.json"
ADMIN_TOKEN = "bench-admin-token-0123456789"
MiB = 1024 * 1024
SERVABLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Profile:
    """Sizes of one run."""

    arch: str
    tuners: int
    small: int
    """Registered tuners of the 'few' point (the 'many' point is ``tuners``)."""
    last_blocks: int
    predict_samples: int
    forward_samples: int
    replica_samples: int


def profile(quick: bool, smoke: bool) -> Profile:
    """Smoke: tiny backbone, 20 tuners; quick and full: ViT-S/16, 1,000 tuners."""
    if smoke:
        return Profile("vit_test_tiny", 20, 5, 2, 10, 3, 3)
    if quick:
        return Profile("vit_small_patch16_224", 1000, 10, 3, 50, 10, 20)
    return Profile("vit_small_patch16_224", 1000, 10, 3, 200, 30, 100)


def scale_config(name: str, backbone: Backbone, last_blocks: int) -> TunerConfig:
    """A small real tuner: res_adapter r = 8 on the last ``last_blocks`` blocks, 10 classes."""
    return TunerConfig(
        name=name,
        task="classification",
        labels=tuple(f"class{i}" for i in range(10)),
        backbone=BackboneRef(
            arch=backbone.arch,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            depth=backbone.depth,
        ),
        bypass=BypassConfig(
            layers=(backbone.depth - last_blocks + 1, backbone.depth), bottleneck=8
        ),
        pooling="cls",
    )


def artifact(name: str, backbone: Backbone, last_blocks: int, seed: int) -> bytes:
    """Artifact bytes of a random tuner ``name`` (distinct bytes per seed)."""
    config = scale_config(name, backbone, last_blocks)
    return pack_artifact(config, random_arrays(config, seed=seed))


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unknown)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- one process


async def _serves(service: InferenceService, pixels: torch.Tensor, name: str, version: int) -> None:
    """Predict ``name`` until version ``version`` answers."""
    while True:
        body = await service.predict_tensor(pixels, [TaskRef(name)], 1)
        if body["results"][0]["tasks"][name].get("version") == version:
            return
        await asyncio.sleep(0)


async def _predict_side_by_side(
    services: dict[str, InferenceService], pixels: torch.Tensor, name: str, prof: Profile
) -> dict[str, Any]:
    """One-task predict latency of each service, calls alternating between them.

    A repeated image (a feature-cache hit: what the registry's size could slow down) and
    fresh images (a miss: plus one forward), the same images for every service.
    """
    task = [TaskRef(name)]
    cached: dict[str, list[float]] = {key: [] for key in services}
    fresh: dict[str, list[float]] = {key: [] for key in services}
    for service in services.values():
        await service.predict_tensor(pixels, task, 1)  # the repeated image is cached now
    for _ in range(prof.predict_samples):
        for key, service in services.items():
            started = time.perf_counter()
            await service.predict_tensor(pixels, task, 1)
            cached[key].append((time.perf_counter() - started) * 1000.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(prof.forward_samples):
        image = torch.randn(pixels.shape, generator=gen)  # (1, 3, H, W), never seen before
        for key, service in services.items():
            started = time.perf_counter()
            await service.predict_tensor(image, task, 1)
            fresh[key].append((time.perf_counter() - started) * 1000.0)
    return {
        key: {
            "registered": len(await services[key].store.list()),
            "cache_hit": summary_ms(cached[key]),
            "forward": summary_ms(fresh[key]),
        }
        for key in services
    }


def _settings(backbone: Backbone, store_url: str) -> Settings:
    return Settings(
        backbone=backbone.arch,
        backbone_weights="random:0",
        store=store_url,
        tuner_memory_bytes=8 * 1024 * MiB,
        feature_cache_bytes=64 * MiB,
        max_batch_images=8,
        max_wait_ms=0.0,
        request_timeout_s=120.0,
    )


async def _in_process(
    store_url: str, few_store_url: str, backbone: Backbone, prof: Profile
) -> dict[str, Any]:
    """Register ``prof.tuners`` tuners one by one into a fresh store, measuring as we go;
    then predict on it and on a second service holding ``prof.small`` of them, alternately."""
    service = InferenceService(_settings(backbone, store_url), Metrics(), backbone=backbone)
    await service.start()
    side = backbone.data_config.input_size
    pixels = torch.randn((1, *side), generator=torch.Generator().manual_seed(0))  # (1, 3, H, W)
    names = [f"scale{i:04d}" for i in range(prof.tuners)]
    register_ms: list[float] = []
    report: dict[str, Any] = {"store": store_url.split(":", 1)[0]}
    try:
        for i, name in enumerate(names):
            data = artifact(name, backbone, prof.last_blocks, seed=i)
            started = time.perf_counter()
            info, _ = await service.registry.register(name, data)
            async with asyncio.timeout(SERVABLE_TIMEOUT_S):
                await _serves(service, pixels, name, info.version)
            register_ms.append((time.perf_counter() - started) * 1000.0)
            if i + 1 == prof.small:
                gc.collect()
                rss_small = rss_bytes()
        gc.collect()
        rss_large = rss_bytes()
        few = InferenceService(_settings(backbone, few_store_url), Metrics(), backbone=backbone)
        await few.start()
        try:
            for i, name in enumerate(names[: prof.small]):
                await few.registry.register(
                    name, artifact(name, backbone, prof.last_blocks, seed=i)
                )
            latency = await _predict_side_by_side(
                {"few": few, "many": service}, pixels, names[0], prof
            )
        finally:
            await few.stop()
        report["predict_few"], report["predict_many"] = latency["few"], latency["many"]
        loaded = list(service.registry.loaded_tuners())
        grown = prof.tuners - prof.small
        report.update(
            registered=len(await service.store.list()),
            loaded=len(loaded),
            artifact_bytes=len(artifact(names[0], backbone, prof.last_blocks, seed=0)),
            tensor_bytes_per_tuner=round(service.registry.loaded_bytes / max(1, len(loaded))),
            rss_bytes_per_tuner=round((rss_large - rss_small) / grown) if rss_small else None,
            rss_mib={"few": round(rss_small / MiB, 1), "many": round(rss_large / MiB, 1)},
            register_to_servable=summary_ms(register_ms),
            register_to_servable_first_last={
                "first_100": summary_ms(register_ms[:100]),
                "last_100": summary_ms(register_ms[-100:]),
            },
        )
    finally:
        await service.stop()
    return report


# --------------------------------------------------------------------------- two replicas


def _png(side: int) -> bytes:
    from PIL import Image

    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (side, side, 3), generator=gen, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _answered_version(client: httpx.Client, image_b64: str, name: str) -> int | None:
    """The version replica ``client`` answers ``name`` with, or None if it does not yet."""
    resp = client.post(
        "/v1/predict", json={"images": [{"b64": image_b64}], "tasks": [name], "top_k": 1}
    )
    if resp.status_code == 404:
        return None
    resp.raise_for_status()
    version = resp.json()["results"][0]["tasks"][name].get("version")
    return int(version) if version is not None else None


def _replicas(redis_store_url: str, backbone: Backbone, prof: Profile) -> dict[str, Any]:
    """PUT on replica A, poll replica B until it serves: new names, then new versions."""
    env = {
        "RESTUNE_BACKBONE": backbone.arch,
        "RESTUNE_BACKBONE_WEIGHTS": "random:0",
        "RESTUNE_STORE": redis_store_url,
        "RESTUNE_ADMIN_TOKEN": ADMIN_TOKEN,
        "RESTUNE_TUNER_MEMORY_BYTES": str(2048 * MiB),
        "RESTUNE_FEATURE_CACHE_BYTES": str(16 * MiB),
        "RESTUNE_MAX_WAIT_MS": "0",
        "RESTUNE_THREADS": "1",
        "RESTUNE_LOG_LEVEL": "warning",
    }
    image_b64 = base64.b64encode(_png(64)).decode()
    timeout = 60.0
    new_name_ms: list[float] = []
    new_version_ms: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="restune-bench-replicas-") as tmp,
        ServeProcess(Path(tmp) / "a", env) as a,
        ServeProcess(Path(tmp) / "b", env) as b,
        httpx.Client(base_url=a.url, timeout=timeout) as client_a,
        httpx.Client(base_url=b.url, timeout=timeout) as client_b,
    ):
        headers = {**a.admin_headers, "Content-Type": "application/octet-stream"}

        def put_then_poll(name: str, seed: int) -> float:
            data = artifact(name, backbone, prof.last_blocks, seed=seed)
            started = time.perf_counter()
            resp = client_a.put(f"/v1/tuners/{name}", content=data, headers=headers)
            resp.raise_for_status()
            version = int(resp.json()["version"])
            while _answered_version(client_b, image_b64, name) != version:
                if time.perf_counter() - started > timeout:
                    raise TimeoutError(f"replica B never served {name} v{version}")
            return (time.perf_counter() - started) * 1000.0

        for i in range(prof.replica_samples):
            new_name_ms.append(put_then_poll(f"replica{i:04d}", seed=10_000 + i))
        for i in range(prof.replica_samples):
            new_version_ms.append(put_then_poll("replica0000", seed=20_000 + i))
        registered = len(client_b.get("/v1/tuners").json()["tuners"])
    return {
        "replicas": 2,
        "registered_on_b": registered,
        "new_name": summary_ms(new_name_ms),
        "new_version": summary_ms(new_version_ms),
        "method": "PUT on A (HTTP), then POST /v1/predict on B until it answers that version",
    }


# --------------------------------------------------------------------------- entry


def run(quick: bool = False, *, smoke: bool = False) -> dict[str, Any]:
    """Measure file store, Redis store and two replicas; returns the JSON-able report."""
    torch.set_num_threads(timing.threads())
    prof = profile(quick, smoke)
    backbone = TorchRuntime(load_backbone(prof.arch, "random:0"))
    config = scale_config("probe", backbone, prof.last_blocks)
    report: dict[str, Any] = {
        "bench": "registry_scale",
        "profile": "smoke" if smoke else "quick" if quick else "full",
        "arch": prof.arch,
        "tuner": {
            "kind": "res_adapter",
            "bottleneck": 8,
            "layers": list(config.bypass.layers),
            "pooling": "cls",
            "classes": 10,
        },
        "tuners": prof.tuners,
        "few": prof.small,
    }
    with tempfile.TemporaryDirectory(prefix="restune-bench-scale-") as tmp:
        urls = (f"file://{tmp}/tuners", f"file://{tmp}/few")
        report["file"] = asyncio.run(_in_process(*urls, backbone, prof))
    with redis_server() as url:
        if url is None:
            report["redis"] = {"skipped": "no REDIS_URL and no redis-server on PATH"}
            report["replicas"] = report["redis"]
            return report
        run_id = uuid.uuid4().hex[:8]
        store_url = f"{url}?prefix=benchscale{run_id}"
        few_url = f"{url}?prefix=benchfew{run_id}"
        report["redis"] = asyncio.run(_in_process(store_url, few_url, backbone, prof))
        report["replicas"] = _replicas(store_url, backbone, prof)
    return report


def main() -> None:
    """CLI: run, print the JSON and write ``bench/results/registry_scale.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer latency samples")
    parser.add_argument("--smoke", action="store_true", help="tiny backbone, 20 tuners")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args.quick, smoke=args.smoke)
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

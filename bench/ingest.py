"""Image ingest: CPU per image of decode + preprocess + cache key, and memory of strips.

Three pipelines side by side on the same JPEGs (photos bundled with scikit-image and
scikit-learn, upscaled with bicubic to 0.3, 2 and 12 MP and saved at quality 90), timed on
this process's CPU clock with one thread, interleaved round by round:

- ``whole_image``: the pipeline before the crop-only resample: decode the full image to RGB,
  resize all of it (shorter side to H / crop_pct), center-crop, normalise, and key the
  feature cache with a sha256 of the full-resolution pixels.
- ``exact`` (``RESTUNE_PREPROCESS=exact``): full decode, only the crop resampled with the
  backbone's filter (timm's pixels), key = sha256 of the (3, H, W) input.
- ``fast`` (the server's default): the JPEG decoded at its smallest sufficient DCT scale.

Memory: a 100000 x 1 and a 3000 x 1 PNG (a few hundred bytes each), prepared in a fresh
child process; peak RSS growth (Linux VmHWM, reset just before the call), wall and CPU time,
refused by the aspect-ratio limit and with the limit lifted. The whole-image pipeline runs
on the 3000 x 1 strip only (the 100000 x 1 one would need ~26 GB).

Effect of ``fast`` on features: cosine and max |diff| of the final-norm CLS features of
``exact`` vs ``fast`` inputs, on the embedded DINOv2 ViT-S/14 when its weights are cached
(the tiny test backbone otherwise, and in smoke runs), plus whether the demo tasks' images
(8-64 px arrays, never JPEG files) get identical inputs in both modes.

Run: ``python -m bench --only ingest`` -> ``bench/results/ingest.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import timing
from restuning.backbone import TorchBackbone, load_backbone
from restuning.embedded import EMBEDDED_ARCH, embedded_weights_path
from restuning.features import FeatureSpec
from restuning.preprocess import PreprocessMode, crop_pixels, normalise, resized_size
from restuning.presets import PRESETS, DataConfig
from server.engine.decode import decode_image, input_digest, prepare_image

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"
SIZES: dict[str, tuple[int, int]] = {
    "0.3MP": (640, 480),
    "2MP": (1632, 1224),
    "12MP": (4032, 3024),
}
LIMITS = {"max_bytes": 1 << 26, "max_pixels": 1 << 26}
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def sample_photos() -> list[np.ndarray]:
    """Colour photos that ship with scikit-image and scikit-learn (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    photos.extend(load_sample_images().images)  # china.jpg, flower.jpg
    return [np.ascontiguousarray(p[..., :3]) for p in photos]


def jpegs(size: tuple[int, int], count: int) -> list[bytes]:
    """``count`` photos upscaled (bicubic) to ``size`` and saved as JPEG at quality 90."""
    out = []
    photos = sample_photos()
    for i in range(count):
        img = Image.fromarray(photos[i % len(photos)]).resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def whole_image(data: bytes, dc: DataConfig) -> tuple[torch.Tensor, str]:
    """The previous pipeline: full RGB decode, whole-image resize, crop, full-pixel sha256."""
    img = decode_image(data, 0, **LIMITS, max_aspect_ratio=1e9)
    size = resized_size(img.width, img.height, dc)
    resized = img.resize(size, _FILTERS[dc.interpolation])
    _, out_h, out_w = dc.input_size
    left, top = round((size[0] - out_w) / 2.0), round((size[1] - out_h) / 2.0)
    crop = np.array(resized.crop((left, top, left + out_w, top + out_h)), dtype=np.uint8)
    digest = hashlib.sha256(f"{img.width}x{img.height}:RGB:".encode() + img.tobytes())
    return normalise(crop, dc), digest.hexdigest()


def cropped(data: bytes, dc: DataConfig, mode: PreprocessMode) -> tuple[torch.Tensor, str]:
    """The server's pipeline (``InferenceService._prepare``) in ``mode``."""
    pixels = prepare_image(data, 0, dc, **LIMITS, mode=mode)  # (3, H, W)
    return pixels, input_digest(pixels)


def _cpu_ms(dc: DataConfig, images: list[bytes], rounds: int) -> dict[str, Any]:
    """Median CPU ms per image of each pipeline, interleaved image by image, round by round."""
    candidates = {
        "whole_image": lambda data: whole_image(data, dc),
        "exact": lambda data: cropped(data, dc, "exact"),
        "fast": lambda data: cropped(data, dc, "fast"),
    }
    for fn in candidates.values():  # warm-up: first-call costs of the codecs
        fn(images[0])
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for data in images:
            for name, fn in candidates.items():
                samples[name].append(timing.once_ms(lambda fn=fn, data=data: fn(data), "cpu"))
    medians = {name: round(statistics.median(ms), 2) for name, ms in samples.items()}
    return {
        "cpu_ms_per_image": medians,
        "fast_speedup_vs_whole_image": round(medians["whole_image"] / medians["fast"], 1),
        "exact_speedup_vs_whole_image": round(medians["whole_image"] / medians["exact"], 1),
        "samples_per_pipeline": len(images) * rounds,
    }


def _breakdown(dc: DataConfig, data: bytes, repeats: int) -> dict[str, float]:
    """CPU ms of the steps the pipelines differ by, on one image."""
    full = decode_image(data, 0, **LIMITS)
    pixels = prepare_image(data, 0, dc, **LIMITS)

    def drafted() -> None:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", resized_size(img.width, img.height, dc))
        img.load()

    def whole_resize() -> None:
        full.resize(resized_size(full.width, full.height, dc), _FILTERS[dc.interpolation])

    steps = {
        "decode_full_rgb": lambda: decode_image(data, 0, **LIMITS),
        "decode_jpeg_draft": drafted,
        "resize_whole_image": whole_resize,
        "resample_crop_only": lambda: crop_pixels(full, dc),
        "sha256_full_pixels": lambda: hashlib.sha256(full.tobytes()).digest(),
        "sha256_backbone_input": lambda: input_digest(pixels),
    }
    return {
        name: round(timing.median_ms(fn, repeats=repeats, clock="cpu"), 2)
        for name, fn in steps.items()
    }


_CHILD = """
import io, json, resource, sys, time
import torch
torch.set_num_threads(1)
from pathlib import Path
from PIL import Image
from restuning.presets import PRESETS
from server.engine.decode import prepare_image
from bench.ingest import whole_image
width, height, limit, pipeline, arch = json.loads(sys.argv[1])
dc = PRESETS[arch].data
buffer = io.BytesIO()
Image.new("RGB", (width, height)).save(buffer, format="PNG")
png = buffer.getvalue()
small = io.BytesIO()
Image.new("RGB", (64, 48)).save(small, format="PNG")
prepare_image(small.getvalue(), 0, dc, max_bytes=1 << 26, max_pixels=1 << 26)  # warm-up

def status_kib(field):
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in lines if x.startswith(field)).split()[1])

# Linux resets the high-water mark (VmHWM) on "5" > clear_refs: the peak is this call's.
Path("/proc/self/clear_refs").write_text("5")
before = status_kib("VmRSS:")
started, cpu_started = time.perf_counter(), time.process_time()
try:
    if pipeline == "whole_image":
        whole_image(png, dc)
    else:
        prepare_image(png, 0, dc, max_bytes=1 << 26, max_pixels=1 << 26, max_aspect_ratio=limit)
    outcome = "ok"
except Exception as exc:
    outcome = getattr(exc, "code", type(exc).__name__)
seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
growth = status_kib("VmHWM:") - before
print(json.dumps({"bytes": len(png), "outcome": outcome, "wall_ms": round(seconds * 1000, 2),
                  "cpu_ms": round(cpu_seconds * 1000, 2),
                  "peak_rss_growth_mib": round(growth / 1024, 2)}))
"""


def _strip(width: int, height: int, limit: float, pipeline: str, arch: str) -> dict[str, Any]:
    """One strip prepared in a fresh process: its peak RSS growth is the call's alone."""
    args = json.dumps([width, height, limit, pipeline, arch])
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, args],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return {"size": f"{width}x{height}", "pipeline": pipeline, **result}


def _strips(arch: str, smoke: bool) -> list[dict[str, Any]]:
    narrow = 300 if smoke else 3000
    return [
        _strip(100_000, 1, 20.0, "fast", arch),
        _strip(100_000, 1, 1e9, "exact", arch),
        _strip(100_000, 1, 1e9, "fast", arch),
        _strip(narrow, 1, 20.0, "fast", arch),
        _strip(narrow, 1, 1e9, "exact", arch),
        _strip(narrow, 1, 1e9, "whole_image", arch),
    ]


def _feature_backbone(smoke: bool) -> tuple[TorchBackbone, bool]:
    """(backbone, is it the real embedded one): the tiny random one when smoke or absent."""
    path = embedded_weights_path()
    if not smoke and path.exists():
        return load_backbone(EMBEDDED_ARCH, path), True
    return load_backbone("vit_test_tiny", "random:0"), False


def _features(
    backbone: TorchBackbone, by_size: dict[str, list[bytes]]
) -> dict[str, dict[str, float]]:
    """Cosine / max |diff| of final-norm CLS features, exact vs fast inputs, per size."""
    dc = backbone.data_config
    spec = FeatureSpec((backbone.depth,), "cls")
    out: dict[str, dict[str, float]] = {}
    for label, images in by_size.items():
        inputs = {
            mode: torch.stack([cropped(data, dc, mode)[0] for data in images])  # (B, 3, H, W)
            for mode in ("exact", "fast")
        }
        cls = {
            mode: backbone.final_norm(
                backbone.forward_features(x, spec).data[0, :, 0].float()
            )  # (B, D)
            for mode, x in inputs.items()
        }
        cosine = torch.nn.functional.cosine_similarity(cls["exact"], cls["fast"], dim=-1)  # (B,)
        grey = (inputs["exact"] - inputs["fast"]).abs() * 255.0 * min(dc.std)  # grey levels
        out[label] = {
            "images": len(images),
            "cls_cosine_min": round(float(cosine.min()), 6),
            "cls_cosine_mean": round(float(cosine.mean()), 6),
            "cls_max_abs_diff": round(float((cls["exact"] - cls["fast"]).abs().max()), 5),
            "cls_norm_mean": round(float(cls["exact"].norm(dim=-1).mean()), 3),
            "input_mean_abs_diff_grey_levels": round(float(grey.mean()), 3),
            "input_max_abs_diff_grey_levels": round(float(grey.max()), 1),
        }
    return out


def _demo_inputs(dc: DataConfig, per_class: int) -> dict[str, Any]:
    """Whether the demo tasks' images give identical backbone inputs in both modes."""
    from restuning.train.demo_data import DEMO_SETS, load_demo

    total = identical = 0
    for name in DEMO_SETS:
        for ref in load_demo(name, per_class).images:
            img = ref.open()
            identical += int(np.array_equal(crop_pixels(img, dc, "exact"), crop_pixels(img, dc)))
            total += 1
    return {"images": total, "identical_inputs": identical}


def run(quick: bool = False, *, smoke: bool = False) -> dict[str, Any]:
    """Measure ingest CPU, strip memory and the fast mode's effect; the JSON-able report."""
    torch.set_num_threads(1)  # 1-thread CPU time, whatever the suite's setting
    arch = "vit_test_tiny" if smoke else "vit_small_patch14_dinov2"
    dc = PRESETS[arch].data
    sizes = {k: v for k, v in SIZES.items() if not smoke or k != "12MP"}
    count = 2 if smoke else 5
    rounds = 1 if smoke else 3 if quick else 10
    by_size = {label: jpegs(size, count) for label, size in sizes.items()}
    cpu = {label: _cpu_ms(dc, images, rounds) for label, images in by_size.items()}
    largest = list(by_size)[-1]
    backbone, real = _feature_backbone(smoke)
    feature_images = {k: v[: 2 if smoke else 5] for k, v in by_size.items()}
    with torch.inference_mode():
        features = _features(backbone, feature_images)
    return {
        "bench": "ingest",
        "profile": "smoke" if smoke else "quick" if quick else "full",
        "arch": arch,
        "input_size": list(dc.input_size),
        "threads": 1,
        "clock": "cpu (process_time)",
        "images": "JPEG q90 of scikit-image/scikit-learn photos upscaled (bicubic)",
        "cpu": cpu,
        "breakdown": {"size": largest, "cpu_ms": _breakdown(dc, by_size[largest][0], rounds)},
        "strips": _strips(arch, smoke),
        "features": {
            "backbone": backbone.arch if real else f"{backbone.arch} (random weights)",
            "by_size": features,
        },
        "demo_inputs": _demo_inputs(backbone.data_config, 2 if smoke else 20),
    }


def main() -> None:
    """CLI: run, print the JSON and write ``bench/results/ingest.json``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 10")
    parser.add_argument("--smoke", action="store_true", help="tiny config, 0.3 and 2 MP only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args.quick, smoke=args.smoke)
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

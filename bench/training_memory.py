"""Training memory of the bypass on detached features vs the same tuners inside the backbone.

The paper's claim (Res-Tuning-Bypass, discriminative tasks): -49.7% training memory. Measured
here on our own code, one training step (forward, backward, AdamW step) at the same batch:

- ``inside``: Res-Tuning with the tuners inside the frozen backbone: block l computes
  ``lat_l(x) + ls1(attn(norm1 x))`` then ``vert_l(x) + ls2(mlp(norm2 x))``, the very same
  Res-Adapter tensors as the bypass's lateral and vertical tuners; gradients flow back through
  every frozen block, so autograd keeps the backbone's activations.
- ``bypass_all_tokens``: Res-Tuning-Bypass as in the paper: the backbone runs detached
  (inference mode) each step, the bypass trains on all tokens of x_0..x_L (mean pooling).
- ``bypass_cls``: our default: CLS pooling, so backbone capture and bypass use CLS rows only.
- ``bypass_cached``: what ``restune train`` does: CLS features read from the cache, no
  backbone in the step at all.

Method (CPU, no CUDA allocator): a ``TorchDispatchMode`` sees every aten op; each new tensor
storage an op returns is counted until Python frees it (weak reference on the storage), which
gives the live and peak bytes of tensors allocated during the step (activations, temporaries,
gradients, optimizer state; weights and input images excluded). Kernel-internal scratch that
never becomes a tensor is not seen. Separately, ``saved_tensors_hooks`` sum the bytes autograd
keeps for backward (unique storages, parameters excluded). Times are the best of a few steps
without the tracker.

Run: ``python -m bench.training_memory [--quick]`` -> ``bench/results/training_memory.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from restuning.backbone import TorchBackbone, load_backbone
from restuning.features import Features, FeatureSpec
from restuning.tuners import TaskModule, init_task, pool_tokens
from restuning.vit import Block
from tuners_store.config import BackboneRef, BypassConfig, Pooling, TunerConfig

PAPER_REDUCTION_PCT = -49.7
"""Res-Tuning-Bypass's training-memory change on discriminative tasks (paper, ViT-B/16)."""
FULL_MODELS = ("vit_small_patch16_224", "vit_small_patch14_dinov2")
QUICK_MODELS = ("vit_test_tiny",)
BATCH = 16
QUICK_BATCH = 32
"""The tiny model needs a larger batch for activations to outweigh optimizer state."""
BOTTLENECK = 32
CLASSES = 100
TIMED_STEPS = 3
RESULTS = Path(__file__).resolve().parent / "results" / "training_memory.json"
VARIANTS = ("inside", "bypass_all_tokens", "bypass_cls", "bypass_cached")


# --------------------------------------------------------------------------- accounting


class TensorBytesTracker(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Live and peak bytes of the tensor storages that aten ops create while it is active.

    Outputs that share a storage with an input (views, in-place ops) are not new memory.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.live = 0
        self.peak = 0
        self._refs: dict[int, tuple[weakref.ref[torch.UntypedStorage], int]] = {}

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._track(t.untyped_storage(), inputs)
        return out

    def _track(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in inputs or ptr in self._refs:
            return
        self._refs[ptr] = (weakref.ref(storage, functools.partial(self._free, ptr)), nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, ptr: int, _ref: object = None) -> None:
        entry = self._refs.pop(ptr, None)
        if entry is not None:
            self.live -= entry[1]


@dataclass
class SavedTensors:
    """What autograd saved for backward: unique storages and the shapes of the saved tensors."""

    storages: dict[int, int] = field(default_factory=dict)
    """storage pointer -> bytes."""
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


@contextmanager
def saved_tensors(exclude: set[int]) -> Iterator[SavedTensors]:
    """Record every tensor autograd saves for backward inside the block, except those whose
    storage is in ``exclude`` (the parameters)."""
    saved = SavedTensors()

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved.storages[storage.data_ptr()] = storage.nbytes()
            saved.shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def parameter_storages(*modules: nn.Module) -> set[int]:
    """Storage pointers of every parameter and buffer of ``modules``."""
    return {
        t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]
    }


# --------------------------------------------------------------------------- the two models


class InsideAdapters(nn.Module):
    """Res-Tuning with the tuners inside the backbone, sharing the task module's tensors.

    Block l: ``x = lat_l(x) + ls1(attn(norm1 x))``; ``x = vert_l(x) + ls2(mlp(norm2 x))``.
    A Res-Tuner returns ``t + s * delta(t)``, so each tuner is a branch parallel to the frozen
    attention / MLP and the block's own residual is the tuner's identity path.
    """

    def __init__(self, backbone: TorchBackbone, task: TaskModule) -> None:
        super().__init__()
        self.model = backbone.model
        self.task = task

    def forward(self, images: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, C)
        model, bypass = self.model, self.task.bypass
        x = model.embed(images)  # (B, N, D)
        for index, module in enumerate(model.blocks, start=1):
            block = module if isinstance(module, Block) else None
            assert block is not None
            if index in bypass.layers:
                x = bypass.tuner("lateral", index)(x) + block.ls1(block.attn(block.norm1(x)))
                x = bypass.tuner("vertical", index)(x) + block.ls2(block.mlp(block.norm2(x)))
            else:
                x = block(x)
        z = bypass.final_norm(x)  # (B, N, D)
        out: Tensor = self.task.head(pool_tokens(z, bypass.pooling))
        return out


def task_config(backbone: TorchBackbone, pooling: Pooling) -> TunerConfig:
    """Every block, r = 32, 100 classes."""
    return TunerConfig(
        name=f"mem-{pooling}",
        task="classification",
        labels=tuple(f"c{i}" for i in range(CLASSES)),
        backbone=BackboneRef(
            arch=backbone.arch,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            depth=backbone.depth,
        ),
        bypass=BypassConfig(layers=(1, backbone.depth), bottleneck=BOTTLENECK),
        pooling=pooling,
    )


@dataclass
class Step:
    """One variant: its module (the parameters the optimizer trains) and one training step."""

    name: str
    module: nn.Module
    run: Callable[[], Tensor]
    """Forward of one batch -> logits (B, C); the loss and backward are added by the caller."""


def make_steps(backbone: TorchBackbone, images: Tensor, seed: int = 0) -> list[Step]:
    """The four variants on ``backbone`` for the batch ``images``."""
    norm = backbone.final_norm
    mean_task = init_task(task_config(backbone, "mean"), norm, seed)
    cls_task = init_task(task_config(backbone, "cls"), norm, seed)
    inside = InsideAdapters(backbone, mean_task)
    all_spec, cls_spec = mean_task.feature_spec, cls_task.feature_spec
    cached = backbone.forward_features(images, cls_spec)  # (L', B, 1, D), computed beforehand

    def run_inside() -> Tensor:
        out: Tensor = inside(images)
        return out

    def run_bypass(task: TaskModule, spec: FeatureSpec) -> Callable[[], Tensor]:
        def run() -> Tensor:
            out: Tensor = task(backbone.forward_features(images, spec))
            return out

        return run

    def run_cached() -> Tensor:
        out: Tensor = cls_task(Features(cls_spec, cached.data))
        return out

    return [
        Step("inside", mean_task, run_inside),
        Step("bypass_all_tokens", mean_task, run_bypass(mean_task, all_spec)),
        Step("bypass_cls", cls_task, run_bypass(cls_task, cls_spec)),
        Step("bypass_cached", cls_task, run_cached),
    ]


def train_step(step: Step, optimizer: torch.optim.Optimizer, targets: Tensor) -> None:
    """Forward, cross-entropy, backward, optimizer step."""
    loss = nn.functional.cross_entropy(step.run(), targets)
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    optimizer.step()


def measure(step: Step, targets: Tensor, backbone: TorchBackbone) -> dict[str, float]:
    """Peak tracked bytes, autograd-saved bytes and best step time of one variant."""
    trainable = [p for p in step.module.parameters() if p.requires_grad]
    exclude = parameter_storages(step.module, backbone.model)
    # Saved-for-backward bytes of the forward alone.
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    with saved_tensors(exclude) as saved:
        logits = step.run()
    loss = nn.functional.cross_entropy(logits, targets)
    torch.autograd.backward(loss)
    del logits, loss
    step.module.zero_grad(set_to_none=True)
    # Peak of a whole fresh step (optimizer state allocated inside it, as in a first step).
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    tracker = TensorBytesTracker()
    with tracker:
        train_step(step, optimizer, targets)
    peak = tracker.peak
    times = []
    for _ in range(TIMED_STEPS + 1):
        started = time.perf_counter()
        train_step(step, optimizer, targets)
        times.append(time.perf_counter() - started)
    step.module.zero_grad(set_to_none=True)
    return {
        "peak_bytes": float(peak),
        "saved_bytes": float(saved.nbytes),
        "step_s": min(times[1:]),
    }


def run_model(arch: str, batch: int, seed: int = 0) -> dict[str, Any]:
    """Every variant on one backbone (random weights: memory and time do not depend on them)."""
    backbone = load_backbone(arch, f"random:{seed}")
    _, height, width = backbone.data_config.input_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    targets = torch.randint(0, CLASSES, (batch,), generator=generator)
    variants = {
        step.name: measure(step, targets, backbone) for step in make_steps(backbone, images, seed)
    }
    inside = variants["inside"]
    for name, values in variants.items():
        if name != "inside":
            values["peak_change_pct"] = round(
                100.0 * (values["peak_bytes"] / inside["peak_bytes"] - 1), 1
            )
            values["step_time_ratio"] = round(values["step_s"] / inside["step_s"], 3)
    tokens = (height // backbone.config.patch_size) * (width // backbone.config.patch_size) + 1
    return {"arch": arch, "batch": batch, "tokens": tokens, "variants": variants}


def run(quick: bool = False) -> dict[str, Any]:
    """The measurement; ``quick`` uses the tiny test backbone only."""
    models = QUICK_MODELS if quick else FULL_MODELS
    return {
        "method": (
            "CPU; peak = max live bytes of tensor storages created by aten ops during one "
            "training step (TorchDispatchMode + weakrefs on storages; weights and inputs "
            "excluded); saved = bytes autograd keeps for backward (saved_tensors_hooks, "
            "unique storages, parameters excluded); step_s = best of "
            f"{TIMED_STEPS} steps"
        ),
        "paper_peak_change_pct": PAPER_REDUCTION_PCT,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "models": [run_model(arch, QUICK_BATCH if quick else BATCH) for arch in models],
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A readable table of :func:`run`'s result."""
    lines = [f"paper: bypass training memory {result['paper_peak_change_pct']:+.1f}%"]
    for model in result["models"]:
        lines.append(f"{model['arch']} batch {model['batch']} ({model['tokens']} tokens)")
        for name, v in model["variants"].items():
            change = f" ({v['peak_change_pct']:+.1f}% vs inside)" if "peak_change_pct" in v else ""
            lines.append(
                f"  {name:18s} peak {v['peak_bytes'] / 2**20:9.1f} MiB{change}  "
                f"saved {v['saved_bytes'] / 2**20:8.1f} MiB  step {v['step_s'] * 1000:8.1f} ms"
            )
    return lines


def main() -> None:
    """CLI: run, print a table, write ``bench/results/training_memory.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.quick)
    print("\n".join(summary_lines(result)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

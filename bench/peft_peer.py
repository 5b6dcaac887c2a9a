"""One forward for many tasks, side by side with the peer a user would pick today.

Serving K tasks per image at batch 8, measured in one process, K block after K block:

(a) the peer: Hugging Face ``transformers`` ``ViTForImageClassification`` of the same size
    (random weights, no hub) with K PEFT LoRA adapters (r = 8 on query/value, a classifier
    per task via ``modules_to_save``), served

    - ``peft_switch``: ``set_adapter`` per task, one forward per task;
    - ``peft_mixed``: PEFT's mixed-adapter batch, one forward of batch x K rows with
      ``adapter_names=`` (when the installed PEFT supports it for this model);

(b) ``ours_loop``: our backbone's ``forward_features`` (all tokens, every layer) and K
    mean-pooled res_adapter bypasses (r = 8, all blocks) run one by one;
(c) ``ours_stacked``: the same K all-token tasks as batched ops over a task axis;
(d) ``ours_cls``: K CLS-pooled tasks on CLS rows only (capture + fan-out), the serving path.

Each side is a multiple of ITS OWN plain forward (one ``ViTForImageClassification`` forward
for the peer, one ``VisionTransformer`` forward for us) timed just before and just after each
call (:func:`bench.timing.bracketed`), so load bursts elsewhere on the machine and the
backbones' speed difference cancels; absolute images/s and task-predictions/s are reported
too. Also reported per K: the ratio of the peer's cost to ours, the paper's ratio (5.2x at
19 tasks), our speed-up over K separate copies of our own one-task path, and the ideal
speed-up K(Tb+Tt)/(Tb+K Tt) for Tb = one plain forward and Tt = one CLS task's fan-out.

Run: ``python -m bench.peft_peer [--quick]`` -> ``bench/results/peft_peer.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import timing
from bench.timing import Bracketed, bracketed, median_ms
from restuning.backbone import TorchBackbone, load_backbone
from restuning.fanout import StackedGroup, Strategy
from restuning.features import FeatureSpec
from restuning.presets import get_preset
from restuning.tuners import TaskModule, init_task
from tuners_store.config import BackboneRef, BypassConfig, Pooling, TunerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "peft_peer.json"
BATCH = 8
CLASSES = 100
RANK = 8
"""LoRA rank of the peer and bottleneck of our res_adapters: the same per-task width."""
PAPER_RATIO = {19: 2953.1 / 564.3}
"""Res-Tuning-Bypass vs full fine-tuning, 19 VTAB tasks (paper: 5.2x)."""
PAPER_GENERATIVE = {"tasks": 10, "ratio": 25.40 / 4.17}
"""Stable Diffusion v1.5, 10 generative tasks (paper: 6.1x); no K = 10 row here."""
GOAL_X_AT_19 = 1.15
"""Our goal: K = 19 CLS tasks cost at most this many plain forwards."""
METHODS = ("peft_switch", "peft_mixed", "ours_loop", "ours_stacked", "ours_cls")
PEFT_METHODS = ("peft_switch", "peft_mixed")
OURS_REPEATS = 2


@dataclass(frozen=True)
class ArchPlan:
    """What one backbone size runs: rounds, and the K values of each peer method."""

    arch: str
    rounds: int
    switch_counts: tuple[int, ...]
    """K values the peer runs by switching adapters (it costs K forwards)."""
    mixed_counts: tuple[int, ...]
    """K values of the peer's mixed-adapter batch (it costs about K forwards)."""


@dataclass(frozen=True)
class Profile:
    """Sizes of one run."""

    plans: tuple[ArchPlan, ...]
    task_counts: tuple[int, ...]
    """K values our engine runs (every size)."""
    batch: int = BATCH

    @staticmethod
    def peer_repeats(k: int) -> int:
        """Repeats of the peer's methods in a K block: K forwards average themselves, so
        only small K repeats (our side, about one forward per method, gets OURS_REPEATS)."""
        return max(1, -(-2 // k))


ALL_COUNTS = (1, 2, 4, 8, 16, 19, 32, 64)
QUOTED_COUNTS = (1, 4, 16, 19, 64)
"""The K values the issue quotes the peer's switching cost at."""


def profile(quick: bool, smoke: bool) -> Profile:
    """Smoke: tiny backbone, seconds. Quick: ViT-S/16 in one round, the peer at the K values
    the issue quotes (a few minutes on 2 cores). Full: ViT-S/16 in 2 rounds with every method
    at every K, and ViT-B/16 in one (its mixed batch up to K = 19: at 64 it is 512 rows)."""
    if smoke:
        return Profile((ArchPlan("vit_test_tiny", 1, (1, 2), (1, 2)),), (1, 2), batch=2)
    small = "vit_small_patch16_224"
    if quick:
        return Profile((ArchPlan(small, 1, QUOTED_COUNTS, (1, 4, 19)),), ALL_COUNTS)
    return Profile(
        (
            ArchPlan(small, 2, ALL_COUNTS, ALL_COUNTS),
            ArchPlan("vit_base_patch16_224", 1, ALL_COUNTS, (1, 2, 4, 8, 16, 19)),
        ),
        ALL_COUNTS,
    )


# --------------------------------------------------------------------------- the peer (a)


def hf_vit_config(arch: str, classes: int) -> Any:
    """A ``transformers.ViTConfig`` with our preset's sizes (width, depth, heads, MLP, image)."""
    from transformers import ViTConfig

    vit = get_preset(arch).vit
    return ViTConfig(  # type: ignore[call-arg]  # ViT's own fields, **kwargs to mypy
        hidden_size=vit.embed_dim,
        num_hidden_layers=vit.depth,
        num_attention_heads=vit.num_heads,
        intermediate_size=int(vit.embed_dim * vit.mlp_ratio),
        image_size=vit.img_size,
        patch_size=vit.patch_size,
        qkv_bias=vit.qkv_bias,
        num_labels=classes,
    )


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the attention query/value projections (transformers renamed them in v5)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for query, value in (("q_proj", "v_proj"), ("query", "value")):
        if {query, value} <= leaves:
            return [query, value]
    raise RuntimeError(f"no query/value projections among {sorted(leaves)}")


class PeftPeer:
    """A plain HF ViT and a PEFT model over a copy of it holding ``tasks`` LoRA adapters."""

    def __init__(self, arch: str, tasks: int, *, classes: int = CLASSES, seed: int = 0) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import ViTForImageClassification

        config = hf_vit_config(arch, classes)
        torch.manual_seed(seed)
        self.plain_model = ViTForImageClassification(config)
        base = ViTForImageClassification(config)
        self.plain_model.requires_grad_(False).train(False)
        base.load_state_dict(self.plain_model.state_dict())
        lora = LoraConfig(
            r=RANK,
            lora_alpha=2 * RANK,
            target_modules=lora_targets(base),
            modules_to_save=["classifier"],
            # Random A and B (not B = 0) so no adapter is a no-op; the cost is the same.
            init_lora_weights=False,
        )
        self.names = [f"task{i:02d}" for i in range(tasks)]
        self.model = get_peft_model(base, lora, adapter_name=self.names[0])
        for name in self.names[1:]:
            self.model.add_adapter(name, lora)
        self.model.train(False)
        self.attention = str(getattr(config, "_attn_implementation", None))

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """One forward of the plain model (no adapter): logits (B, C)."""
        with torch.inference_mode():
            logits: torch.Tensor = self.plain_model(pixel_values=images).logits
            return logits

    def switching(self, images: torch.Tensor, k: int) -> list[torch.Tensor]:
        """K tasks by switching the active adapter: K forwards, logits (B, C) each."""
        out = []
        with torch.inference_mode():
            for name in self.names[:k]:
                self.model.set_adapter(name)
                out.append(self.model(pixel_values=images).logits)
        return out

    def mixed(self, images: torch.Tensor, k: int) -> torch.Tensor:
        """K tasks in PEFT's mixed-adapter batch: one forward of (K*B) rows -> (K*B, C)."""
        batch = images.shape[0]
        rows = images.repeat(k, 1, 1, 1)  # (K*B, 3, H, W), task-major
        adapter_names = [name for name in self.names[:k] for _ in range(batch)]
        with torch.inference_mode():
            logits: torch.Tensor = self.model(pixel_values=rows, adapter_names=adapter_names).logits
            return logits


# --------------------------------------------------------------------------- ours (b, c, d)


def task_config(name: str, backbone: TorchBackbone, pooling: Pooling) -> TunerConfig:
    """A classification res_adapter (r = RANK) on every block of ``backbone``."""
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
        bypass=BypassConfig(layers=(1, backbone.depth), bottleneck=RANK),
        pooling=pooling,
    )


class OursSide:
    """Our backbone and K tasks per pooling, with the groups built before any timing."""

    def __init__(self, arch: str, task_counts: tuple[int, ...]) -> None:
        self.backbone = load_backbone(arch, "random:0")
        layers = tuple(range(self.backbone.depth + 1))
        self.all_spec = FeatureSpec(layers, "all")
        self.cls_spec = FeatureSpec(layers, "cls")
        most = max(task_counts)
        tasks: dict[Pooling, list[TaskModule]] = {
            pooling: [
                init_task(
                    task_config(f"{pooling}{i:02d}", self.backbone, pooling),
                    self.backbone.final_norm,
                    seed=i,
                )
                for i in range(most)
            ]
            for pooling in ("cls", "mean")
        }
        # Building a stacked group copies weights: what registration pays, not a request.
        self.groups: dict[tuple[str, int], StackedGroup] = {}
        plan: tuple[tuple[str, Pooling, Strategy], ...] = (
            ("loop", "mean", "loop"),
            ("stacked", "mean", "stacked"),
            ("cls", "cls", "auto"),  # what the engine picks: a loop for one task, else stacked
        )
        for k in task_counts:
            for label, pooling, strategy in plan:
                self.groups[(label, k)] = StackedGroup(tasks[pooling][:k], strategy)

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """One plain forward: every block and the final norm over all tokens (B, N, D)."""
        with torch.inference_mode():
            out: torch.Tensor = self.backbone.model(images)
            return out

    def serve(self, images: torch.Tensor, k: int, label: str) -> list[torch.Tensor]:
        """Capture what group ``label`` needs and fan out to its K tasks: K x (B, C)."""
        group = self.groups[(label, k)]
        spec = self.cls_spec if label == "cls" else self.all_spec
        features = self.backbone.forward_features(images, spec)  # (L+1, B, N', D)
        rows = [torch.arange(images.shape[0])] * k
        return group(features, rows)

    def cls_fanout_ms(self, images: torch.Tensor, k: int, repeats: int) -> float:
        """The fan-out alone of K CLS tasks on captured CLS rows (median ms)."""
        features = self.backbone.forward_features(images, self.cls_spec)
        rows = [torch.arange(images.shape[0])] * k
        group = self.groups[("cls", k)]
        return median_ms(lambda: group(features, rows), repeats=repeats, clock=timing.clock())


# --------------------------------------------------------------------------- measurement


def _peft_mixed_supported(peer: PeftPeer, images: torch.Tensor) -> str | None:
    """None when the mixed-adapter batch runs here, else why not."""
    try:
        logits = peer.mixed(images[:1], min(2, len(peer.names)))
    except Exception as exc:  # any failure means the peer cannot serve this way
        return f"{type(exc).__name__}: {exc}"
    return None if logits.shape[0] == min(2, len(peer.names)) else "wrong output rows"


def measure_arch(plan: ArchPlan, prof: Profile) -> dict[str, Any]:
    """Every method at every K for one backbone size, bracketed by plain forwards."""
    arch = plan.arch
    vit = get_preset(arch).vit
    images = torch.randn(
        prof.batch, 3, vit.img_size, vit.img_size, generator=torch.Generator().manual_seed(0)
    )  # (B, 3, H, W)
    peer = PeftPeer(arch, max(plan.switch_counts + plan.mixed_counts))
    ours = OursSide(arch, prof.task_counts)
    mixed_unsupported = _peft_mixed_supported(peer, images)

    # Warm-up: allocator, oneDNN primitives, PEFT's first-call paths.
    for _ in range(2):
        peer.plain(images)
        ours.plain(images)
    k0 = min(prof.task_counts)
    peer.switching(images, k0)
    if mixed_unsupported is None:
        peer.mixed(images, k0)
    for label in ("loop", "stacked", "cls"):
        ours.serve(images, k0, label)

    clock = timing.clock()
    blocks: dict[int, list[tuple[Bracketed, Bracketed]]] = {k: [] for k in prof.task_counts}
    for _ in range(plan.rounds):
        for k in prof.task_counts:
            peer_methods: dict[str, Callable[[], object]] = {}
            if k in plan.switch_counts:
                peer_methods["peft_switch"] = partial(peer.switching, images, k)
            if k in plan.mixed_counts and mixed_unsupported is None:
                peer_methods["peft_mixed"] = partial(peer.mixed, images, k)
            ours_methods: dict[str, Callable[[], object]] = {
                f"ours_{label}": partial(ours.serve, images, k, label)
                for label in ("loop", "stacked", "cls")
            }
            # Each side between calls of its own plain forward: ratios against neighbours.
            peer_plain = partial(peer.plain, images)
            peer_block = bracketed(
                peer_plain, peer_methods, repeats=prof.peer_repeats(k), clock=clock
            )
            ours_block = bracketed(
                partial(ours.plain, images), ours_methods, repeats=OURS_REPEATS, clock=clock
            )
            blocks[k].append((peer_block, ours_block))
    cls_fanout = {k: ours.cls_fanout_ms(images, k, repeats=5) for k in prof.task_counts}
    result = _summarise(arch, plan.rounds, prof, blocks, cls_fanout)
    result["peer"] = {
        "model": "transformers ViTForImageClassification (random init) + PEFT LoRA",
        "lora": {"r": RANK, "alpha": 2 * RANK, "targets": lora_targets(peer.plain_model)},
        "switch_counts": list(plan.switch_counts),
        "mixed_counts": list(plan.mixed_counts),
        "modules_to_save": ["classifier"],
        "attention": peer.attention,
        "mixed_batch": "supported" if mixed_unsupported is None else mixed_unsupported,
    }
    return result


def _summarise(
    arch: str,
    rounds: int,
    prof: Profile,
    blocks: dict[int, list[tuple[Bracketed, Bracketed]]],
    cls_fanout: dict[int, float],
) -> dict[str, Any]:
    """Medians of bracketed ratios and times, and the derived speed-ups of one size."""

    def pooled(k: int, side: int, field: str, name: str = "") -> list[float]:
        out: list[float] = []
        for pair in blocks[k]:
            b = pair[side]
            if field == "reference":
                out += b.reference
            elif name in b.times:
                out += b.times[name] if field == "times" else b.ratios[name]
        return out

    plain = {
        side: [t for k in prof.task_counts for t in pooled(k, i, "reference")]
        for i, side in enumerate(("peft", "ours"))
    }
    tb = statistics.median(plain["ours"])
    tt = cls_fanout[min(prof.task_counts)] / min(prof.task_counts)
    one_task_cls_x: float | None = None
    rows = []
    for k in prof.task_counts:
        row: dict[str, Any] = {"K": k}
        for method in METHODS:
            side = 0 if method in PEFT_METHODS else 1
            times = pooled(k, side, "times", method)
            if not times:
                row[method] = None
                continue
            ms = statistics.median(times)
            row[method] = {
                "ms": round(ms, 2),
                "x_plain": round(statistics.median(pooled(k, side, "ratios", method)), 3),
                "images_per_s": round(prof.batch * 1000.0 / ms, 2),
                "task_predictions_per_s": round(k * prof.batch * 1000.0 / ms, 1),
            }
        ours_x = row["ours_cls"]["x_plain"]
        if one_task_cls_x is None:
            one_task_cls_x = ours_x / k
        row["cls_fanout_ms"] = round(cls_fanout[k], 3)
        for method in PEFT_METHODS:
            peer_x = row[method]["x_plain"] if row[method] else None
            row[f"ratio_vs_{method}"] = round(peer_x / ours_x, 2) if peer_x else None
        row["speedup_vs_separate_copies"] = round(k * one_task_cls_x / ours_x, 2)
        row["ideal_speedup"] = round(k * (tb + tt) / (tb + k * tt), 2)
        row["paper_ratio"] = round(PAPER_RATIO[k], 2) if k in PAPER_RATIO else None
        rows.append(row)
    return {
        "arch": arch,
        "batch": prof.batch,
        "rounds": rounds,
        "plain_forward_ms": {
            "peft": round(statistics.median(plain["peft"]), 2),
            "ours": round(tb, 2),
        },
        "plain_images_per_s": {
            side: round(prof.batch * 1000.0 / statistics.median(v), 2) for side, v in plain.items()
        },
        "Tb_ms": round(tb, 2),
        "Tt_ms": round(tt, 3),
        "rows": rows,
    }


def run(quick: bool = False, *, smoke: bool = False) -> dict[str, Any]:
    """Measure every backbone size of the profile; returns the JSON-able report."""
    torch.set_num_threads(timing.threads())
    prof = profile(quick, smoke)
    import peft
    import transformers

    return {
        "bench": "peft_peer",
        "profile": "smoke" if smoke else "quick" if quick else "full",
        "threads": torch.get_num_threads(),
        "clock": timing.clock(),
        "classes": CLASSES,
        "ours": {
            "tuner": "res_adapter",
            "bottleneck": RANK,
            "layers": "all",
            "loop_and_stacked": "mean pooling, all tokens of every layer",
            "cls": "CLS pooling, CLS rows only; engine's strategy (loop for K=1, else stacked)",
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "paper": {"ratio_at_19": round(PAPER_RATIO[19], 2), "generative": PAPER_GENERATIVE},
        "goal_x_plain_at_19": GOAL_X_AT_19,
        "unit": "x_plain = median over calls of (a call's time / the mean of the plain "
        "forwards of the same side just before and after it); ms = median time per batch "
        "on the run's clock; per K block and round, the peer's methods run ceil(2/K) times, "
        f"ours {OURS_REPEATS} times",
        "archs": [measure_arch(plan, prof) for plan in prof.plans],
    }


def main() -> None:
    """CLI: run, print a table and write ``bench/results/peft_peer.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S/16 only, fewer rounds")
    parser.add_argument("--smoke", action="store_true", help="tiny backbone, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    timing.configure(clock=args.clock, threads=args.threads)
    report = run(args.quick, smoke=args.smoke)
    for entry in report["archs"]:
        print(f"{entry['arch']} batch {entry['batch']}: plain {entry['plain_forward_ms']} ms")
        for row in entry["rows"]:
            cells = "  ".join(
                f"{m} {row[m]['x_plain']:.2f}x" for m in METHODS if row[m] is not None
            )
            print(f"  K={row['K']:>2}  {cells}  vs PEFT {row['ratio_vs_peft_switch']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

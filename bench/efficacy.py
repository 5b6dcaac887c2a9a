"""Accuracy: when does a Res-Tuning bypass beat a linear probe on the same frozen backbone?

Speed alone does not justify a bypass: one frozen forward plus K linear heads on the CLS token
also costs ~1x a forward. This section trains, on identical splits and seeds, every method a
server could offer on one frozen backbone and reports test accuracy next to what the method
costs when K = 19 tasks are served together:

- ``probe-cls``: logistic regression on the backbone's output CLS token (final norm applied);
  its L2 strength is picked on the validation split.
- ``probe-cls+mean``: the same on [CLS, mean of the patch tokens].
- ``adapter-cls``: bypass of Res-Adapters on every block, CLS rows only (the server default).
- ``adapter-cls-top6``: the same on the last 6 blocks only.
- ``adapter-mean``: bypass of Res-Adapters on all tokens, mean-pooled.
- ``prefix-cls``, ``prompt-cls``: Res-Prefix / Res-Prompt bypasses, CLS rows only.
- ``prefix-paper-cls``: Res-Prefix as the paper defines it: queries from the backbone's own
  frozen attention (see :class:`FrozenQueryPrefix`), only the prefix keys and values learned.
- ``inner-adapter``: the paper's baseline, adapters inside the backbone after every block
  (same blocks and rank), trained end to end through the frozen backbone: every task then
  needs its own backbone forward.

Bypass methods are trained by the trainer itself (``restuning.train.train_task``: same split
into train / validation, best epoch kept) on one shared :class:`FeatureCache`, so each image
goes through the backbone once and all probes and bypasses read those features. Each method's
final model is then scored once on the held-out test set.

Tasks: the generated structured suite and photo crops (``bench.datasets_structured``) and the
demo digits (textures too in the full profile). The backbone is the embedded DINOv2 ViT-S/14
with its real weights, fed 112 px images (an 8 x 8 patch grid: a quarter of the 224 px cost).
The shared cache holds every layer's tokens of a task's images in memory (1.3 MB an image at
112 px; 5 MB at 224 px would need ~8 GB for the full profile's 1,500 images a task).

Serving cost per method is measured here, on this backbone and input size, as a multiple of
one plain backbone forward at batch 8 with K = 19 tasks: capture + the stacked fan-out of 19
bypasses (``restuning.fanout.StackedGroup``, as ``bench.fanout_cost`` measures it), capture +
19 linear heads for the probes, 19 adapter-carrying forwards for ``inner-adapter``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import timing
from bench.datasets_structured import STRUCTURED, TaskSplit, task_split
from bench.fanout_cost import Timer
from restuning.backbone import TorchBackbone, load_backbone
from restuning.fanout import StackedGroup
from restuning.features import Features, FeatureSpec
from restuning.heads import loss_fn
from restuning.preprocess import preprocess_batch
from restuning.train.api import TaskOptions, build_config, frozen_norm_copy, train_task
from restuning.train.data import LabeledImages, split_indices
from restuning.train.demo_data import load_demo
from restuning.train.feature_cache import FeatureCache
from restuning.train.loop import (
    Objective,
    TensorRows,
    TrainOptions,
    fit,
    lr_factor,
    predict,
)
from restuning.train.metrics import evaluate
from restuning.tuners import TaskModule, init_task
from restuning.tuners.base import PREFIX_INIT_STD
from restuning.tuners.res_adapter import ResAdapter
from restuning.vit import Block
from tuners_store.config import SIDES, BypassConfig, Pooling, TunerConfig, TunerKind

ProfileName = Literal["smoke", "quick", "full"]
SERVE_K = 19
"""Tasks served together for the cost column (VTAB's 19)."""
SERVE_BATCH = 8
BOTTLENECK = 32
VAL_FRACTION = 0.2
"""Share of each training set the trainer holds out to pick the best epoch (and the probes
their L2 strength): VTAB-1k's 800 / 200."""
WIN_MARGIN = 1e-6
"""A margin (accuracy, 0..1) above this counts as a win: equal accuracies are not one."""
PROBE_C = (0.01, 0.1, 1.0, 10.0)
"""Inverse L2 strengths tried by the linear probes on the validation split."""


@dataclass(frozen=True)
class Method:
    """One way to get a task's answer out of the frozen backbone."""

    name: str
    kind: Literal["probe", "bypass", "inner"]
    tuner: TunerKind = "res_adapter"
    pooling: Pooling = "cls"
    top_layers: int | None = None
    """Bypass over the last this many blocks only (None: every block)."""
    probe_mean: bool = False
    """Probe on [CLS, mean of patch tokens] instead of CLS alone."""
    frozen_query: bool = False
    """Res-Prefix in the paper's form (:class:`FrozenQueryPrefix`) instead of the learned query."""
    note: str = ""


METHODS: tuple[Method, ...] = (
    Method("probe-cls", "probe", note="linear head on the output CLS token"),
    Method("probe-cls+mean", "probe", probe_mean=True, note="linear head on [CLS, mean patch]"),
    Method("adapter-cls", "bypass", note="Res-Adapter bypass, every block, CLS rows"),
    Method("adapter-cls-top6", "bypass", top_layers=6, note="the same on the last 6 blocks"),
    Method("adapter-mean", "bypass", pooling="mean", note="Res-Adapter bypass, all tokens, mean"),
    Method("prefix-cls", "bypass", tuner="res_prefix", note="Res-Prefix bypass, CLS rows"),
    Method(
        "prefix-paper-cls",
        "bypass",
        tuner="res_prefix",
        frozen_query=True,
        note="Res-Prefix with the backbone's frozen query and output projections, CLS rows",
    ),
    Method("prompt-cls", "bypass", tuner="res_prompt", note="Res-Prompt bypass, CLS rows"),
    Method("inner-adapter", "inner", note="adapters inside the backbone, end to end"),
)
BY_NAME = {m.name: m for m in METHODS}


@dataclass(frozen=True)
class Profile:
    """Sizes of one run."""

    arch: str
    weights: Literal["embedded", "random"]
    side: int
    """Input side in pixels fed to the backbone."""
    train_size: int
    test_size: int
    seeds: tuple[int, ...]
    epochs: int
    """Most epochs of a bypass; training stops after ``patience`` epochs without a better
    validation accuracy (the best epoch's weights are kept)."""
    inner_epochs: int
    inner_tasks: tuple[str, ...] | None
    """Tasks ``inner-adapter`` runs on (None: all): its end-to-end training is the slow part."""
    demo_per_class: int
    structured: tuple[str, ...] = (*STRUCTURED, "photo-crops")
    demo: tuple[str, ...] = ("digits", "textures")
    serve_repeats: int = 5
    batch_size: int = 16
    patience: int | None = None

    def train_options(self, seed: int) -> TrainOptions:
        """The schedule of every bypass and of ``inner-adapter`` (AdamW 1e-3, warm-up + cosine,
        best validation epoch kept): with 160 training images and 16 a step, 30 epochs are 300
        steps. The trainer's former default (64 a step) gave 90 steps, too few to fit a
        spatial task (loc-x: 15% test accuracy after 60 steps of 64, 29% after 1,000 steps of
        16); early stopping on 40 validation images stopped runs at noise."""
        return TrainOptions(
            epochs=self.epochs, batch_size=self.batch_size, patience=self.patience, seed=seed
        )


PROFILES: dict[ProfileName, Profile] = {
    "smoke": Profile(
        "vit_test_tiny",
        "random",
        32,
        train_size=24,
        test_size=12,
        seeds=(0,),
        epochs=2,
        inner_epochs=1,
        patience=None,
        inner_tasks=("count",),
        demo_per_class=3,
        structured=("loc-x", "count"),
        demo=("digits",),
        serve_repeats=1,
    ),
    "quick": Profile(
        "vit_small_patch14_dinov2",
        "embedded",
        112,
        train_size=200,
        test_size=150,
        seeds=(0,),
        epochs=30,
        inner_epochs=8,
        inner_tasks=("count",),
        demo_per_class=30,
        demo=("digits",),
    ),
    "full": Profile(
        "vit_small_patch14_dinov2",
        "embedded",
        112,
        train_size=1000,
        test_size=500,
        seeds=(0, 1, 2),
        epochs=30,
        inner_epochs=10,
        batch_size=32,
        inner_tasks=("loc-x", "count"),
        demo_per_class=100,
    ),
}


# ---------------------------------------------------------------------------- data


def demo_split(name: str, per_class: int, seed: int) -> TaskSplit:
    """A demo set as train / test: its fixed split where it has one, else a seeded 30% test."""
    data = load_demo(name, per_class)
    if data.val_mask is not None:
        mask = np.asarray(data.val_mask, dtype=bool)
        train, test = np.flatnonzero(~mask), np.flatnonzero(mask)
    else:
        train, test = split_indices(data, 0.3, seed)
    return TaskSplit(name, "demo", data.subset(train), data.subset(test))


def suite(profile: Profile, seed: int = 0) -> list[TaskSplit]:
    """Every task of ``profile``, generated or loaded from ``seed`` (the data seed is fixed:
    the training seeds vary the trainer only)."""
    tasks = [task_split(t, profile.train_size, profile.test_size, seed) for t in profile.structured]
    tasks += [demo_split(name, profile.demo_per_class, seed) for name in profile.demo]
    return tasks


def load(profile: Profile) -> TorchBackbone:
    """The profile's backbone, fed ``profile.side`` px images."""
    if profile.weights == "embedded":
        from restuning.embedded import default_backbone

        arch, weights = default_backbone()
        backbone = load_backbone(arch, weights)
    else:
        backbone = load_backbone(profile.arch, "random:0")
    side = profile.side
    backbone.data_config = dataclasses.replace(backbone.data_config, input_size=(3, side, side))
    return backbone


# ---------------------------------------------------------------------------- methods


@dataclass
class Score:
    """One method's outcome on one task and seed."""

    test_accuracy: float
    val_accuracy: float
    train_seconds: float


def _accuracy(logits: Tensor, targets: Tensor) -> float:
    return float((logits.argmax(dim=-1) == targets).double().mean())


def probe_inputs(features: Features, norm: nn.LayerNorm, with_mean: bool) -> np.ndarray:
    """(n, D) or (n, 2D) probe inputs: the final-normed CLS token [, mean of patch tokens]."""
    last = features.spec.layers[-1]
    with torch.no_grad():
        z = norm(features.layer(last))  # (n, N', D)
        parts = [z[:, 0]]
        if with_mean:
            parts.append(z[:, 1:].mean(dim=1))
        return torch.cat(parts, dim=-1).numpy().astype(np.float64)


def train_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    seed: int,
) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """Logistic regression on standardised inputs, L2 strength picked on validation; returns
    (predict classes, best validation accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best: tuple[float, Any] | None = None
    for c in PROBE_C:
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed)
        )
        model.fit(train_x, train_y)
        score = float((model.predict(val_x) == val_y).mean()) if len(val_y) else 0.0
        if best is None or score > best[0]:
            best = (score, model)
    assert best is not None
    model = best[1]
    return (lambda x: np.asarray(model.predict(x))), best[0]


def run_probe(
    task: TaskSplit, cache: FeatureCache, norm: nn.LayerNorm, method: Method, seed: int
) -> Score:
    started = time.perf_counter()
    train_idx, val_idx = split_indices(task.train, VAL_FRACTION, seed)
    feats = Features(cache.spec, cache.features(list(task.train.images)))
    x = probe_inputs(feats, norm, method.probe_mean)
    y = task.train.targets.numpy()
    predict_fn, val_acc = train_probe(x[train_idx], y[train_idx], x[val_idx], y[val_idx], seed)
    seconds = time.perf_counter() - started
    test = Features(cache.spec, cache.features(list(task.test.images)))
    test_pred = predict_fn(probe_inputs(test, norm, method.probe_mean))
    test_acc = float((test_pred == task.test.targets.numpy()).mean())
    return Score(test_acc, val_acc, seconds)


def task_options(method: Method, depth: int) -> TaskOptions:
    """The trainer's options for a bypass ``method`` on a ``depth``-block backbone."""
    layers = (max(1, depth - method.top_layers + 1), depth) if method.top_layers else None
    return TaskOptions(
        tuner=method.tuner, pooling=method.pooling, layers=layers, bottleneck=BOTTLENECK
    )


def run_bypass(
    task: TaskSplit,
    cache: FeatureCache,
    backbone: TorchBackbone,
    method: Method,
    options: TrainOptions,
) -> Score:
    trained = train_task(
        task.train,
        task.name,
        backbone,
        task=task_options(method, backbone.depth),
        options=options,
        cache=cache,
        val_fraction=VAL_FRACTION,
        progress=False,
    )
    summary = trained.summary
    test = cache.features(list(task.test.images))  # (L', n, N', D)
    logits = predict(trained.module, cache.spec, test, 256)
    return Score(
        _accuracy(logits, task.test.targets),
        float(summary.val_score or 0.0),
        float(summary.extra["train_seconds"]),
    )


class FrozenQueryPrefix(nn.Module):
    """Res-Prefix in the paper's form beside block ``l``:

        t + W_o MHA(W_q LN1(t), K_pre, V_pre) + b_o

    with the block's own frozen LN1, query projection W_q (and bias) and output projection
    W_o, b_o (layer scale left out: the tuner is a parallel branch with scale 1), split into
    the block's heads; only the P prefix keys and values (P, D) are learned. The learned-query
    form (``restuning.tuners.res_prefix``) instead learns W_q (r, D), K, V (P, r), W_o (D, r).
    """

    ln_weight: Tensor
    ln_bias: Tensor
    wq: Tensor
    bq: Tensor
    wo: Tensor
    bo: Tensor

    def __init__(self, block: Block, prefix_len: int, generator: torch.Generator) -> None:
        super().__init__()
        attn = block.attn
        dim = attn.proj.in_features
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        self.k = nn.Parameter(torch.empty(prefix_len, dim))
        self.v = nn.Parameter(torch.empty(prefix_len, dim))
        nn.init.normal_(self.k, std=PREFIX_INIT_STD, generator=generator)
        nn.init.normal_(self.v, std=PREFIX_INIT_STD, generator=generator)
        qkv_bias = attn.qkv.bias
        frozen = {
            "ln_weight": block.norm1.weight,
            "ln_bias": block.norm1.bias,
            "wq": attn.qkv.weight[:dim],
            "bq": qkv_bias[:dim] if qkv_bias is not None else torch.zeros(dim),
            "wo": attn.proj.weight,
            "bo": attn.proj.bias,
        }
        for name, tensor in frozen.items():
            self.register_buffer(name, tensor.detach().clone(), persistent=False)
        self.eps = block.norm1.eps

    def forward(self, t: Tensor) -> Tensor:  # (B, N', D) -> (B, N', D)
        batch, tokens, dim = t.shape
        normed = F.layer_norm(t, (dim,), self.ln_weight, self.ln_bias, self.eps)
        q = F.linear(normed, self.wq, self.bq)  # (B, N', D)
        q = q.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N', hd)
        k = self.k.view(-1, self.heads, self.head_dim).transpose(0, 1)  # (H, P, hd)
        v = self.v.view(-1, self.heads, self.head_dim).transpose(0, 1)  # (H, P, hd)
        out = F.scaled_dot_product_attention(
            q, k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        )
        merged = out.transpose(1, 2).reshape(batch, tokens, dim)  # (B, N', D)
        return t + F.linear(merged, self.wo, self.bo)


def frozen_query_task(backbone: TorchBackbone, config: TunerConfig, seed: int) -> TaskModule:
    """A task module whose bypass tuners are :class:`FrozenQueryPrefix` (lateral and vertical
    at bypass layer l both use block l's attention); head init as ``init_task``."""
    module = init_task(config, frozen_norm_copy(backbone.final_norm), seed)
    generator = torch.Generator().manual_seed(seed)
    blocks = backbone.model.blocks
    for side in SIDES:
        tuners = nn.ModuleDict(
            {
                str(layer): FrozenQueryPrefix(
                    cast(Block, blocks[layer - 1]), config.bypass.prefix_len, generator
                )
                for layer in config.bypass.block_range
            }
        )
        setattr(module.bypass, side, tuners)
    return module


def run_frozen_query_prefix(
    task: TaskSplit, cache: FeatureCache, backbone: TorchBackbone, options: TrainOptions
) -> Score:
    """The trainer's loop (``loop.fit``: same optimiser, schedule, split, best epoch) on a
    :func:`frozen_query_task`; this form has no artifact layout, so ``train_task`` cannot
    build it."""
    method = BY_NAME["prefix-paper-cls"]
    config = build_config(task.name, task.train, backbone, task_options(method, backbone.depth))
    module = frozen_query_task(backbone, config, options.seed)
    train_idx, val_idx = split_indices(task.train, VAL_FRACTION, options.seed)
    spec = module.feature_spec
    data = Features(cache.spec, cache.features(list(task.train.images))).select(spec).data
    train_data = data[:, torch.from_numpy(train_idx)].contiguous()  # (L', n, 1, D)
    targets = task.train.targets
    objective = Objective(
        loss_fn(config), lambda out, y: evaluate("classification", out, y), "accuracy"
    )
    result = fit(
        module,
        TensorRows(train_data),
        targets[torch.from_numpy(train_idx)],
        TensorRows(data[:, torch.from_numpy(val_idx)].contiguous()),
        targets[torch.from_numpy(val_idx)],
        objective,
        options,
    )
    test = cache.features(list(task.test.images))  # (L', n, N', D)
    logits = predict(module, cache.spec, test, 256)
    return Score(
        _accuracy(logits, task.test.targets), result.val.get("accuracy", 0.0), result.seconds
    )


class InnerAdapters(nn.Module):
    """The frozen backbone with a Res-Adapter after every block (``t + W2 GELU(W1 t)``, the
    output projection zeroed so training starts from the plain backbone), then the final norm,
    the CLS token and a linear head. Gradients flow through every block."""

    def __init__(self, backbone: TorchBackbone, classes: int, seed: int) -> None:
        super().__init__()
        self.vit = backbone.model
        self.vit.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        config = BypassConfig(layers=(1, backbone.depth), bottleneck=BOTTLENECK)
        adapters = []
        for _ in range(len(self.vit.blocks)):
            adapter = ResAdapter(backbone.dim, config)
            adapter.reset_parameters(generator, zero_output=True)
            adapters.append(adapter)
        self.adapters = nn.ModuleList(adapters)
        self.head = nn.Linear(backbone.dim, classes)
        with torch.no_grad():
            nn.init.normal_(self.head.weight, std=0.01, generator=generator)
            nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, C)
        x = self.vit.embed(images)  # (B, N, D)
        for block, adapter in zip(self.vit.blocks, self.adapters, strict=True):
            x = adapter(block(x))  # (B, N, D)
        out: Tensor = self.head(self.vit.norm(x)[:, 0])  # (B, C)
        return out


def run_inner(
    task: TaskSplit, backbone: TorchBackbone, seed: int, epochs: int, batch_size: int = 32
) -> Score:
    """End-to-end training of :class:`InnerAdapters`, same split, optimiser and schedule as the
    trainer (AdamW 1e-3, warm-up + cosine, best validation epoch kept)."""
    started = time.perf_counter()
    train_idx, val_idx = split_indices(task.train, VAL_FRACTION, seed)
    pixels = _pixels(task.train, backbone)  # (n, 3, H, W)
    targets = task.train.targets
    model = InnerAdapters(backbone, len(task.train.labels), seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    steps = math.ceil(len(train_idx) / batch_size) * epochs
    warmup = int(steps * 0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup)
    )
    shuffle = torch.Generator().manual_seed(seed)
    train_rows = torch.from_numpy(train_idx)
    best = (-1.0, _trainable(model))
    for _ in range(epochs):
        model.train()
        order = train_rows[torch.randperm(len(train_rows), generator=shuffle)]
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(model(pixels[rows]), targets[rows])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            schedule.step()
        val_acc = _accuracy(_logits(model, pixels[torch.from_numpy(val_idx)]), targets[val_idx])
        if val_acc > best[0]:
            best = (val_acc, _trainable(model))
    model.load_state_dict(best[1], strict=False)
    seconds = time.perf_counter() - started
    test_logits = _logits(model, _pixels(task.test, backbone))
    return Score(_accuracy(test_logits, task.test.targets), best[0], seconds)


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the parameters being trained (the frozen backbone is left out)."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def _pixels(data: LabeledImages, backbone: TorchBackbone) -> Tensor:  # (n, 3, H, W)
    return preprocess_batch([ref.open() for ref in data.images], backbone.data_config)


@torch.no_grad()
def _logits(model: nn.Module, pixels: Tensor, batch_size: int = 64) -> Tensor:
    model.eval()
    return torch.cat([model(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)])


# ---------------------------------------------------------------------------- serving cost


def serving_cost(backbone: TorchBackbone, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Each method's cost of answering K = SERVE_K tasks for a batch, as a multiple of one
    plain backbone forward of that batch (same input size, this process, best of repeats)."""
    _, height, width = backbone.data_config.input_size
    images = torch.randn(SERVE_BATCH, 3, height, width, generator=torch.Generator().manual_seed(0))
    timer = Timer(torch.device("cpu"), repeats, 0.0, timing.clock())
    depth = backbone.depth
    every = torch.arange(SERVE_BATCH)
    out: dict[str, Any] = {"K": SERVE_K, "batch": SERVE_BATCH, "side": height}
    with torch.inference_mode():
        forward_ms = timer.ms(partial(backbone.model, images))
        out["forward_ms"] = forward_ms
        norm = backbone.final_norm
        heads = nn.Linear(backbone.dim, 10 * SERVE_K)
        heads2 = nn.Linear(2 * backbone.dim, 10 * SERVE_K)
        last_cls, last_all = FeatureSpec((depth,), "cls"), FeatureSpec((depth,), "all")

        def probe_cls() -> object:
            z = norm(backbone.forward_features(images, last_cls).layer(depth)[:, 0])
            return heads(z)  # (B, K * C)

        def probe_mean() -> object:
            z = norm(backbone.forward_features(images, last_all).layer(depth))  # (B, N, D)
            return heads2(torch.cat([z[:, 0], z[:, 1:].mean(dim=1)], dim=-1))

        costs: dict[str, float] = {
            "probe-cls": timer.ms(probe_cls),
            "probe-cls+mean": timer.ms(probe_mean),
        }
        for method in METHODS:
            if method.kind != "bypass":
                continue
            if method.frozen_query:
                # Not stackable by the server's fan-out: K modules in a loop on one capture.
                paper = [
                    frozen_query_task(backbone, _serving_config(backbone, method, i), i)
                    for i in range(SERVE_K)
                ]
                cls_all = paper[0].feature_spec

                def loop(spec: FeatureSpec = cls_all, tasks: list[TaskModule] = paper) -> object:
                    feats = backbone.forward_features(images, spec)
                    return [task(feats) for task in tasks]

                costs[method.name] = timer.ms(loop)
                continue
            modules = _serving_tasks(backbone, method)
            spec = modules[0].feature_spec
            group = StackedGroup(modules, "stacked")

            def bypass(spec: FeatureSpec = spec, group: StackedGroup = group) -> object:
                return group(backbone.forward_features(images, spec), [every] * SERVE_K)

            costs[method.name] = timer.ms(bypass)
        inner = InnerAdapters(backbone, 10, seed).eval()
        # K tasks with their own adapters inside the backbone: K full forwards.
        costs["inner-adapter"] = timer.ms(partial(inner, images)) * SERVE_K
        backbone.model.requires_grad_(False)
    out["ms"] = costs
    out["x_plain"] = {name: ms / forward_ms for name, ms in costs.items()}
    return out


def _serving_config(backbone: TorchBackbone, method: Method, index: int) -> TunerConfig:
    labels = tuple(f"c{i}" for i in range(10))
    data = LabeledImages("classification", labels, (), torch.zeros(0, dtype=torch.long), "cost")
    return build_config(f"t{index}", data, backbone, task_options(method, backbone.depth))


def _serving_tasks(backbone: TorchBackbone, method: Method) -> list[TaskModule]:
    return [
        init_task(_serving_config(backbone, method, i), backbone.final_norm, seed=i)
        for i in range(SERVE_K)
    ]


# ---------------------------------------------------------------------------- the run


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "n": float(len(values)),
    }


def run(
    quick: bool = True, smoke: bool = False, methods: Sequence[str] | None = None
) -> dict[str, Any]:
    """Train and score every method on every task (see the module docstring)."""
    name: ProfileName = "smoke" if smoke else "quick" if quick else "full"
    profile = PROFILES[name]
    chosen = [BY_NAME[m] for m in methods] if methods else list(METHODS)
    backbone = load(profile)
    norm = backbone.final_norm
    spec = FeatureSpec(tuple(range(backbone.depth + 1)), "all")
    tasks = suite(profile)
    report: dict[str, Any] = {
        "bench": "efficacy",
        "profile": name,
        "arch": backbone.arch,
        "weights": profile.weights,
        "input_side": profile.side,
        "train_size": profile.train_size,
        "test_size": profile.test_size,
        "val_fraction": VAL_FRACTION,
        "seeds": list(profile.seeds),
        "epochs": profile.epochs,
        "batch_size": profile.batch_size,
        "patience": profile.patience,
        "inner_epochs": profile.inner_epochs,
        "bottleneck": BOTTLENECK,
        "methods": [dataclasses.asdict(m) for m in chosen],
        "tasks": [],
    }
    feature_seconds = 0.0
    for task in tasks:
        # One cache per task: every image goes through the backbone once, all methods share it.
        cache = FeatureCache(None, backbone, spec)
        started = time.perf_counter()
        cache.features(list(task.train.images) + list(task.test.images))
        feature_seconds += time.perf_counter() - started
        entry: dict[str, Any] = {
            "task": task.name,
            "family": task.family,
            "classes": len(task.train.labels),
            "train": len(task.train),
            "test": len(task.test),
            "chance": 1.0 / len(task.train.labels),
            "methods": {},
        }
        for method in chosen:
            if method.kind == "inner" and not (
                profile.inner_tasks is None or task.name in profile.inner_tasks
            ):
                continue
            scores = [
                _score(task, cache, backbone, norm, method, seed, profile) for seed in profile.seeds
            ]
            entry["methods"][method.name] = {
                "test_accuracy": _spread([s.test_accuracy for s in scores]),
                "val_accuracy": _spread([s.val_accuracy for s in scores]),
                "train_seconds": statistics.fmean(s.train_seconds for s in scores),
            }
            done = entry["methods"][method.name]
            print(
                f"[efficacy] {task.name:12s} {method.name:17s} "
                f"test {done['test_accuracy']['mean']:.3f} "
                f"val {done['val_accuracy']['mean']:.3f} {done['train_seconds']:.1f} s",
                flush=True,
            )
        entry.update(_verdict(entry["methods"]))
        report["tasks"].append(entry)
        del cache
    report["feature_seconds"] = feature_seconds
    report["serving"] = serving_cost(backbone, profile.serve_repeats)
    report["summary"] = summarise(report["tasks"])
    return report


def _score(
    task: TaskSplit,
    cache: FeatureCache,
    backbone: TorchBackbone,
    norm: nn.LayerNorm,
    method: Method,
    seed: int,
    profile: Profile,
) -> Score:
    if method.kind == "probe":
        return run_probe(task, cache, norm, method, seed)
    if method.kind == "bypass" and method.frozen_query:
        return run_frozen_query_prefix(task, cache, backbone, profile.train_options(seed))
    if method.kind == "bypass":
        return run_bypass(task, cache, backbone, method, profile.train_options(seed))
    return run_inner(task, backbone, seed, profile.inner_epochs, profile.batch_size)


def _best(methods: dict[str, Any], kind: str) -> tuple[str, float] | None:
    scored = [
        (name, m["test_accuracy"]["mean"])
        for name, m in methods.items()
        if BY_NAME[name].kind == kind
    ]
    return max(scored, key=lambda item: item[1]) if scored else None


def _verdict(methods: dict[str, Any]) -> dict[str, Any]:
    """Best bypass and best probe of one task, and the margin between them (points)."""
    bypass, probe = _best(methods, "bypass"), _best(methods, "probe")
    if bypass is None or probe is None:
        return {}
    return {
        "best_bypass": bypass[0],
        "best_probe": probe[0],
        "bypass_minus_probe": bypass[1] - probe[1],
    }


def summarise(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """How often and by how much the best bypass beats the best linear probe, and the mean
    test accuracy of each method over the tasks it ran on."""
    margins = [t["bypass_minus_probe"] for t in tasks if "bypass_minus_probe" in t]
    means: dict[str, float] = {}
    for method in METHODS:
        values = [
            t["methods"][method.name]["test_accuracy"]["mean"]
            for t in tasks
            if method.name in t["methods"]
        ]
        if values:
            means[method.name] = statistics.fmean(values)
    return {
        "tasks": len(margins),
        "bypass_wins": sum(1 for m in margins if m > WIN_MARGIN),
        "margins": margins,
        "mean_margin": statistics.fmean(margins) if margins else 0.0,
        "mean_accuracy": means,
    }

"""Fan-out: many tasks on one batch of backbone features, tasks of one bypass shape stacked.

Tasks whose configs share a ``stack_key`` have identically shaped bypass tensors, whatever
their heads. A :class:`StackedGroup` stacks them on a task axis (K, ...) and runs the bypass
as batched matmuls, so the cost of a group grows slowly with K instead of paying per-task
overhead; the lateral tuners, whose input (the backbone feature) is shared by all tasks,
become one GEMM against the K weights side by side. Heads of different kinds and class counts
share the stack: they run as one batched matmul over heads zero-padded to the widest, or, when
padding would waste too much, one matmul per task (:func:`choose_head_layout`); each task's
output is then cut to its own width. Only post-processing tells the head kinds apart. A
:class:`GroupedFanout` runs every group of a task set.

Groups are immutable: adding or replacing a task builds a new group (``with_module``), which
a server swaps in atomically while in-flight batches finish on the old one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from restuning.features import Features, FeatureSpec
from restuning.tuners.base import Params
from restuning.tuners.bypass import pool_tokens, run_bypass
from restuning.tuners.registry import tuner_class
from restuning.tuners.task import TaskModule
from tuners_store.config import SIDES

Strategy = Literal["auto", "stacked", "loop"]
"""``stacked``: batched ops over the task axis; ``loop``: each task's module in turn;
``auto``: :func:`choose_strategy`."""

BypassImpl = Literal["bmm", "grouped"]
"""How :meth:`StackedGroup.forward_all` runs the bypass: batched matmuls over the task axis,
or the fused grouped kernel of :mod:`restuning.kernels.grouped_adapter` (CLS res_adapter)."""

MAX_STACK_ELEMENTS = 1 << 22
"""Cap on one stacked activation (K x rows x tokens x D elements, 16 MiB in float32); bigger
stacks run in task chunks. All-token stacks are memory-bound: on 2 CPU cores, 19 ViT-S
all-token tasks at batch 8 took 2460 ms in one stack, 1060 ms in chunks of 6 (this cap),
1260 ms in a loop. CLS-only stacks (B x 1 x D per task) stay whole."""

SHARED_ROWS_MIN_FILL = 0.5
"""Run a stack on the union of its tasks' rows when the largest task asks for at least this
share of it; otherwise gather each task's own rows (padded) so sparse requests do not pay
for every row of the union."""


HeadLayout = Literal["padded", "segmented"]
"""How a stack runs its heads: one batched matmul over heads zero-padded to the widest class
count, or one matmul per task."""

MAX_HEAD_PADDING = 2.0
"""Padded heads while padding multiplies the head FLOPs by at most this; segmented beyond.
Measured (one CPU thread, ViT-S D 384, 12 layers, r 32, K 19 CLS tasks, 18 heads of 100
classes and one wider): padded vs segmented ms at batch 1 / 8: x1.9 6.9 vs 7.5 / 13.4 vs
12.9; x2.7 7.3 vs 6.9 / 12.8 vs 12.3; x6.8 9.2 vs 6.8 / 16.6 vs 12.3. VTAB-1k's class counts
(2 to 397) pad x8.0: 6.9 vs 5.9 / 14.2 vs 12.5 (bench/fanout_cost.py --heads)."""


def choose_head_layout(widths: Sequence[int]) -> HeadLayout:
    """``padded`` when K x the widest head costs at most :data:`MAX_HEAD_PADDING` x the heads'
    own FLOPs (heads of one width always: no waste), ``segmented`` otherwise."""
    padded = len(widths) * max(widths)
    return "padded" if padded <= MAX_HEAD_PADDING * sum(widths) else "segmented"


def choose_strategy(num_tasks: int) -> Literal["stacked", "loop"]:
    """Loop for a single task (nothing to batch, no stacked copy); stacked otherwise.

    Measured (bench/fanout_cost.py, one CPU thread, ViT-S D 384, 12 layers, r 32, CLS rows):
    K = 1 costs the same either way (0.8 vs 1.0 ms at batch 1); from K = 4 the stack wins,
    batch 1: 1.8 vs 5.5 ms (K 4), 18 vs 78 ms (K 64); batch 8: 3.2 vs 6.9 ms (K 4),
    39 vs 108 ms (K 64). On a GPU the loop is launch-bound and worse still (GPU.md).
    """
    return "loop" if num_tasks <= 1 else "stacked"


@dataclass(frozen=True)
class _Stack:
    """K tasks' tensors stacked on a leading task axis."""

    tuners: dict[tuple[str, int], dict[str, Tensor]]  # (side, layer) -> name -> (K, ...)
    heads: tuple[tuple[Tensor, Tensor], ...]
    """Each task's head weight (C_k, D) and bias (C_k,): views into the padded tensors in the
    padded layout, the stack's own copies in the segmented one."""
    head_weight: Tensor | None  # (K, C, D) padded layout only; rows past C_k are zero
    head_bias: Tensor | None  # (K, C) padded layout only; columns past C_k are zero
    width: int
    """C: the widest head of the whole group (a narrowed stack keeps it), the width of every
    stacked output."""
    dtype: torch.dtype
    norm: _Norm
    """The frozen final norm, copied in the stack's dtype: one dtype for every operand of the
    layer_norm (CUDA refuses bf16 activations with float32 weights), and a tensor the stack
    owns, so a captured graph never reads a module's buffer that may be moved or freed."""

    @property
    def widths(self) -> tuple[int, ...]:
        """Each task's class count C_k."""
        return tuple(int(b.shape[0]) for _, b in self.heads)

    def narrow(self, start: int, stop: int) -> _Stack:
        """Tasks ``start..stop-1`` (views, no copy)."""
        return _Stack(
            {key: {n: t[start:stop] for n, t in p.items()} for key, p in self.tuners.items()},
            self.heads[start:stop],
            None if self.head_weight is None else self.head_weight[start:stop],
            None if self.head_bias is None else self.head_bias[start:stop],
            self.width,
            self.dtype,
            self.norm,
        )

    def take(self, tasks: list[int]) -> _Stack:
        """Tasks ``tasks`` in that order (a copy; eager path only: the index is host data)."""
        device = self.heads[0][1].device
        index = torch.tensor(tasks, device=device)
        return _Stack(
            {key: {n: t[index] for n, t in p.items()} for key, p in self.tuners.items()},
            tuple(self.heads[i] for i in tasks),
            None if self.head_weight is None else self.head_weight[index],
            None if self.head_bias is None else self.head_bias[index],
            self.width,
            self.dtype,
            self.norm,
        )

    def apply_heads(self, pooled: Tensor) -> Tensor:
        """Pooled features (K, n, D) -> every task's head: (K, n, C), zeros past C_k."""
        if self.head_weight is not None and self.head_bias is not None:
            return torch.baddbmm(
                self.head_bias.unsqueeze(1), pooled, self.head_weight.transpose(1, 2)
            )  # (K, n, C)
        return torch.stack(
            [
                F.pad(F.linear(pooled[k], w, b), (0, self.width - int(b.shape[0])))  # (n, C)
                for k, (w, b) in enumerate(self.heads)
            ]
        )  # (K, n, C)

    @property
    def nbytes(self) -> int:
        """Bytes of the stacked copies (padding included)."""
        tensors = [t for p in self.tuners.values() for t in p.values()]
        if self.head_weight is not None and self.head_bias is not None:
            tensors += [self.head_weight, self.head_bias]
        else:
            tensors += [t for head in self.heads for t in head]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class _Norm:
    """A LayerNorm's affine tensors (D,) or ``None``, and its epsilon."""

    weight: Tensor | None  # (D,)
    bias: Tensor | None  # (D,)
    eps: float

    def __call__(self, h: Tensor) -> Tensor:
        """LayerNorm over the last axis of ``h`` (..., D)."""
        return F.layer_norm(h, h.shape[-1:], self.weight, self.bias, self.eps)


class StackedGroup:
    """K tasks with one ``stack_key`` run together; each task on the rows that asked for it.

    Outputs are each task's own width C_k; :meth:`forward_all` returns the group's widest C
    for every task (zeros past C_k), which a caller cuts with :attr:`widths`."""

    def __init__(
        self,
        modules: Sequence[TaskModule],
        strategy: Strategy = "auto",
        *,
        max_stack_elements: int = MAX_STACK_ELEMENTS,
        dtype: torch.dtype | None = None,
        heads: HeadLayout | None = None,
    ) -> None:
        """``dtype``: the stacked copies' dtype (default: the modules'), e.g. bfloat16 on a GPU
        whose registry keeps float32 modules; the stacked strategy then computes in it.
        ``heads``: the head layout (default: :func:`choose_head_layout`)."""
        if not modules:
            raise ValueError("a group needs at least one task")
        first = modules[0]
        if any(m.config.stack_key != first.config.stack_key for m in modules):
            raise ValueError("tasks of a group must share one stack_key")
        names = [m.config.name for m in modules]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in a group: {names}")
        placements = {(p.device, p.dtype) for m in modules for p in m.parameters()}
        if len(placements) != 1:
            raise ValueError(f"tasks of a group must share one device and dtype: {placements}")
        self.modules: tuple[TaskModule, ...] = tuple(modules)
        self._requested: Strategy = strategy
        self.strategy: Literal["stacked", "loop"] = (
            choose_strategy(len(modules)) if strategy == "auto" else strategy
        )
        self.max_stack_elements = max_stack_elements
        self.dtype = dtype
        self.head_layout: HeadLayout = heads or choose_head_layout(self.widths)
        """How the stacked strategy runs the heads."""
        self._heads = heads
        self._stack = (
            _stack(self.modules, dtype, self.head_layout) if self.strategy == "stacked" else None
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Task names in stack order."""
        return tuple(m.config.name for m in self.modules)

    @property
    def stack_key(self) -> tuple[object, ...]:
        """The shared ``TunerConfig.stack_key``."""
        return self.modules[0].config.stack_key

    @property
    def widths(self) -> tuple[int, ...]:
        """Each task's output width C_k, in stack order: its head's own, so a head that
        disagrees with its config shows as a wrong output shape, as it does alone."""
        return tuple(int(m.head.bias.shape[0]) for m in self.modules)

    @property
    def width(self) -> int:
        """C of :meth:`forward_all`'s (K, B, C): the widest head."""
        return max(self.widths)

    @property
    def nbytes(self) -> int:
        """Bytes the group's stacked copies hold (0 for a loop group: it shares the modules)."""
        return 0 if self._stack is None else self._stack.nbytes

    @property
    def feature_spec(self) -> FeatureSpec:
        """Features every task of the group reads (they are the same for one stack_key)."""
        return self.modules[0].feature_spec

    def with_module(self, module: TaskModule) -> StackedGroup:
        """A new group with ``module`` added, replacing a task of the same name."""
        kept = [m for m in self.modules if m.config.name != module.config.name]
        return StackedGroup(
            [*kept, module],
            self._requested,
            max_stack_elements=self.max_stack_elements,
            dtype=self.dtype,
            heads=self._heads,
        )

    def without(self, name: str) -> StackedGroup | None:
        """A new group without task ``name``; ``None`` when no task is left."""
        kept = [m for m in self.modules if m.config.name != name]
        if not kept:
            return None
        return StackedGroup(
            kept,
            self._requested,
            max_stack_elements=self.max_stack_elements,
            dtype=self.dtype,
            heads=self._heads,
        )

    @torch.no_grad()
    def forward(self, features: Features, rows: Sequence[Tensor]) -> list[Tensor]:
        """Raw outputs of each task on its rows: ``rows[k]`` (n_k,) -> (n_k, C_k).

        ``rows[k]`` indexes the batch axis of ``features`` (any order, repeats allowed).
        """
        if len(rows) != len(self.modules):
            raise ValueError(f"{len(rows)} row sets for {len(self.modules)} tasks")
        feats = features.select(self.feature_spec)  # (L', B, N', D)
        device = feats.data.device
        idx = [r.to(device=device, dtype=torch.long).reshape(-1) for r in rows]
        if self.strategy == "loop":
            return [m(feats.rows(r)) for m, r in zip(self.modules, idx, strict=True)]
        assert self._stack is not None
        out = [feats.data.new_empty((0, c)) for c in self.widths]
        stack, members = self._active(self._stack, [int(r.numel()) for r in idx])
        if not members:
            return out
        _, batch, tokens, dim = feats.data.shape
        chunk = max(1, self.max_stack_elements // (max(1, batch) * tokens * dim))
        for start in range(0, len(members), chunk):
            stop = min(len(members), start + chunk)
            part = stack if (start, stop) == (0, len(members)) else stack.narrow(start, stop)
            ys = self._run_stack(part, feats, [idx[i] for i in members[start:stop]])
            for i, y in zip(members[start:stop], ys, strict=True):
                out[i] = y
        return out

    @staticmethod
    def _active(stack: _Stack, counts: list[int]) -> tuple[_Stack, list[int]]:
        """The part of the stack to run: tasks without rows are skipped when that is cheap.

        A contiguous run of active tasks is a free view; few scattered active tasks are
        copied out (cheaper than computing every task); otherwise every task runs and the
        idle ones' outputs are dropped.
        """
        active = [i for i, n in enumerate(counts) if n]
        if not active or len(active) == len(counts):
            return stack, active
        lo, hi = active[0], active[-1] + 1
        if hi - lo == len(active):
            return stack.narrow(lo, hi), active
        if 2 * len(active) <= len(counts):
            return stack.take(active), active
        return stack, list(range(len(counts)))

    __call__ = forward

    @torch.no_grad()
    def forward_all(self, features: Features, impl: BypassImpl = "bmm") -> Tensor:
        """Raw outputs of every task on every row: (K, B, C), in the stack's dtype; C is
        :attr:`width` and task k's columns past ``widths[k]`` are zeros.

        No data-dependent op and no host sync, so a CUDA graph can capture it (rows a batch
        did not ask for are computed and dropped by the caller; every op is per row, so they
        change nothing for the others). Needs the stacked strategy. ``impl="grouped"`` runs
        the bypass as one fused kernel per layer (CLS-pooled res_adapter groups only).
        """
        if self._stack is None:
            raise ValueError("forward_all needs a stacked group (strategy='stacked')")
        stack = self._stack
        feats = features.select(self.feature_spec)  # (L', B, N', D)
        data = feats.data.to(stack.dtype)
        n_layers, batch, tokens, dim = data.shape
        if impl == "grouped":
            # Imported here: the kernel module imports Triton lazily, and only this path needs it.
            from restuning.kernels.grouped_adapter import grouped_adapter_bypass

            cfg = self.modules[0].config
            h = grouped_adapter_bypass(
                data[:, :, 0],  # (L', B, D): CLS rows
                feats.spec.layers,
                cfg.bypass,
                {key: dict(p) for key, p in stack.tuners.items()},
            )  # (K, B, D)
            return self._norm_pool_heads(stack, h.unsqueeze(2), len(self.modules), batch)
        flat = data.reshape(n_layers, batch * tokens, dim)  # (L', B*N', D)
        return self._bypass_heads(stack, feats.spec.layers, flat, len(self.modules), batch, tokens)

    def _run_stack(self, stack: _Stack, feats: Features, rows: list[Tensor]) -> list[Tensor]:
        """One chunk of the stack: the bypass as batched ops over its task axis."""
        k = len(rows)
        counts = [int(r.numel()) for r in rows]
        n_max = max(counts)  # > 0: only chunks with an active task run
        data = feats.data  # (L', B, N', D)
        n_layers, batch, tokens, dim = data.shape
        union = torch.unique(torch.cat(rows))  # sorted
        shared = n_max >= SHARED_ROWS_MIN_FILL * union.numel()
        if shared:
            # Every task runs on the union's rows; the lateral inputs are shared by all tasks.
            sub = data if union.numel() == batch else data[:, union]  # (L', U, N', D)
            n = int(sub.shape[1])
            flat = sub.reshape(n_layers, n * tokens, dim)  # (L', U*N', D)
        else:
            # Each task gets its own rows, padded to n_max with a row it asked for anyway.
            padded = torch.stack(
                [
                    torch.cat([r, r[:1].expand(n_max - r.numel())])
                    if r.numel()
                    else union[:1].expand(n_max)
                    for r in rows
                ]
            )  # (K, n_max)
            n = n_max
            flat = data[:, padded].reshape(n_layers, k, n * tokens, dim)  # (L', K, n*N', D)
        flat = flat.to(stack.dtype)
        out = self._bypass_heads(stack, feats.spec.layers, flat, k, n, tokens)  # (K, n, C)
        widths = stack.widths
        if shared:
            return [
                out[i, torch.searchsorted(union, r), : widths[i]] for i, r in enumerate(rows)
            ]  # (n_i, C_i) each
        return [out[i, : counts[i], : widths[i]] for i in range(k)]

    def _bypass_heads(
        self, stack: _Stack, layers: tuple[int, ...], flat: Tensor, k: int, n: int, tokens: int
    ) -> Tensor:
        """The bypass over ``flat`` (L', n*N', D) shared, or (L', K, n*N', D) per task, then
        norm, pooling and heads: (K, n, C)."""
        position = {layer: i for i, layer in enumerate(layers)}
        bypass_cfg = self.modules[0].config.bypass
        tuner = tuner_class(bypass_cfg.tuner)
        fixed = bypass_cfg.scale

        def side_fn(side: str) -> Callable[[int, Tensor], Tensor]:
            params: dict[int, Params] = {
                layer: stack.tuners[(side, layer)] for layer in bypass_cfg.block_range
            }
            return lambda layer, t: tuner.compute(t, params[layer], fixed)

        h = run_bypass(
            lambda layer: flat[position[layer]],
            bypass_cfg.block_range,
            side_fn("lateral"),
            side_fn("vertical"),
            bypass_cfg.combine,
            bypass_cfg.lam,
        )  # (K, n*N', D)
        dim = int(flat.shape[-1])
        return self._norm_pool_heads(stack, h.reshape(k, n, tokens, dim), k, n)

    def _norm_pool_heads(self, stack: _Stack, h: Tensor, k: int, n: int) -> Tensor:
        """h_last (K, n, N', D) -> the frozen final norm, pooling and heads: (K, n, C)."""
        z = stack.norm(h.to(stack.dtype))  # (K, n, N', D)
        pooled = pool_tokens(z, self.modules[0].config.pooling)  # (K, n, D)
        return stack.apply_heads(pooled)  # (K, n, C)


def _stack(modules: Sequence[TaskModule], dtype: torch.dtype | None, layout: HeadLayout) -> _Stack:
    """Copy K modules' tensors into stacked (K, ...) tensors (cast to ``dtype`` if given),
    heads in ``layout``."""
    with torch.no_grad():
        cfg = modules[0].config.bypass
        tuners: dict[tuple[str, int], dict[str, Tensor]] = {}
        for layer in cfg.block_range:
            for side in SIDES:
                per_task = [m.bypass.tuner(side, layer).tensors() for m in modules]
                tuners[(side, layer)] = {
                    name: torch.stack([p[name].detach() for p in per_task]).to(dtype)
                    for name in per_task[0]
                }
        bypass = modules[0].bypass
        out_dtype = dtype if dtype is not None else modules[0].head.weight.dtype

        def own(t: Tensor) -> Tensor:
            # A copy (even when no cast happens): the stack must not share the module's tensor.
            return t.detach().to(dtype=out_dtype, copy=True)

        weights = [own(m.head.weight) for m in modules]  # (C_k, D) each
        biases = [own(m.head.bias) for m in modules]  # (C_k,) each
        widths = [int(b.shape[0]) for b in biases]
        width = max(widths)
        head_weight = head_bias = None
        heads = tuple(zip(weights, biases, strict=True))
        if layout == "padded":
            head_weight = torch.stack(
                [F.pad(w, (0, 0, 0, width - int(w.shape[0]))) for w in weights]
            )  # (K, C, D)
            head_bias = torch.stack([F.pad(b, (0, width - int(b.shape[0]))) for b in biases])
            heads = tuple((head_weight[k, :c], head_bias[k, :c]) for k, c in enumerate(widths))
        return _Stack(
            tuners,
            heads,
            head_weight,
            head_bias,
            width,
            out_dtype,
            _Norm(
                None if bypass.norm_weight is None else own(bypass.norm_weight),
                None if bypass.norm_bias is None else own(bypass.norm_bias),
                bypass.norm_eps,
            ),
        )


class GroupedFanout:
    """Any set of tasks: grouped by ``stack_key``, each group stacked, outputs per task."""

    def __init__(
        self,
        modules: Sequence[TaskModule],
        strategy: Strategy = "auto",
        *,
        max_stack_elements: int = MAX_STACK_ELEMENTS,
    ) -> None:
        if not modules:
            raise ValueError("a fan-out needs at least one task")
        by_key: dict[tuple[object, ...], list[int]] = {}
        for i, m in enumerate(modules):
            by_key.setdefault(m.config.stack_key, []).append(i)
        self.modules: tuple[TaskModule, ...] = tuple(modules)
        self.groups: tuple[tuple[StackedGroup, tuple[int, ...]], ...] = tuple(
            (
                StackedGroup(
                    [modules[i] for i in members], strategy, max_stack_elements=max_stack_elements
                ),
                tuple(members),
            )
            for members in by_key.values()
        )

    @property
    def feature_spec(self) -> FeatureSpec:
        """The union of what the tasks read: the spec a backbone forward must capture."""
        return FeatureSpec.union(m.feature_spec for m in self.modules)

    def forward(self, features: Features, rows: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Outputs (n_k, C_k) per task, in the order the modules were given.

        ``rows[k]`` are the batch rows task k runs on; ``None`` runs every task on every row.
        """
        if rows is None:
            every = torch.arange(features.batch_size, device=features.data.device)
            rows = [every] * len(self.modules)
        if len(rows) != len(self.modules):
            raise ValueError(f"{len(rows)} row sets for {len(self.modules)} tasks")
        out: list[Tensor | None] = [None] * len(self.modules)
        for group, members in self.groups:
            for i, y in zip(members, group(features, [rows[i] for i in members]), strict=True):
                out[i] = y
        assert all(y is not None for y in out)  # every task belongs to exactly one group
        return [y for y in out if y is not None]

    __call__ = forward

"""The CLS-only res_adapter bypass of K tasks as one fused kernel per layer.

In the spirit of Punica's BGMV and S-LoRA's SGMV: every task owns its small weights, all tasks
read the same backbone rows, and one launch covers the whole group. For bypass layer l the
kernel computes, for each task k and each CLS row m,

    lat = x_l[m] + s_lat * (W2_lat GELU(W1_lat x_l[m] + b1_lat) + b2_lat)
    ver = h[k, m] + s_ver * (W2_ver GELU(W1_ver h[k, m] + b1_ver) + b2_ver)
    h'[k, m] = lat + ver        (sum)   or   ver + lam * (lat - ver)   (lerp)

with both sides, both projections, the exact GELU, the scales and the combine fused, where the
batched-matmul path (``StackedGroup.forward_all(impl="bmm")``) launches about ten kernels per
layer. Past about 64 tasks those small batched matmuls stop scaling (GPU.md: +36% at 256
tasks); one program per (task, row tile) does not.

Rounding: products accumulate in float32; the GELU output is rounded to the input dtype before
the second product (a tensor-core input), and h' once per layer. :func:`grouped_adapter_reference`
computes exactly that in plain torch (it is the CPU path and the tests' oracle); in float32 both
round nowhere and equal the per-task modules.

:func:`choose_bypass_impl` picks the kernel or the batched matmuls per group shape by timing
both at load time on the GPU (the setting ``grouped_kernel`` may force either).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import statistics
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tuners_store.config import BypassConfig, TunerConfig

log = logging.getLogger(__name__)

MAX_RANK = 128
"""Largest bottleneck r the kernel takes (its hidden tile is r wide, in registers)."""

GroupedSetting = Literal["auto", "on", "off"]
"""``auto``: measure per shape; ``on``: the kernel wherever it applies; ``off``: never."""

Params = Mapping[tuple[str, int], Mapping[str, Tensor]]
"""Stacked tuner tensors by (side, layer): ``w1`` (K, r, D), ``b1`` (K, r), ``w2`` (K, D, r),
``b2`` (K, D) and, for learned scales, ``scale`` (K, 1) or (K, D)."""


def supports(config: TunerConfig) -> bool:
    """Whether the fused kernel computes this task's bypass: CLS-pooled res_adapter, r <= 128."""
    return (
        config.bypass.tuner == "res_adapter"
        and config.token_selection == "cls"
        and config.bypass.bottleneck <= MAX_RANK
    )


def triton_available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def grouped_adapter_bypass(
    x: Tensor, layers: tuple[int, ...], bypass: BypassConfig, params: Params
) -> Tensor:
    """h_last (K, M, D) of K stacked res_adapter bypasses over CLS features ``x`` (L', M, D).

    ``layers`` names the rows of ``x`` (x_{first-1}..x_last at least). CUDA tensors run the
    Triton kernel; anything else runs :func:`grouped_adapter_reference`.
    """
    if x.is_cuda and triton_available():
        return grouped_adapter_triton(x, layers, bypass, params)
    return grouped_adapter_reference(x, layers, bypass, params)


def grouped_adapter_reference(
    x: Tensor, layers: tuple[int, ...], bypass: BypassConfig, params: Params
) -> Tensor:
    """What the kernel computes, in plain torch: float32 math, the kernel's two rounding points."""
    position = {layer: i for i, layer in enumerate(layers)}
    dtype = x.dtype
    first = bypass.block_range.start
    h = x[position[first - 1]]  # (M, D), shared by every task until the first layer
    for layer in bypass.block_range:
        lat = _side_reference(x[position[layer]], params[("lateral", layer)], bypass.scale)
        ver = _side_reference(h, params[("vertical", layer)], bypass.scale)  # (K, M, D)
        out = lat + ver if bypass.combine == "sum" else ver + bypass.lam * (lat - ver)
        h = out.to(dtype)
    return h


def _side_reference(t: Tensor, p: Mapping[str, Tensor], fixed_scale: float) -> Tensor:
    """One side of one layer for K tasks: ``t`` (M, D) shared or (K, M, D) -> (K, M, D) fp32."""
    f32 = torch.float32
    k = p["w1"].shape[0]
    t32 = t.to(f32).expand(k, *t.shape[-2:])  # (K, M, D)
    hidden = torch.baddbmm(p["b1"].to(f32).unsqueeze(1), t32, p["w1"].to(f32).transpose(1, 2))
    hidden = F.gelu(hidden).to(t.dtype).to(f32)  # (K, M, r), rounded like the kernel's tile
    delta = torch.baddbmm(p["b2"].to(f32).unsqueeze(1), hidden, p["w2"].to(f32).transpose(1, 2))
    scale = p.get("scale")
    if scale is None:
        return t32 + fixed_scale * delta
    return t32 + scale.to(f32).unsqueeze(1) * delta  # (K, 1, 1|D) broadcast


# --- the Triton kernel ------------------------------------------------------------------------


def _block_m(rows: int) -> int:
    """Row tile: tensor-core products need at least 16 rows; small batches waste less at 16."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


BLOCK_D = 64
"""Width of the feature-dimension chunks the kernel walks D in."""


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, built on first use (Triton imported here, never at module import)."""
    import triton  # type: ignore[import-not-found,unused-ignore]
    import triton.language as tl  # type: ignore[import-not-found,unused-ignore]

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def grouped_adapter_layer(  # type: ignore[no-untyped-def]
        x_ptr,  # x_l (n_rows, D): the lateral input, shared by every task
        h_ptr,  # h_{l-1}: (n_rows, D) shared (first layer) or (K, n_rows, D)
        out_ptr,  # h_l (K, n_rows, D)
        lw1_ptr,
        lb1_ptr,
        lw2_ptr,
        lb2_ptr,
        ls_ptr,
        vw1_ptr,
        vb1_ptr,
        vw2_ptr,
        vb2_ptr,
        vs_ptr,
        n_rows,
        h_task_stride,
        scale_task_stride,
        scale_chan_stride,
        fixed_scale,
        lam,
        dim: tl.constexpr,  # static: fixed per backbone, so the dim loops have static bounds
        rank: tl.constexpr,
        learned_scale: tl.constexpr,
        lerp: tl.constexpr,
        block_m: tl.constexpr,
        block_d: tl.constexpr,
        block_r: tl.constexpr,
        precision: tl.constexpr,
    ):
        task = tl.program_id(0)
        rows = tl.program_id(1) * block_m + tl.arange(0, block_m)  # (BM,)
        row_ok = rows < n_rows
        ranks = tl.arange(0, block_r)  # (BR,)
        rank_ok = ranks < rank
        chunk = tl.arange(0, block_d)
        x_rows = x_ptr + rows[:, None] * dim  # (BM, 1)
        h_rows = h_ptr + task * h_task_stride + rows[:, None] * dim
        w1_base = task * rank * dim + ranks[None, :] * dim  # (1, BR): row r of W1 (r, D)
        w2_base = task * dim * rank + ranks[:, None]  # (BR, 1): column r of W2 (dim, r)

        # First projections of both sides, accumulated over dim in chunks: (BM, BR) each.
        acc_l = tl.zeros((block_m, block_r), dtype=tl.float32)
        acc_v = tl.zeros((block_m, block_r), dtype=tl.float32)
        for d0 in range(0, dim, block_d):
            cols = d0 + chunk
            col_ok = cols < dim
            io_mask = row_ok[:, None] & col_ok[None, :]
            w_mask = col_ok[:, None] & rank_ok[None, :]
            xt = tl.load(x_rows + cols[None, :], mask=io_mask, other=0.0)  # (BM, BD)
            ht = tl.load(h_rows + cols[None, :], mask=io_mask, other=0.0)
            lw1 = tl.load(lw1_ptr + w1_base + cols[:, None], mask=w_mask, other=0.0)  # (BD, BR)
            vw1 = tl.load(vw1_ptr + w1_base + cols[:, None], mask=w_mask, other=0.0)
            acc_l = tl.dot(xt, lw1, acc_l, input_precision=precision)
            acc_v = tl.dot(ht, vw1, acc_v, input_precision=precision)
        lb1 = tl.load(lb1_ptr + task * rank + ranks, mask=rank_ok, other=0.0).to(tl.float32)
        vb1 = tl.load(vb1_ptr + task * rank + ranks, mask=rank_ok, other=0.0).to(tl.float32)
        pre_l = acc_l + lb1[None, :]
        pre_v = acc_v + vb1[None, :]
        # Exact GELU; padded ranks (>= rank) hold GELU(0) = 0 and meet zero columns of W2.
        hid_l = (0.5 * pre_l * (1.0 + tl.math.erf(pre_l * 0.7071067811865476))).to(
            x_ptr.dtype.element_ty
        )
        hid_v = (0.5 * pre_v * (1.0 + tl.math.erf(pre_v * 0.7071067811865476))).to(
            x_ptr.dtype.element_ty
        )

        # Second projections, residuals, scales and the combine, chunk by chunk of dim.
        for d0 in range(0, dim, block_d):
            cols = d0 + chunk
            col_ok = cols < dim
            io_mask = row_ok[:, None] & col_ok[None, :]
            w_mask = rank_ok[:, None] & col_ok[None, :]
            # (BR, BD): the chunk of W2^T
            lw2 = tl.load(lw2_ptr + w2_base + cols[None, :] * rank, mask=w_mask, other=0.0)
            vw2 = tl.load(vw2_ptr + w2_base + cols[None, :] * rank, mask=w_mask, other=0.0)
            lb2 = tl.load(lb2_ptr + task * dim + cols, mask=col_ok, other=0.0).to(tl.float32)
            vb2 = tl.load(vb2_ptr + task * dim + cols, mask=col_ok, other=0.0).to(tl.float32)
            delta_l = tl.dot(hid_l, lw2, input_precision=precision) + lb2[None, :]
            delta_v = tl.dot(hid_v, vw2, input_precision=precision) + vb2[None, :]
            xt = tl.load(x_rows + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
            ht = tl.load(h_rows + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
            if learned_scale:
                at = task * scale_task_stride + cols * scale_chan_stride
                s_l = tl.load(ls_ptr + at, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                s_v = tl.load(vs_ptr + at, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                lat = xt + s_l * delta_l
                ver = ht + s_v * delta_v
            else:
                lat = xt + fixed_scale * delta_l
                ver = ht + fixed_scale * delta_v
            out = ver + lam * (lat - ver) if lerp else lat + ver
            out_rows = out_ptr + task * n_rows * dim + rows[:, None] * dim
            tl.store(out_rows + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)

    return grouped_adapter_layer


def grouped_adapter_triton(
    x: Tensor, layers: tuple[int, ...], bypass: BypassConfig, params: Params
) -> Tensor:
    """:func:`grouped_adapter_reference` as one Triton launch per layer (CUDA, or Triton's
    interpreter on CPU tensors when ``TRITON_INTERPRET=1``)."""
    if bypass.bottleneck > MAX_RANK:
        raise ValueError(f"the grouped kernel takes r <= {MAX_RANK}, got {bypass.bottleneck}")
    _, rows, dim = x.shape
    k = int(params[("lateral", bypass.block_range.start)]["w1"].shape[0])
    if k * rows * dim >= 2**31:
        raise ValueError("the grouped kernel indexes with int32: K x rows x D must stay < 2**31")
    kernel = _kernel()
    position = {layer: i for i, layer in enumerate(layers)}
    rank = bypass.bottleneck
    first = bypass.block_range.start
    block_m = _block_m(rows)
    block_r = max(16, 1 << (rank - 1).bit_length())
    learned = bypass.scale_mode != "fixed"
    # A scale (K, 1) is read at column 0 for every channel; a (K, D) one per channel.
    scale_strides = (dim, 1) if bypass.scale_mode == "channel" else (1, 0)
    grid = (k, (rows + block_m - 1) // block_m)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = x[position[first - 1]].contiguous()  # (M, D)
    for layer in bypass.block_range:
        lat = params[("lateral", layer)]
        ver = params[("vertical", layer)]
        out = torch.empty((k, rows, dim), device=x.device, dtype=x.dtype)  # (K, M, D)
        kernel[grid](
            x[position[layer]].contiguous(),
            h,
            out,
            *(lat[n].contiguous() for n in ("w1", "b1", "w2", "b2")),
            lat["scale"].contiguous() if learned else out,
            *(ver[n].contiguous() for n in ("w1", "b1", "w2", "b2")),
            ver["scale"].contiguous() if learned else out,
            rows,
            0 if h.dim() == 2 else rows * dim,
            *scale_strides,
            float(bypass.scale),
            float(bypass.lam),
            dim=dim,
            rank=rank,
            learned_scale=learned,
            lerp=bypass.combine == "lerp",
            block_m=block_m,
            block_d=BLOCK_D,
            block_r=block_r,
            precision=precision,
        )
        h = out
    return h


# --- choosing per shape -----------------------------------------------------------------------

_CHOICES: dict[tuple[object, ...], Literal["bmm", "grouped"]] = {}
"""Measured choices by (shape_key, K, rows, dtype, device): one measurement per shape."""

CHOOSER_REPEATS = 20
"""Timed calls of each candidate (after warm-up); the median decides."""


def choose_bypass_impl(
    config: TunerConfig,
    num_tasks: int,
    rows: int,
    setting: GroupedSetting,
    run: Callable[[Literal["bmm", "grouped"]], object],
    device: torch.device,
    dtype: torch.dtype,
) -> Literal["bmm", "grouped"]:
    """Which bypass a group of ``num_tasks`` tasks like ``config`` runs at ``rows`` rows.

    ``off`` or a shape the kernel does not take: ``bmm``. ``on``: ``grouped``. ``auto``: on a
    GPU with Triton, time ``run(impl)`` for both (CUDA events, median of
    :data:`CHOOSER_REPEATS`) and keep the faster per shape; elsewhere ``bmm``.
    """
    if setting == "off" or not supports(config):
        return "bmm"
    if setting == "on":
        return "grouped"
    if device.type != "cuda" or not triton_available():
        return "bmm"
    key = (config.shape_key, num_tasks, rows, dtype, str(device))
    found = _CHOICES.get(key)
    if found is not None:
        return found
    try:
        times = {
            "bmm": _time_cuda(lambda: run("bmm"), device),
            "grouped": _time_cuda(lambda: run("grouped"), device),
        }
    except Exception:  # a kernel that fails to build here must not take the group down
        log.exception("grouped kernel failed to run for %d tasks; using bmm", num_tasks)
        choice: Literal["bmm", "grouped"] = "bmm"
    else:
        choice = "grouped" if times["grouped"] < times["bmm"] else "bmm"
        log.info(
            "fan-out of %d tasks at %d rows: bmm %.3f ms, grouped %.3f ms -> %s",
            num_tasks,
            rows,
            times["bmm"],
            times["grouped"],
            choice,
        )
    _CHOICES[key] = choice
    return choice


def _time_cuda(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn`` on ``device``'s current stream (CUDA events)."""
    stream = torch.cuda.current_stream(device)
    for _ in range(3):  # compile, autotune, warm caches
        fn()
    samples = []
    for _ in range(CHOOSER_REPEATS):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()  # type: ignore[no-untyped-call]
        samples.append(float(start.elapsed_time(end)))  # type: ignore[no-untyped-call]
    return statistics.median(samples)

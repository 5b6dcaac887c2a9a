"""Plain-torch Vision Transformer whose parameter names are timm's.

Parameter names follow timm's ``vision_transformer.py`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
ls2.gamma}``, ``norm_pre``, ``norm``), so timm and DINOv2 checkpoints load with strict key
matching. Classifier heads are not part of this module: the bypass brings its own heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from restuning.features import TokenSelection

# The bicubic resample of the position grid runs without antialiasing, like DINOv2's own
# `interpolate_pos_encoding` and its ONNX exports (a Resize without antialias). timm's
# `resample_abs_pos_embed` defaults to antialias=True, which differs only when shrinking.
POS_EMBED_ANTIALIAS = False

# Grids whose resampled position embedding is kept; serving uses one or two sizes.
_POS_CACHE_MAX_GRIDS = 8


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT, field names and meaning as in timm's ``VisionTransformer``."""

    img_size: int
    """Native square input side in pixels; the position-embedding grid is img_size/patch_size."""
    patch_size: int
    """Side of a square patch in pixels (16 for the original ViTs, 14 for DINOv2)."""
    embed_dim: int
    """Width D of the residual stream."""
    depth: int
    """Number of transformer blocks L."""
    num_heads: int
    """Attention heads per block; embed_dim must be divisible by it."""
    in_chans: int = 3
    """Input image channels."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP as a multiple of embed_dim."""
    qkv_bias: bool = True
    """Whether the fused qkv projection has a bias."""
    class_token: bool = True
    """Whether a learned CLS token is prepended (row 0 of every layer)."""
    reg_tokens: int = 0
    """Learned register tokens placed after CLS and before the patches (timm ``reg_token``)."""
    no_embed_class: bool = False
    """True: pos_embed covers only the patches (DeiT-3); False: it covers prefix tokens too."""
    init_values: float | None = None
    """Layer-scale initial value (``ls1.gamma``/``ls2.gamma`` exist); None: no layer scale."""
    pre_norm: bool = False
    """LayerNorm ``norm_pre`` before block 1 (CLIP style); also drops the patch-embed bias."""
    final_norm: bool = True
    """LayerNorm ``norm`` after the last block (the bypass needs it)."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm."""
    dynamic_img_size: bool = True
    """Accept inputs whose grid differs from the native one by resampling pos_embed."""

    def __post_init__(self) -> None:
        positive = {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "in_chans": self.in_chans,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"ViTConfig.{name} must be positive, got {value}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of {self.patch_size}")
        if self.reg_tokens < 0:
            raise ValueError("reg_tokens must be >= 0")
        if self.mlp_ratio <= 0 or self.eps <= 0:
            raise ValueError("mlp_ratio and eps must be positive")
        if self.init_values is not None and self.init_values <= 0:
            raise ValueError("init_values must be positive or None")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Native patch grid (rows, cols)."""
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS (if any) then the registers."""
        return int(self.class_token) + self.reg_tokens

    @property
    def pos_embed_len(self) -> int:
        """Rows of ``pos_embed`` (timm's ``embed_len``)."""
        rows, cols = self.grid_size
        return rows * cols + (0 if self.no_embed_class else self.num_prefix_tokens)


def resample_pos_embed(
    pos_embed: torch.Tensor,  # (1, P + G_old, D)
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix: int,
) -> torch.Tensor:  # (1, P + G_new, D)
    """Bicubically resample the grid part of a position embedding; prefix rows stay as they are.

    Returns ``pos_embed`` itself when the grids match (resampling onto the same grid is the
    identity anyway, up to rounding).
    """
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    # interpolate wants float32 and NCHW.
    grid_nchw = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    resized = F.interpolate(
        grid_nchw, size=new_grid, mode="bicubic", align_corners=False, antialias=POS_EMBED_ANTIALIAS
    )
    resized_rows = resized.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, resized_rows.to(pos_embed.dtype)], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by a strided convolution (timm ``patch_embed``)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(
            config.in_chans,
            config.embed_dim,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=not config.pre_norm,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, h, w, D)
        projected: torch.Tensor = self.proj(images)  # (B, D, h, w)
        return projected.permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm ``attn``)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, hd)
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        batch, tokens, dim = x.shape
        # timm's layout: the 3D outputs are [q | k | v], each split into heads.
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        projected: torch.Tensor = self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return projected

    def forward_first_query(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, 1, D)
        """Attention output of token 0 only: keys and values from every token, one query."""
        dim = x.shape[-1]
        weight, bias = self.qkv.weight, self.qkv.bias  # (3D, D), (3D,)
        q = F.linear(x[:, :1], weight[:dim], None if bias is None else bias[:dim])  # (B, 1, D)
        kv = F.linear(x, weight[dim:], None if bias is None else bias[dim:])  # (B, N, 2D)
        k, v = kv[..., :dim], kv[..., dim:]
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        projected: torch.Tensor = self.proj(out.transpose(1, 2).reshape(x.shape[0], 1, dim))
        return projected  # (B, 1, D)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (timm ``ls1``/``ls2``, parameter ``gamma``)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D)
        return x * self.gamma


class Mlp(nn.Module):
    """Two linear layers with exact (erf) GELU between them (timm ``mlp``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D)
        out: torch.Tensor = self.fc2(F.gelu(self.fc1(x)))
        return out


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.eps)
        self.attn = Attention(config)
        self.ls1: nn.Module = (
            LayerScale(dim, config.init_values) if config.init_values else nn.Identity()
        )
        self.norm2 = nn.LayerNorm(dim, eps=config.eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.ls2: nn.Module = (
            LayerScale(dim, config.init_values) if config.init_values else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        x = x + self.ls1(self.attn(self.norm1(x)))
        out: torch.Tensor = x + self.ls2(self.mlp(self.norm2(x)))
        return out

    def forward_first_token(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, 1, D)
        """The block's output for token 0 alone; the same numbers as ``forward(x)[:, :1]``.

        Every op but attention is per token, and attention needs only token 0's query, so
        when nothing after this block reads the other rows most of the block can be skipped.
        """
        first = x[:, :1] + self.ls1(self.attn.forward_first_query(self.norm1(x)))  # (B, 1, D)
        out: torch.Tensor = first + self.ls2(self.mlp(self.norm2(first)))
        return out


class VisionTransformer(nn.Module):
    """ViT trunk (embedding, blocks, final norm) with timm's parameter names, no classifier."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.cls_token: nn.Parameter | None = (
            nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        )
        self.reg_token: nn.Parameter | None = (
            nn.Parameter(torch.zeros(1, config.reg_tokens, dim)) if config.reg_tokens else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, config.pos_embed_len, dim))
        self.patch_embed = PatchEmbed(config)
        self.norm_pre: nn.Module = (
            nn.LayerNorm(dim, eps=config.eps) if config.pre_norm else nn.Identity()
        )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm: nn.Module = (
            nn.LayerNorm(dim, eps=config.eps) if config.final_norm else nn.Identity()
        )
        # grid -> (identity of the pos_embed it was computed from, resampled tensor)
        self._pos_cache: dict[tuple[int, int], tuple[tuple[object, ...], torch.Tensor]] = {}

    def init_weights(self, seed: int) -> None:
        """Deterministic random init from ``seed`` (independent of the global RNG)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            # Sorted names so the draw order never depends on registration order.
            for name, param in sorted(self.named_parameters()):
                leaf = name.rsplit(".", 1)[-1]
                if name.endswith("ls1.gamma") or name.endswith("ls2.gamma"):
                    param.fill_(self.config.init_values or 1.0)
                elif ".norm" in f".{name}" and leaf in ("weight", "bias"):
                    param.fill_(1.0 if leaf == "weight" else 0.0)
                elif leaf == "bias":
                    param.zero_()
                else:
                    # A clipped normal: trunc_normal_'s erfinv is 5x slower on ViT-B sized
                    # tensors, and a random backbone only needs to be seeded and well scaled.
                    param.normal_(0.0, 0.02, generator=gen).clamp_(-0.04, 0.04)
        self._pos_cache.clear()

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (CLS, registers)."""
        return self.config.num_prefix_tokens

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:  # (1, pos_len, D)
        native = self.config.grid_size
        if grid == native:
            return self.pos_embed
        if not self.config.dynamic_img_size:
            raise ValueError(
                f"input grid {grid} differs from the native {native} and dynamic_img_size is off"
            )
        num_prefix = 0 if self.config.no_embed_class else self.num_prefix_tokens
        # Cache only on the serving path: inference tensors must not enter autograd, and a
        # cached constant must not leak into a trace (ONNX export) or a training graph.
        if not torch.is_inference_mode_enabled():
            return resample_pos_embed(self.pos_embed, native, grid, num_prefix)
        pos = self.pos_embed
        # _version moves on in-place writes (load_state_dict), data_ptr on .to(), so a stale
        # entry is never served.
        source = (pos.data_ptr(), pos._version, pos.device, pos.dtype)
        hit = self._pos_cache.get(grid)
        if hit is not None and hit[0] == source:
            return hit[1]
        resampled = resample_pos_embed(pos, native, grid, num_prefix)
        if len(self._pos_cache) >= _POS_CACHE_MAX_GRIDS:
            self._pos_cache.clear()
        self._pos_cache[grid] = (source, resampled)
        return resampled

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        """x_0: patch embedding, prefix tokens and position embedding [+ norm_pre]."""
        if images.ndim != 4 or images.shape[1] != self.config.in_chans:
            raise ValueError(
                f"expected images (B, {self.config.in_chans}, H, W), got {tuple(images.shape)}"
            )
        height, width = int(images.shape[-2]), int(images.shape[-1])
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch {patch}")
        patches = self.patch_embed(images)  # (B, h, w, D)
        batch, rows, cols, dim = patches.shape
        x = patches.reshape(batch, rows * cols, dim)  # (B, G, D)
        pos = self._pos_embed_for((rows, cols))
        prefix = [
            token.expand(batch, -1, -1)
            for token in (self.cls_token, self.reg_token)
            if token is not None
        ]
        if self.config.no_embed_class:
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        normed: torch.Tensor = self.norm_pre(x)  # (B, N, D)
        return normed

    def intermediates(
        self, images: torch.Tensor, layers: Sequence[int], tokens: TokenSelection
    ) -> list[torch.Tensor]:
        """x_l for each l in ``layers`` (sorted, unique), each (B, N', D); N' = 1 for "cls".

        x_0 is the output of ``embed``, x_l (l >= 1) the output of block l before the final
        norm. Blocks after max(layers) do not run.
        """
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be sorted, unique and non-empty, got {layers}")
        last = layers[-1]
        if layers[0] < 0 or last > self.config.depth:
            raise ValueError(f"layers must lie in 0..{self.config.depth}, got {list(layers)}")
        cls_only = tokens == "cls"
        if cls_only and not self.config.class_token:
            raise ValueError("CLS-only capture needs a model with a class token")
        wanted = set(layers)
        x = self.embed(images)  # (B, N, D)
        out = [x[:, :1] if cls_only else x] if 0 in wanted else []
        for index in range(1, last + 1):
            block = cast(Block, self.blocks[index - 1])
            # Nothing downstream reads the patch rows of the last needed block: (B, 1, D).
            x = block.forward_first_token(x) if cls_only and index == last else block(x)
            if index in wanted:
                out.append(x[:, :1] if cls_only else x)
        return out

    def forward_intermediates(
        self, images: torch.Tensor, layers: Sequence[int], tokens: TokenSelection
    ) -> torch.Tensor:  # (L', B, N', D)
        """``intermediates`` stacked into one tensor."""
        return torch.stack(self.intermediates(images, layers, tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        """All blocks and the final norm over every token (timm's ``forward_features``)."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        normed: torch.Tensor = self.norm(x)
        return normed

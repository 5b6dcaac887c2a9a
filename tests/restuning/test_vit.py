"""VisionTransformer: timm names, the math against a straight-line reference, DINOv2 pieces."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from restuning.backbone import TorchBackbone
from restuning.features import FeatureSpec
from restuning.presets import PRESETS, Preset
from restuning.vit import VisionTransformer, ViTConfig, resample_pos_embed
from tests.fixtures.models import tiny_backbone_factory

TINY = PRESETS["vit_test_tiny"].vit
# DINOv2 shape in miniature: patch 14, layer scale, pos_embed with the CLS row, 3 x 3 grid.
TINY_DINO = ViTConfig(
    img_size=42, patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=1e-1
)
TINY_REG = dataclasses.replace(TINY, reg_tokens=2, no_embed_class=True)
TINY_PRE = dataclasses.replace(TINY, pre_norm=True, qkv_bias=False)
CONFIGS = {"plain": TINY, "dinov2": TINY_DINO, "registers": TINY_REG, "pre_norm": TINY_PRE}


def _model(config: ViTConfig, seed: int = 0) -> VisionTransformer:
    model = VisionTransformer(config)
    model.init_weights(seed)
    with torch.no_grad():
        # Layer scale and norms at their init values would hide wrong wiring: perturb them.
        gen = torch.Generator().manual_seed(seed + 100)
        for name, param in model.named_parameters():
            if "gamma" in name or "norm" in name or "token" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


# ---- an independent straight-line ViT, written from the equations ---------------------------


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _reference_embed(
    sd: dict[str, torch.Tensor], cfg: ViTConfig, images: torch.Tensor
) -> torch.Tensor:  # (B, N, D)
    batch, chans, height, width = images.shape
    p = cfg.patch_size
    rows, cols = height // p, width // p
    # Patches as rows of (C * p * p) in the conv weight's (C, p, p) order.
    patches = images.reshape(batch, chans, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, rows * cols, chans * p * p)
    x = patches @ sd["patch_embed.proj.weight"].reshape(cfg.embed_dim, -1).T
    if "patch_embed.proj.bias" in sd:
        x = x + sd["patch_embed.proj.bias"]
    pos = sd["pos_embed"]
    n_prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
    if (rows, cols) != cfg.grid_size:
        old = cfg.grid_size
        grid = pos[:, n_prefix:].reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        pos = torch.cat(
            [pos[:, :n_prefix], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], 1
        )
    prefix = []
    if cfg.class_token:
        prefix.append(sd["cls_token"].expand(batch, -1, -1))
    if cfg.reg_tokens:
        prefix.append(sd["reg_token"].expand(batch, -1, -1))
    # DeiT-3 style adds pos_embed to the patches only; timm's classic one to every row.
    x = torch.cat([*prefix, x + pos], 1) if cfg.no_embed_class else torch.cat([*prefix, x], 1) + pos
    if cfg.pre_norm:
        x = _layer_norm(x, sd["norm_pre.weight"], sd["norm_pre.bias"], cfg.eps)
    return x


def _reference_block(
    sd: dict[str, torch.Tensor], cfg: ViTConfig, i: int, x: torch.Tensor
) -> torch.Tensor:
    pre = f"blocks.{i}."
    heads, dim = cfg.num_heads, cfg.embed_dim
    hd = dim // heads
    h = _layer_norm(x, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], cfg.eps)
    qkv = h @ sd[pre + "attn.qkv.weight"].T
    if cfg.qkv_bias:
        qkv = qkv + sd[pre + "attn.qkv.bias"]
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    outs = []
    for head in range(heads):
        sl = slice(head * hd, (head + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(hd)
        outs.append(torch.softmax(scores, -1) @ v[..., sl])
    attn = torch.cat(outs, -1) @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
    if cfg.init_values:
        attn = attn * sd[pre + "ls1.gamma"]
    x = x + attn
    h = _layer_norm(x, sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], cfg.eps)
    h = h @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = h @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
    if cfg.init_values:
        h = h * sd[pre + "ls2.gamma"]
    return x + h


def _reference_layers(
    model: VisionTransformer, images: torch.Tensor
) -> list[torch.Tensor]:  # x_0 .. x_L, each (B, N, D)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    xs = [_reference_embed(sd, model.config, images)]
    for i in range(model.config.depth):
        xs.append(_reference_block(sd, model.config, i, xs[-1]))
    return xs


def _images(config: ViTConfig, batch: int = 3, side: int | None = None) -> torch.Tensor:
    side = side or config.img_size
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


# ---- tests ----------------------------------------------------------------------------------


def test_parameter_names_are_timms() -> None:
    names = set(VisionTransformer(TINY).state_dict())
    per_block = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    expected |= {f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    expected |= {"norm.weight", "norm.bias"}
    assert names == expected
    dino = set(VisionTransformer(TINY_DINO).state_dict())
    assert {"blocks.0.ls1.gamma", "blocks.1.ls2.gamma"} <= dino
    assert "reg_token" in VisionTransformer(TINY_REG).state_dict()
    pre = set(VisionTransformer(TINY_PRE).state_dict())
    assert "norm_pre.weight" in pre
    assert "patch_embed.proj.bias" not in pre  # timm drops it with pre_norm (CLIP)


def test_dinov2_preset_matches_timm() -> None:
    cfg = PRESETS["vit_small_patch14_dinov2"].vit
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (
        518,
        14,
        384,
        12,
        6,
    )
    assert cfg.init_values == 1e-5
    assert cfg.mlp_ratio == 4.0
    assert cfg.qkv_bias
    assert cfg.reg_tokens == 0
    assert not cfg.no_embed_class
    assert cfg.pos_embed_len == 1 + 37 * 37


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_full_forward_matches_reference(name: str) -> None:
    cfg = CONFIGS[name]
    model = _model(cfg)
    images = _images(cfg)
    xs = _reference_layers(model, images)
    sd = model.state_dict()
    expected = _layer_norm(xs[-1], sd["norm.weight"], sd["norm.bias"], cfg.eps)
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_layer_matches_reference(name: str) -> None:
    cfg = CONFIGS[name]
    model = _model(cfg)
    images = _images(cfg)
    xs = _reference_layers(model, images)
    layers = tuple(range(cfg.depth + 1))
    with torch.inference_mode():
        got = model.forward_intermediates(images, layers, "all")
    rows, cols = cfg.grid_size
    assert got.shape == (cfg.depth + 1, 3, cfg.num_prefix_tokens + rows * cols, cfg.embed_dim)
    for layer in layers:
        torch.testing.assert_close(got[layer], xs[layer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["plain", "dinov2", "registers"])
@pytest.mark.parametrize("layers", [(0,), (1,), (2,), (0, 2), (1, 2), (0, 1, 2)])
def test_cls_capture_equals_cls_rows_of_all_tokens(name: str, layers: tuple[int, ...]) -> None:
    preset = Preset(CONFIGS[name], PRESETS["vit_test_tiny"].data)
    model = _model(CONFIGS[name], seed=3)
    backbone = TorchBackbone(name, preset, model, fingerprint="test", is_random=True)
    images = _images(CONFIGS[name], batch=4)
    full = backbone.forward_features(images, FeatureSpec(layers, "all"))
    cls = backbone.forward_features(images, FeatureSpec(layers, "cls"))
    assert cls.data.shape == (len(layers), 4, 1, CONFIGS[name].embed_dim)
    torch.testing.assert_close(cls.data, full.data[:, :, :1], atol=1e-6, rtol=1e-5)
    assert cls.data.is_contiguous()
    assert full.data.is_contiguous()


def test_x0_is_the_pre_block_embedding() -> None:
    backbone = tiny_backbone_factory(0)
    images = _images(TINY)
    sd = {k: v.detach() for k, v in backbone.model.state_dict().items()}
    feats = backbone.forward_features(images, FeatureSpec((0,), "all"))
    torch.testing.assert_close(feats.layer(0), _reference_embed(sd, TINY, images))


def test_blocks_after_the_last_needed_layer_do_not_run() -> None:
    backbone = tiny_backbone_factory(0)
    images = _images(TINY)
    spec = FeatureSpec((0, 1), "all")
    before = backbone.forward_features(images, spec).data
    calls: list[int] = []
    hook = backbone.model.blocks[1].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            backbone.model.blocks[1].mlp.fc2.weight.add_(1.0)  # break block 2
        after = backbone.forward_features(images, spec).data
        all_layers = backbone.forward_features(images, FeatureSpec((1, 2), "all")).data
    finally:
        hook.remove()
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert calls == [1]  # only the (1, 2) capture ran block 2
    reference = tiny_backbone_factory(0).forward_features(images, FeatureSpec((2,), "all")).data
    assert not torch.allclose(all_layers[1], reference[0])  # block 2 was really changed


def test_features_are_normal_detached_tensors(tiny_backbone: TorchBackbone) -> None:
    feats = tiny_backbone.forward_features(_images(TINY), FeatureSpec((1, 2), "cls"))
    assert not feats.data.is_inference()
    assert not feats.data.requires_grad
    # Training code builds graphs on top of them.
    weight = torch.ones(32, requires_grad=True)
    (feats.data * weight).sum().backward()
    assert weight.grad is not None


def test_layer_out_of_range_is_refused(tiny_backbone: TorchBackbone) -> None:
    with pytest.raises(ValueError, match=r"0\.\.2"):
        tiny_backbone.forward_features(_images(TINY), FeatureSpec((3,), "cls"))


def test_wrong_image_shape_is_refused(tiny_backbone: TorchBackbone) -> None:
    with pytest.raises(ValueError, match="multiple of patch"):
        tiny_backbone.forward_features(torch.zeros(1, 3, 30, 32), FeatureSpec((1,), "cls"))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_backbone.forward_features(torch.zeros(1, 1, 32, 32), FeatureSpec((1,), "cls"))


# ---- position embedding resampling ----------------------------------------------------------


@pytest.mark.parametrize("name", ["dinov2", "registers"])
@pytest.mark.parametrize("side_patches", [2, 4, 5])
def test_other_grid_matches_reference(name: str, side_patches: int) -> None:
    cfg = CONFIGS[name]
    model = _model(cfg)
    images = _images(cfg, batch=2, side=side_patches * cfg.patch_size)
    xs = _reference_layers(model, images)
    with torch.inference_mode():
        got = model.forward_intermediates(images, (0, 2), "all")
    assert got.shape[2] == cfg.num_prefix_tokens + side_patches**2
    torch.testing.assert_close(got[0], xs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], xs[2], atol=1e-5, rtol=1e-5)


def test_native_grid_is_the_identity() -> None:
    pos = torch.randn(1, 1 + 9, 8)
    assert resample_pos_embed(pos, (3, 3), (3, 3), 1) is pos
    # And the bicubic resample itself maps a grid onto the same grid unchanged.
    grid = pos[:, 1:].reshape(1, 3, 3, 8).permute(0, 3, 1, 2)
    same = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same, grid)


def test_resample_keeps_prefix_rows_and_constants() -> None:
    pos = torch.cat([torch.randn(1, 2, 4), torch.full((1, 9, 4), 0.7)], dim=1)
    out = resample_pos_embed(pos, (3, 3), (5, 4), num_prefix=2)
    assert out.shape == (1, 2 + 20, 4)
    torch.testing.assert_close(out[:, :2], pos[:, :2])
    torch.testing.assert_close(out[:, 2:], torch.full((1, 20, 4), 0.7))


def test_shrinking_is_not_antialiased() -> None:
    # DINOv2 (and its ONNX exports) resample without antialiasing; with it, this would differ.
    pos = torch.randn(1, 1 + 37 * 37, 4, generator=torch.Generator().manual_seed(0))
    out = resample_pos_embed(pos, (37, 37), (16, 16), 1)
    grid = pos[:, 1:].reshape(1, 37, 37, 4).permute(0, 3, 1, 2)
    plain = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    aa = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out[:, 1:], plain.permute(0, 2, 3, 1).reshape(1, 256, 4))
    assert not torch.allclose(plain, aa)


def test_resampled_pos_embed_is_cached_and_invalidated(monkeypatch: pytest.MonkeyPatch) -> None:
    import restuning.vit as vit_module

    calls: list[tuple[int, int]] = []
    real = vit_module.resample_pos_embed

    def counting(pos, old, new, num_prefix):  # type: ignore[no-untyped-def]
        calls.append(new)
        return real(pos, old, new, num_prefix)

    monkeypatch.setattr(vit_module, "resample_pos_embed", counting)
    model = _model(TINY_DINO)
    images = _images(TINY_DINO, batch=1, side=56)
    with torch.inference_mode():
        first = model.forward_intermediates(images, (0,), "all")
        second = model.forward_intermediates(images, (0,), "all")
    assert calls == [(4, 4)]
    torch.testing.assert_close(first, second, atol=0, rtol=0)

    # New weights (in place, as load_state_dict writes them) must not see the stale entry.
    other = _model(TINY_DINO, seed=9)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        reloaded = model.forward_intermediates(images, (0,), "all")
        fresh = other.forward_intermediates(images, (0,), "all")
    assert calls == [(4, 4), (4, 4), (4, 4)]
    torch.testing.assert_close(reloaded, fresh)

    # A cast replaces the parameter: again a fresh resample, in the new dtype.
    model.to(torch.float64)
    with torch.inference_mode():
        cast = model.forward_intermediates(images.double(), (0,), "all")
    assert cast.dtype == torch.float64
    assert len(calls) == 4

    # Outside inference mode nothing is cached (autograd and export see a plain graph).
    with torch.no_grad():
        model.forward_intermediates(images.double(), (0,), "all")
        model.forward_intermediates(images.double(), (0,), "all")
    assert len(calls) == 6


def test_fixed_size_model_refuses_other_grids() -> None:
    model = _model(dataclasses.replace(TINY, dynamic_img_size=False))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        model(torch.zeros(1, 3, 40, 40))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(TINY, num_heads=3)
    with pytest.raises(ValueError, match="multiple"):
        dataclasses.replace(TINY, img_size=30)
    with pytest.raises(ValueError, match="init_values"):
        dataclasses.replace(TINY, init_values=-1.0)


def test_random_init_is_seeded_and_global_rng_free() -> None:
    torch.manual_seed(123)
    a = VisionTransformer(TINY_DINO)
    a.init_weights(5)
    torch.manual_seed(456)
    b = VisionTransformer(TINY_DINO)
    b.init_weights(5)
    c = VisionTransformer(TINY_DINO)
    c.init_weights(6)
    for (name, ta), tb, tc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(ta, tb), name
        if ta.numel() > 64 and "norm" not in name and "bias" not in name and "gamma" not in name:
            assert not torch.equal(ta, tc), name
    assert torch.all(a.state_dict()["blocks.0.ls1.gamma"] == TINY_DINO.init_values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_close_to_cpu_fp32() -> None:
    cpu = tiny_backbone_factory(0)
    gpu = tiny_backbone_factory(0).to("cuda", torch.bfloat16)
    images = _images(TINY)
    spec = FeatureSpec((0, 1, 2), "all")
    want = cpu.forward_features(images, spec).data
    got = gpu.forward_features(images, spec).data
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), want, atol=0.05, rtol=0.05)


def test_matches_timm_when_installed() -> None:
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    for cfg in (TINY, TINY_DINO, TINY_REG):
        theirs = timm_vit.VisionTransformer(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            init_values=cfg.init_values,
            reg_tokens=cfg.reg_tokens,
            no_embed_class=cfg.no_embed_class,
            num_classes=5,
        ).eval()
        ours = VisionTransformer(cfg).eval()
        state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("head.")}
        ours.load_state_dict(state, strict=True)
        images = _images(cfg)
        with torch.no_grad():
            torch.testing.assert_close(ours(images), theirs.forward_features(images))

"""load_backbone: strict timm-named checkpoints, clear errors, random init, fingerprints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from restuning.backbone import BackboneLoadError, TorchBackbone, fingerprint_of, load_backbone
from restuning.features import FeatureSpec
from restuning.presets import PRESETS
from restuning.vit import VisionTransformer

ARCH = "vit_test_tiny"
TINY = PRESETS[ARCH]


def _state(seed: int = 7) -> dict[str, torch.Tensor]:
    """A vit_test_tiny state dict under timm names, from a model other than random:0."""
    model = VisionTransformer(TINY.vit)
    model.init_weights(seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _assert_weights(backbone: TorchBackbone, state: dict[str, torch.Tensor]) -> None:
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor.float()), key


def _features(backbone: TorchBackbone) -> torch.Tensor:
    return backbone.forward_features(_images(), FeatureSpec((0, 1, 2), "all")).data


def test_loads_safetensors_strictly(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    backbone = load_backbone(ARCH, str(path))
    _assert_weights(backbone, state)
    assert not backbone.is_random
    assert backbone.dropped_keys == ()
    reference = VisionTransformer(TINY.vit).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = reference(_images())
        got = backbone.final_norm(_features(backbone)[2])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_loads_torch_state_dicts(tmp_path: Path, suffix: str, wrapper: str | None) -> None:
    state = _state()
    path = tmp_path / f"w{suffix}"
    payload = state if wrapper is None else {wrapper: state, "epoch": 3}
    torch.save(payload, path)
    backbone = load_backbone(ARCH, path)
    _assert_weights(backbone, state)


def test_half_precision_checkpoint_is_upcast(tmp_path: Path) -> None:
    state = {k: v.half() for k, v in _state().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    backbone = load_backbone(ARCH, str(path))
    assert backbone.dtype == torch.float32
    _assert_weights(backbone, state)


def test_classifier_head_is_dropped(tmp_path: Path) -> None:
    state = _state()
    plain = tmp_path / "plain.safetensors"
    save_file(state, str(plain))
    with_head = tmp_path / "head.safetensors"
    head = {"head.weight": torch.randn(10, 32), "head.bias": torch.zeros(10)}
    save_file({**state, **head}, str(with_head))
    backbone = load_backbone(ARCH, str(with_head))
    assert backbone.dropped_keys == ("head.bias", "head.weight")
    _assert_weights(backbone, state)
    # The classifier does not change the features, so it does not change the fingerprint.
    assert backbone.fingerprint == load_backbone(ARCH, str(plain)).fingerprint


def test_missing_keys_are_named(tmp_path: Path) -> None:
    state = _state()
    del state["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(ARCH, str(path))
    message = str(err.value)
    assert "1 missing keys (blocks.1.mlp.fc2.weight)" in message
    assert ARCH in message
    assert "unexpected" not in message


def test_unexpected_keys_are_named_and_counted(tmp_path: Path) -> None:
    state = _state()
    extra = {f"blocks.{i}.norm1.weight": torch.ones(32) for i in range(2, 9)}
    path = tmp_path / "w.pt"
    torch.save({**state, **extra}, path)
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(ARCH, path)
    message = str(err.value)
    assert "7 unexpected keys (blocks.2.norm1.weight" in message
    assert "(2 more)" in message  # five named, the rest counted
    assert "missing" not in message


def test_shape_mismatches_are_named(tmp_path: Path) -> None:
    state = _state()
    state["pos_embed"] = torch.zeros(1, 1 + 8 * 8, 32)  # a 64 px checkpoint
    del state["cls_token"]
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(ARCH, str(path))
    message = str(err.value)
    assert "pos_embed: checkpoint (1, 65, 32) vs model (1, 17, 32)" in message
    assert "1 missing keys (cls_token)" in message


def test_wrong_arch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_state(), str(path))
    with pytest.raises(BackboneLoadError, match="missing keys"):
        load_backbone("vit_tiny_patch16_224", str(path))


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    state = _state()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneLoadError, match=r"NaN/Inf \(blocks\.0\.attn\.qkv\.weight\)"):
        load_backbone(ARCH, str(path))


class _Payload:
    """Not a tensor: a weights-only load must refuse to rebuild it."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled!",))


def test_pickles_with_objects_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _state(), "extra": _Payload()}, path)
    with pytest.raises(BackboneLoadError, match="cannot read weights"):
        load_backbone(ARCH, path)
    assert "unpickled!" not in capsys.readouterr().out


def test_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({**_state(), "note": "hello"}, path)
    with pytest.raises(BackboneLoadError, match="not tensors: note"):
        load_backbone(ARCH, path)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ("does-not-exist.safetensors", "not found"),
        ("random:", "integer seed"),
        ("random:-1", "integer seed"),
        ("random:abc", "integer seed"),
    ],
)
def test_bad_weight_specs(weights: str, match: str) -> None:
    with pytest.raises(BackboneLoadError, match=match):
        load_backbone(ARCH, weights)


def test_unknown_suffix_and_garbage(tmp_path: Path) -> None:
    onnx = tmp_path / "w.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(BackboneLoadError, match="unsupported weights file"):
        load_backbone(ARCH, onnx)
    garbage = tmp_path / "w.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(BackboneLoadError, match="cannot read weights"):
        load_backbone(ARCH, garbage)


def test_unknown_arch_lists_known_names() -> None:
    with pytest.raises(BackboneLoadError) as err:
        load_backbone("vit_huge_nope", "random:0")
    for name in PRESETS:
        assert name in str(err.value)


def test_random_init_is_deterministic() -> None:
    a = load_backbone(ARCH, "random:3")
    b = load_backbone(ARCH, "random:3")
    c = load_backbone(ARCH, "random:4")
    assert a.is_random
    _assert_weights(b, a.model.state_dict())
    torch.testing.assert_close(_features(a), _features(b), atol=0, rtol=0)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert not torch.allclose(_features(a), _features(c))


def test_fingerprint_depends_on_weights_not_on_their_source(tmp_path: Path) -> None:
    random0 = load_backbone(ARCH, "random:0")
    path = tmp_path / "same.safetensors"
    save_file(random0.model.state_dict(), str(path))
    from_file = load_backbone(ARCH, str(path))
    assert from_file.fingerprint == random0.fingerprint
    assert len(from_file.fingerprint) == 16
    int(from_file.fingerprint, 16)  # hex

    state = random0.model.state_dict()
    state["blocks.1.mlp.fc2.bias"] = state["blocks.1.mlp.fc2.bias"] + 1e-6
    nudged = tmp_path / "nudged.safetensors"
    save_file(state, str(nudged))
    assert load_backbone(ARCH, str(nudged)).fingerprint != random0.fingerprint


def test_fingerprint_covers_arch_and_configs() -> None:
    state = _state()
    base = fingerprint_of(ARCH, TINY, state)
    assert fingerprint_of(ARCH, TINY, state) == base
    assert fingerprint_of("vit_other", TINY, state) != base
    other_data = dataclasses.replace(TINY, data=dataclasses.replace(TINY.data, crop_pct=1.0))
    assert fingerprint_of(ARCH, other_data, state) != base
    other_vit = dataclasses.replace(TINY, vit=dataclasses.replace(TINY.vit, eps=1e-5))
    assert fingerprint_of(ARCH, other_vit, state) != base


def test_backbone_metadata_and_frozen_final_norm() -> None:
    backbone = load_backbone(ARCH, "random:0")
    assert backbone.arch == ARCH
    assert (backbone.dim, backbone.depth, backbone.num_prefix_tokens) == (32, 2, 1)
    assert backbone.config == TINY.vit
    assert backbone.data_config == TINY.data
    assert isinstance(backbone.final_norm, torch.nn.LayerNorm)
    assert backbone.final_norm is backbone.model.norm
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training


def test_to_dtype_keeps_fingerprint_and_casts_features() -> None:
    backbone = load_backbone(ARCH, "random:0")
    fp32 = _features(backbone)
    fingerprint = backbone.fingerprint
    assert backbone.to(dtype=torch.float64) is backbone
    assert backbone.dtype == torch.float64
    fp64 = _features(backbone)  # float32 input is cast to the weights' dtype
    assert fp64.dtype == torch.float64
    torch.testing.assert_close(fp64.float(), fp32, atol=1e-5, rtol=1e-5)
    assert backbone.fingerprint == fingerprint
    bf16 = load_backbone(ARCH, "random:0", dtype=torch.bfloat16)
    assert bf16.fingerprint == fingerprint
    assert _features(bf16).dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(set(PRESETS) - {ARCH}))
def test_real_presets_build_and_run(arch: str) -> None:
    backbone = load_backbone(arch, "random:0")
    _, height, width = backbone.data_config.input_size
    images = torch.randn(1, 3, height, width)
    depth = backbone.depth
    feats = backbone.forward_features(images, FeatureSpec((0, depth // 2, depth), "cls"))
    assert feats.data.shape == (3, 1, 1, backbone.dim)
    assert torch.isfinite(feats.data).all()

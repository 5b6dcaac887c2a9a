"""ONNX export of backbone features: graph contract, metadata, parity with torch, int8, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from restuning import onnx_export
from restuning.backbone import TorchBackbone, load_backbone
from restuning.features import FeatureSpec, TokenSelection
from restuning.onnx_export import (
    INPUT_NAME,
    OnnxExportError,
    export_backbone_onnx,
    output_name,
    parse_layers,
    read_metadata,
)
from restuning.onnx_quant import cpu_has_vnni, quantize_backbone_onnx
from restuning.preprocess import preprocess_batch
from server.engine.runtime_onnx import CachedExports
from tests.fixtures.models import tiny_image

PARITY_REL = 1e-4
"""float32 ONNX Runtime vs torch: max |diff| / max |torch| (measured ~1e-7 on the tiny model)."""
INT8_REL = 0.1
"""int8 vs float32 torch, same measure; dynamic int8 rounds every MatMul input (~1e-2 typical)."""
INT8_MIN_COSINE = 0.995
"""int8 vs float32: mean per-row cosine similarity of the features."""


def photos(backbone: TorchBackbone, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` real photo crops preprocessed for ``backbone``: (n, 3, H, W)."""
    return preprocess_batch([tiny_image(i, seed=seed) for i in range(n)], backbone.data_config)


def run_onnx(
    path: Path, images: torch.Tensor, layers: tuple[int, ...]
) -> torch.Tensor:  # (L', B, N', D)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output_name(layer) for layer in layers]
    outputs = session.run(names, {INPUT_NAME: images.numpy()})
    return torch.from_numpy(np.stack(outputs))


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return float((got - want).abs().max() / want.abs().max())


def describe(got: torch.Tensor, want: torch.Tensor) -> str:
    return f"max abs diff {float((got - want).abs().max()):.3e}, rel {rel_diff(got, want):.3e}"


def mean_cosine(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(got, want, dim=-1).mean())


def torch_features(
    backbone: TorchBackbone, images: torch.Tensor, layers: tuple[int, ...], tokens: TokenSelection
) -> torch.Tensor:
    return backbone.forward_features(images, FeatureSpec(layers, tokens)).data


# ---------------------------------------------------------------------------- graph contract


@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_graph_outputs_and_metadata(
    tiny_backbone: TorchBackbone, tiny_onnx: CachedExports, tokens: TokenSelection
) -> None:
    path = tiny_onnx.paths[tokens]
    model = onnx.load(str(path))
    depth, dim = tiny_backbone.depth, tiny_backbone.dim
    n_tokens = 1 if tokens == "cls" else 17  # 32 px / patch 8 = 4 x 4 grid + CLS
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    assert [o.name for o in model.graph.output] == [f"x{layer}" for layer in range(depth + 1)]
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        assert dims[0].dim_param, f"{out.name}: the batch axis must be dynamic"
        assert [d.dim_value for d in dims[1:]] == [n_tokens, dim]
    meta = read_metadata(path)
    assert meta["restune.fingerprint"] == tiny_backbone.fingerprint
    assert meta["restune.arch"] == "vit_test_tiny"
    assert meta["restune.tokens"] == tokens
    assert parse_layers(meta["restune.layers"]) == tuple(range(depth + 1))
    assert meta["restune.exporter"] == "dynamo"
    assert meta["restune.int8"] == "0"


@pytest.mark.parametrize("tokens", ["cls", "all"])
@pytest.mark.parametrize("layers", [(0,), (2,), (1, 2), (0, 1, 2)])
@pytest.mark.parametrize("batch", [1, 3])
def test_parity_with_torch(
    tiny_backbone: TorchBackbone,
    tiny_onnx: CachedExports,
    tokens: TokenSelection,
    layers: tuple[int, ...],
    batch: int,
) -> None:
    images = photos(tiny_backbone, batch)
    got = run_onnx(tiny_onnx.paths[tokens], images, layers)
    want = torch_features(tiny_backbone, images, layers, tokens)
    assert got.shape == want.shape
    assert rel_diff(got, want) <= PARITY_REL, (
        f"ONNX Runtime vs torch ({tokens}, layers {layers}): {describe(got, want)}"
    )


def test_export_of_a_layer_subset(tiny_backbone: TorchBackbone, tmp_path: Path) -> None:
    done = export_backbone_onnx(tiny_backbone, tmp_path / "sub.onnx", tokens="cls", layers=(1, 2))
    assert done.layers == (1, 2)
    assert [o.name for o in onnx.load(str(done.path)).graph.output] == ["x1", "x2"]
    assert read_metadata(done.path)["restune.layers"] == "1,2"
    images = photos(tiny_backbone, 2, seed=1)
    got = run_onnx(done.path, images, (1, 2))
    want = torch_features(tiny_backbone, images, (1, 2), "cls")
    assert rel_diff(got, want) <= PARITY_REL, describe(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.onnx"], "a temp file was left"


def test_torchscript_fallback_when_dynamo_fails(
    tiny_backbone: TorchBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    done = export_backbone_onnx(tiny_backbone, tmp_path / "ts.onnx", tokens="all")
    assert done.exporter == "torchscript"
    meta = read_metadata(done.path)
    assert meta["restune.exporter"] == "torchscript"
    assert meta["restune.fingerprint"] == tiny_backbone.fingerprint
    images = photos(tiny_backbone, 2)
    got = run_onnx(done.path, images, (0, 2))
    want = torch_features(tiny_backbone, images, (0, 2), "all")
    assert rel_diff(got, want) <= PARITY_REL, f"TorchScript export vs torch: {describe(got, want)}"


def test_failed_export_leaves_nothing(
    tiny_backbone: TorchBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        Path(str(args[3])).write_bytes(b"half a model")  # a partial write, then failure
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    with pytest.raises(OnnxExportError, match=r"dynamo.*torchscript"):
        export_backbone_onnx(tiny_backbone, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": (3,)}, "0..2"),
        ({"layers": (2, 1)}, "sorted"),
        ({"layers": ()}, "non-empty"),
        ({"tokens": "some"}, "tokens"),
    ],
)
def test_bad_arguments(
    tiny_backbone: TorchBackbone, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        export_backbone_onnx(tiny_backbone, tmp_path / "x.onnx", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "x.onnx").exists()


def test_export_needs_float32_cpu(tmp_path: Path) -> None:
    half = load_backbone("vit_test_tiny", "random:0", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 CPU"):
        export_backbone_onnx(half, tmp_path / "x.onnx")


# ---------------------------------------------------------------------------- int8


@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_int8_is_quantized_and_close(
    tiny_backbone: TorchBackbone, tiny_onnx_int8: CachedExports, tokens: TokenSelection
) -> None:
    path = tiny_onnx_int8.paths[tokens]
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" in ops, f"no int8 MatMul in the quantized graph: {sorted(ops)}"
    meta = read_metadata(path)
    assert meta["restune.int8"] == "1"
    assert meta["restune.fingerprint"] == tiny_backbone.fingerprint
    assert meta["restune.tokens"] == tokens
    layers = tuple(range(tiny_backbone.depth + 1))
    images = photos(tiny_backbone, 4)
    got = run_onnx(path, images, layers)
    want = torch_features(tiny_backbone, images, layers, tokens)
    diff, cosine = rel_diff(got, want), mean_cosine(got, want)
    report = f"int8 vs float32 torch ({tokens}): {describe(got, want)}, mean cosine {cosine:.5f}"
    assert diff <= INT8_REL, report
    assert cosine >= INT8_MIN_COSINE, report
    assert diff > 0, "int8 features equal float32 exactly: nothing was quantized"


def test_reduce_range_without_vnni(tiny_onnx: CachedExports, tmp_path: Path) -> None:
    # 7-bit weights: the largest |int8 weight| stored must be at most 64 (not 127).
    out = quantize_backbone_onnx(tiny_onnx.paths["all"], tmp_path / "q7.onnx", reduce_range=True)
    model = onnx.load(str(out))
    quantized = [
        onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    ]
    assert quantized, "no int8 weights"
    assert max(int(np.abs(q.astype(np.int32)).max()) for q in quantized) <= 64


def test_cpu_has_vnni_reads_cpuinfo(tmp_path: Path) -> None:
    with_vnni = tmp_path / "a"
    with_vnni.write_text("flags\t\t: fpu sse avx512f avx512_vnni avx512bw\n")
    without = tmp_path / "b"
    without.write_text("flags\t\t: fpu sse avx2\n")
    assert cpu_has_vnni(with_vnni) is True
    assert cpu_has_vnni(without) is False
    assert cpu_has_vnni(tmp_path / "missing") is False


# ---------------------------------------------------------------------------- CLI


def test_cli_export_int8(tiny_backbone: TorchBackbone, tmp_path: Path) -> None:
    from clients.cli import main

    out = tmp_path / "tiny.int8.onnx"
    argv = ["export-onnx", "--backbone", "vit_test_tiny", "--weights", "random:0"]
    code = main([*argv, "--out", str(out), "--tokens", "all", "--int8"])
    assert code == 0
    meta = read_metadata(out)
    assert (meta["restune.tokens"], meta["restune.int8"]) == ("all", "1")
    assert meta["restune.fingerprint"] == tiny_backbone.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.int8.onnx"]
    assert main([*argv, "--out", str(tmp_path / "x.txt")]) == 2


# ---------------------------------------------------------------------------- a real preset


@pytest.mark.slow
@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_real_preset_parity(tmp_path: Path, tokens: TokenSelection) -> None:
    backbone = load_backbone("vit_small_patch16_224", "random:0")
    done = export_backbone_onnx(backbone, tmp_path / "s.onnx", tokens=tokens)
    images = photos(backbone, 2)
    every = tuple(range(backbone.depth + 1))
    got = run_onnx(done.path, images, every)
    want = torch_features(backbone, images, every, tokens)
    for layers in [(0,), (6,), (12,), (1, 5, 9, 12), every]:
        pos = list(layers)
        assert rel_diff(got[pos], want[pos]) <= PARITY_REL, (
            f"vit_small_patch16_224 {tokens} layers {layers}: {describe(got[pos], want[pos])}"
        )

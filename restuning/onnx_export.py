"""Export a backbone's intermediate features to ONNX: one named output per captured layer.

The exported graph maps normalised images ``images`` (B, 3, H, W) float32 to outputs
``x{l}`` (B, N', D) for each captured layer l, with N' = 1 for CLS-only capture. Only the batch
axis is dynamic: the server always feeds the backbone's own input size. ONNX Runtime always runs
every node of a graph, so a session answers only the layer subsets of what was exported;
exporting all layers 0..L lets one file serve every task.

The model's ``metadata_props`` record what was exported (``restune.*`` keys), so a cached file
can be checked against the backbone that wants to use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from restuning.backbone import TorchBackbone
from restuning.features import TokenSelection
from restuning.vit import VisionTransformer

log = logging.getLogger(__name__)

Exporter = Literal["dynamo", "torchscript"]

DEFAULT_OPSET = 20
"""Opset 20 has LayerNormalization and an exact (erf) Gelu as single ops."""
EXPORT_FORMAT = "1"
"""Bumped when the exported graph's contract changes; part of cache keys."""
INPUT_NAME = "images"
BATCH_AXIS = "batch"
_EXAMPLE_BATCH = 2  # not 1: a traced size-1 axis can be specialised away

# metadata_props keys
META_FORMAT = "restune.format"
META_ARCH = "restune.arch"
META_FINGERPRINT = "restune.fingerprint"
META_TOKENS = "restune.tokens"
META_LAYERS = "restune.layers"
META_EXPORTER = "restune.exporter"
META_INT8 = "restune.int8"


class OnnxExportError(RuntimeError):
    """Neither exporter could produce the graph (the message holds both errors)."""


def output_name(layer: int) -> str:
    """Graph output holding x_layer."""
    return f"x{layer}"


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_backbone_onnx` wrote."""

    path: Path
    exporter: Exporter
    """``dynamo`` (torch.export based) or ``torchscript`` (the fallback)."""
    tokens: TokenSelection
    layers: tuple[int, ...]
    metadata: dict[str, str]
    seconds: float


class FeatureGraph(nn.Module):
    """The module that is exported: images -> (x_l for l in layers), one tensor per layer."""

    def __init__(
        self, model: VisionTransformer, layers: Sequence[int], tokens: TokenSelection
    ) -> None:
        super().__init__()
        self.model = model
        self.layers = tuple(layers)
        self.tokens: TokenSelection = tokens

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:  # each (B, N', D)
        return tuple(self.model.intermediates(images, self.layers, self.tokens))


def export_metadata(
    backbone: TorchBackbone, tokens: TokenSelection, layers: Sequence[int], exporter: Exporter
) -> dict[str, str]:
    """The ``restune.*`` metadata_props of an export."""
    return {
        META_FORMAT: EXPORT_FORMAT,
        META_ARCH: backbone.arch,
        META_FINGERPRINT: backbone.fingerprint,
        META_TOKENS: tokens,
        META_LAYERS: ",".join(str(layer) for layer in layers),
        META_EXPORTER: exporter,
        META_INT8: "0",
    }


def parse_layers(text: str) -> tuple[int, ...]:
    """Inverse of the ``restune.layers`` encoding."""
    return tuple(int(part) for part in text.split(",") if part)


def export_backbone_onnx(
    backbone: TorchBackbone,
    path: str | os.PathLike[str],
    *,
    tokens: TokenSelection = "cls",
    layers: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
) -> OnnxExport:
    """Write ``backbone``'s features for ``layers`` (default all 0..L) as an ONNX file.

    Uses torch's current exporter (``torch.onnx.export(..., dynamo=True)``) and falls back to
    the TorchScript exporter only when that fails (logged; recorded as ``restune.exporter``).
    The file appears atomically: readers see no file or a complete one. The backbone must be
    float32 on the CPU (the exported weights are its weights).
    """
    started = time.perf_counter()
    target = Path(path)
    chosen = _check_layers(backbone, layers)
    if tokens not in ("cls", "all"):
        raise ValueError(f"tokens must be 'cls' or 'all', got {tokens!r}")
    if backbone.dtype != torch.float32 or backbone.device.type != "cpu":
        raise ValueError(
            f"export needs a float32 CPU backbone, got {backbone.dtype} on {backbone.device}"
        )
    graph = FeatureGraph(backbone.model, chosen, tokens).eval()
    _, height, width = backbone.data_config.input_size
    example = torch.zeros(_EXAMPLE_BATCH, 3, height, width)  # (B, 3, H, W)
    names = [output_name(layer) for layer in chosen]
    used: list[Exporter] = []

    def produce(tmp: Path) -> None:
        used.append(_export(graph, example, names, tmp, opset, backbone, tokens))

    write_atomically(target, produce)
    exporter = used[0]
    metadata = export_metadata(backbone, tokens, chosen, exporter)
    seconds = time.perf_counter() - started
    log.info(
        "exported %s (%s tokens, layers %d..%d) to %s with the %s exporter in %.1f s",
        backbone.arch,
        tokens,
        chosen[0],
        chosen[-1],
        target,
        exporter,
        seconds,
    )
    return OnnxExport(target, exporter, tokens, chosen, metadata, seconds)


def _check_layers(backbone: TorchBackbone, layers: Sequence[int] | None) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(backbone.depth + 1))
    chosen = tuple(layers)
    if not chosen or list(chosen) != sorted(set(chosen)):
        raise ValueError(f"layers must be sorted, unique and non-empty, got {list(chosen)}")
    if chosen[0] < 0 or chosen[-1] > backbone.depth:
        raise ValueError(f"layers must lie in 0..{backbone.depth}, got {list(chosen)}")
    return chosen


def _export(
    graph: FeatureGraph,
    example: torch.Tensor,
    names: list[str],
    out: Path,
    opset: int,
    backbone: TorchBackbone,
    tokens: TokenSelection,
) -> Exporter:
    """Export with dynamo, else TorchScript, metadata included; returns which one wrote ``out``."""
    try:
        meta = export_metadata(backbone, tokens, graph.layers, "dynamo")
        _export_dynamo(graph, example, names, out, opset, meta)
        return "dynamo"
    except Exception as dynamo_err:  # any exporter failure: try the other one
        log.warning(
            "dynamo ONNX export failed (%s: %s); falling back to the TorchScript exporter",
            type(dynamo_err).__name__,
            dynamo_err,
        )
        try:
            _export_torchscript(graph, example, names, out, opset)
            set_metadata(out, export_metadata(backbone, tokens, graph.layers, "torchscript"))
        except Exception as ts_err:
            raise OnnxExportError(
                f"ONNX export failed: dynamo: {dynamo_err}; torchscript: {ts_err}"
            ) from ts_err
        return "torchscript"


def _export_dynamo(
    graph: FeatureGraph,
    example: torch.Tensor,
    names: list[str],
    out: Path,
    opset: int,
    metadata: Mapping[str, str],
) -> None:
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=65536)
    with _quiet_exporter():
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            verbose=False,
        )
    if program is None:
        raise OnnxExportError("the dynamo exporter returned no program")
    # Set on the in-memory model: saves a reload of the written file.
    program.model.metadata_props.update(metadata)
    program.save(str(out))


def _export_torchscript(
    graph: FeatureGraph, example: torch.Tensor, names: list[str], out: Path, opset: int
) -> None:
    axes = {name: {0: BATCH_AXIS} for name in [INPUT_NAME, *names]}
    with _quiet_exporter():
        torch.onnx.export(
            graph,
            (example,),
            str(out),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes=axes,
            opset_version=opset,
        )


# The exporter's passes log every rewrite at INFO; the missing-torchvision notes are warnings.
_CHATTY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' chatter (pass-by-pass INFO logs, tracer warnings)."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def set_metadata(path: Path, values: Mapping[str, str]) -> None:
    """Set (replace) ``values`` in the ONNX file's metadata_props, in place."""
    import onnx

    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata_props of an ONNX file."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


@contextlib.contextmanager
def _temporary_sibling(target: Path) -> Iterator[Path]:
    """A temp path next to ``target`` (same filesystem, so the rename is atomic), removed on
    failure or if left behind."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    # The rename must not land before the data does.
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def write_atomically(target: Path, produce: Callable[[Path], None]) -> Path:
    """Run ``produce(tmp)`` on a temp sibling of ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_sibling(target) as tmp:
        produce(tmp)
        _fsync(tmp)
        # mkstemp makes the file owner-only; a cache shared by replicas must be readable.
        tmp.chmod(0o644)
        os.replace(tmp, target)
    return target

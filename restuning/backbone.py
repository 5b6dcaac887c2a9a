"""The frozen backbone the server runs once per batch: loading, fingerprint, feature capture."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from restuning.features import Features, FeatureSpec
from restuning.presets import DataConfig, Preset, UnknownPresetError, get_preset
from restuning.vit import VisionTransformer, ViTConfig

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
FINGERPRINT_CHARS = 16
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")

# Checkpoint keys that never influence the trunk's features and are dropped before strict
# matching: timm classifier heads (`head`, `fc_norm`) and DINOv2's pretraining `mask_token`.
# The bypass brings its own heads, so a timm checkpoint with or without a classifier loads.
IGNORED_PREFIXES = ("head.", "fc_norm.", "mask_token")

_LISTED = 5  # keys named per category in a load error


class BackboneLoadError(Exception):
    """Weights that cannot be loaded into the named backbone (the message says why)."""


def fingerprint_of(arch: str, preset: Preset, tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 prefix over the name, both configs and every tensor (sorted by key).

    Tuners are trained on features of one exact backbone; this identifies it. Computed on
    the float32 weights, so it does not change with the serving device or dtype.
    """
    digest = hashlib.sha256()
    header = {
        "arch": arch,
        "vit": dataclasses.asdict(preset.vit),
        "data": dataclasses.asdict(preset.data),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


class TorchBackbone:
    """A frozen ViT in eval mode with the metadata tuners are checked against."""

    def __init__(
        self,
        arch: str,
        preset: Preset,
        model: VisionTransformer,
        *,
        fingerprint: str,
        is_random: bool,
        dropped_keys: tuple[str, ...] = (),
    ) -> None:
        if not isinstance(model.norm, nn.LayerNorm):
            raise BackboneLoadError(f"{arch}: the bypass needs a final LayerNorm (final_norm)")
        model.eval().requires_grad_(False)
        self.arch = arch
        self.config: ViTConfig = preset.vit
        self.data_config: DataConfig = preset.data
        self.model = model
        self.fingerprint = fingerprint
        self.is_random = is_random
        self.dropped_keys = dropped_keys
        """Checkpoint keys dropped as not part of the trunk (see IGNORED_PREFIXES)."""

    @property
    def dim(self) -> int:
        """Width D of the residual stream."""
        return self.config.embed_dim

    @property
    def depth(self) -> int:
        """Number of blocks L; valid layers are 0..L."""
        return self.config.depth

    @property
    def num_prefix_tokens(self) -> int:
        """Rows before the patch tokens (1 for CLS-only ViTs; more with register tokens)."""
        return self.config.num_prefix_tokens

    @property
    def final_norm(self) -> nn.LayerNorm:
        """The backbone's own final LayerNorm (frozen; shared with the model, not a copy)."""
        norm = self.model.norm
        assert isinstance(norm, nn.LayerNorm)
        return norm

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.model.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights, and of the features returned."""
        return self.model.pos_embed.dtype

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> TorchBackbone:
        """Move (and cast) the weights in place; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def forward_features(self, images: torch.Tensor, spec: FeatureSpec) -> Features:
        """Capture ``spec``'s layers for a batch of normalised images (B, 3, H, W).

        Runs under inference_mode and stops after block max(spec.layers). The returned data
        (L', B, N', D) is a fresh contiguous tensor in the backbone's dtype; it is a normal
        (non-inference) tensor, so training code may feed it to modules that need grads.
        """
        images = images.to(device=self.device, dtype=self.dtype, non_blocking=True)
        with torch.inference_mode():
            parts = self.model.intermediates(images, spec.layers, spec.tokens)
        # Stacking outside inference mode turns the result into a normal tensor.
        return Features(spec, torch.stack(parts))  # (L', B, N', D)


def load_backbone(
    arch: str,
    weights: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TorchBackbone:
    """Build preset ``arch`` and load ``weights`` into it with strict key matching.

    ``weights``: a ``.safetensors`` file, a ``.pt``/``.pth``/``.bin`` state dict (loaded with
    ``weights_only=True``; ``{"state_dict": ...}`` or ``{"model": ...}`` wrappers accepted), or
    ``random:<seed>`` for a seeded random init (``is_random`` is then True: not for serving).
    """
    try:
        preset = get_preset(arch)
    except UnknownPresetError as err:
        raise BackboneLoadError(str(err)) from None
    # Built without storage, then allocated uninitialised: every tensor is written below
    # (seeded init or a strict load), so torch's default init would be wasted work.
    with torch.device("meta"):
        model = VisionTransformer(preset.vit)
    model.to_empty(device="cpu")
    spec = os.fspath(weights)
    dropped: tuple[str, ...] = ()
    if spec.startswith(RANDOM_PREFIX):
        model.init_weights(_parse_seed(spec))
        is_random = True
        logger.warning("backbone %s has RANDOM weights (%s): features are meaningless", arch, spec)
    else:
        state = _read_state_dict(Path(spec))
        dropped = tuple(sorted(k for k in state if k.startswith(IGNORED_PREFIXES)))
        kept = {k: v for k, v in state.items() if k not in dropped}
        _check_state_dict(arch, spec, model, kept)
        model.load_state_dict(kept, strict=True)
        is_random = False
        if dropped:
            logger.info("backbone %s: dropped %d non-trunk keys %s", arch, len(dropped), dropped)
    fingerprint = fingerprint_of(arch, preset, model.state_dict())
    backbone = TorchBackbone(
        arch, preset, model, fingerprint=fingerprint, is_random=is_random, dropped_keys=dropped
    )
    return backbone.to(device=device, dtype=dtype)


def _parse_seed(spec: str) -> int:
    text = spec[len(RANDOM_PREFIX) :]
    if not re.fullmatch(r"[0-9]{1,19}", text):  # ASCII: str.isdigit() takes superscripts
        raise BackboneLoadError(f"random weights need a non-negative integer seed, got {spec!r}")
    return int(text)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file; never unpickles arbitrary objects."""
    if not path.is_file():
        raise BackboneLoadError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            raw: Any = load_file(str(path), device="cpu")
        elif suffix in PICKLE_SUFFIXES:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise BackboneLoadError(
                f"unsupported weights file {path.name!r}: use .safetensors, "
                f"{', '.join(PICKLE_SUFFIXES)} or random:<seed>"
            )
    except BackboneLoadError:
        raise
    except Exception as err:  # any parse failure is a bad file, whatever the library raised
        raise BackboneLoadError(f"cannot read weights {path}: {err}") from err
    if isinstance(raw, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), dict):
                raw = raw[wrapper]
                break
    if not isinstance(raw, dict) or not raw:
        raise BackboneLoadError(f"{path} holds no state dict (name -> tensor)")
    bad = [str(k) for k, v in raw.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise BackboneLoadError(f"{path}: entries that are not tensors: {_names(bad)}")
    return dict(raw)


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    return shown + (f", ... ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else "")


def _check_state_dict(
    arch: str, source: str, model: nn.Module, state: Mapping[str, torch.Tensor]
) -> None:
    """Raise one BackboneLoadError listing every way ``state`` differs from ``model``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state))
        if state[key].shape != expected[key].shape
    ]
    not_float = [k for k in sorted(state) if k in expected and not state[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_names(mismatched)})")
    if not_float:
        problems.append(f"{len(not_float)} non-float tensors ({_names(not_float)})")
    if not problems:
        non_finite = [k for k in sorted(state) if not bool(torch.isfinite(state[k]).all())]
        if non_finite:
            problems.append(f"{len(non_finite)} tensors with NaN/Inf ({_names(non_finite)})")
    if problems:
        raise BackboneLoadError(
            f"weights {source} do not match backbone {arch}: " + "; ".join(problems)
        )

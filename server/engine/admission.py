"""Admission of a tuner artifact against the backbone this server runs, before it is stored.

The store validates an artifact on its own terms (header, shapes, values: torch-free, in
``tuners_store.artifact``); this module adds what only a server that runs a backbone can check:

1. the config describes this backbone: its width D and depth L equal the running backbone's
   and the bypass's block range lies within it (an artifact can copy the fingerprint string
   from ``/readyz`` and still claim another depth);
2. the module builds from the artifact's tensors;
3. a dry run on one zero input of the backbone's feature shape answers finite values of the
   shape the task promises.

What passes is what the registry serves, so a registered version can always be loaded. Loads of
versions written by others (another replica, an older server, a store edited by hand) run the
same checks and fail with an :class:`~tuners_store.artifact.ArtifactError` the registry
reports per task. Everything here is blocking (torch): callers run it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from restuning.artifact_io import build_validated
from restuning.features import Features
from restuning.tuners import TaskModule
from server.engine.runtime import Backbone
from tuners_store.artifact import (
    DEFAULT_MAX_ARTIFACT_BYTES,
    ArtifactError,
    ArtifactHeader,
    validate_artifact,
)
from tuners_store.config import TunerConfig

DRY_RUN_TOKENS = {"cls": 1, "all": 2}
"""Tokens per layer in the dry run. Every op of a bypass is per token and the input is zero,
so all tokens are equal: two (CLS + one patch) stand for the backbone's N under mean pooling."""
_MAX_DETAIL_CHARS = 300


@dataclass(frozen=True)
class Admitted:
    """An artifact that passed admission: its validated header and its built module."""

    header: ArtifactHeader
    module: TaskModule
    """float32, in eval mode, on the device it was admitted for."""


def check_compatible(config: TunerConfig, backbone: Backbone) -> None:
    """Refuse a config whose shapes do not describe ``backbone`` (``artifact_incompatible``).

    The fingerprint check (``backbone_mismatch``) comes first, in validation; this catches a
    config that copies the fingerprint but lies about the width, the depth or the layers.
    """
    ref, bypass = config.backbone, config.bypass
    problems = []
    if ref.dim != backbone.dim:
        problems.append(f"backbone.dim is {ref.dim}, the backbone's width is {backbone.dim}")
    if ref.depth != backbone.depth:
        problems.append(f"backbone.depth is {ref.depth}, the backbone has {backbone.depth} blocks")
    if bypass.layers[1] > backbone.depth:
        problems.append(
            f"bypass.layers {list(bypass.layers)} reach past block {backbone.depth}, the last"
        )
    if problems:
        raise ArtifactError(
            "artifact_incompatible",
            f"tuner {config.name!r} does not fit the running backbone {backbone.arch}: "
            + "; ".join(problems),
        )


def dry_run(module: TaskModule) -> None:
    """Run ``module`` on one zero input (1 image) and check its output's shape and values.

    Raises ``artifact_dry_run_failed``. A NaN/huge scale, weights that overflow, or a head that
    does not give ``num_outputs`` values all show here rather than in a served batch.
    """
    config = module.config
    spec = module.feature_spec
    device = next(module.parameters()).device
    tokens = DRY_RUN_TOKENS[spec.tokens]
    zeros = torch.zeros(
        len(spec.layers), 1, tokens, config.backbone.dim, device=device
    )  # (L', 1, N', D)
    with torch.inference_mode():
        out = module(Features(spec, zeros))  # (1, C)
    expected = (1, config.num_outputs)
    if tuple(out.shape) != expected:
        raise ArtifactError(
            "artifact_dry_run_failed",
            f"tuner {config.name!r} answered shape {list(out.shape)} on one input; the config "
            f"promises {list(expected)}",
        )
    if not bool(torch.isfinite(out).all()):
        raise ArtifactError(
            "artifact_dry_run_failed",
            f"tuner {config.name!r} answered non-finite values (NaN/Inf) on a zero input",
        )


def build_admitted(
    header: ArtifactHeader, data: bytes, backbone: Backbone, device: torch.device
) -> TaskModule:
    """Check ``header`` against ``backbone``, build its module on ``device`` and dry-run it.

    ``header`` must come from validating ``data`` (it is not validated again). Any failure of
    the build or the dry run is an :class:`ArtifactError`; running out of memory is not the
    artifact's fault and propagates as it is.
    """
    check_compatible(header.config, backbone)
    try:
        module = build_validated(header, data, backbone.final_norm, dtype=torch.float32)
        module = module.to(device=device, dtype=torch.float32).eval()
        dry_run(module)
    except (ArtifactError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # any other failure is the artifact's, named below
        detail = f"{type(exc).__name__}: {exc}"[:_MAX_DETAIL_CHARS]
        raise ArtifactError(
            "artifact_dry_run_failed",
            f"tuner {header.config.name!r} could not be built or run: {detail}",
        ) from exc
    return module


def admit(
    data: bytes,
    backbone: Backbone,
    device: torch.device,
    *,
    max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    sha256: str | None = None,
) -> Admitted:
    """Validate ``data`` once and admit it against ``backbone``; blocking (run it in a thread).

    ``sha256``: the digest of ``data`` if the caller has it (not computed again). Raises
    :class:`ArtifactError` with a stable code; nothing is stored here.
    """
    header = validate_artifact(
        data,
        expect_fingerprint=backbone.fingerprint,
        expect_arch=backbone.arch,
        max_bytes=max_bytes,
        sha256=sha256,
    )
    return Admitted(header, build_admitted(header, data, backbone, device))

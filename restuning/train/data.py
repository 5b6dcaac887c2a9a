"""Labelled images to train on: an ImageFolder directory, a CSV manifest, or a built-in demo set.

- Directory: one sub-folder per class (``root/cat/*.jpg``, ``root/dog/*.png``), searched
  recursively; classes are the sorted folder names.
- CSV manifest, paths relative to the CSV's folder; a header row is recognised by its first cell
  (``path``, ``image``, ``file`` or ``filename``):
  ``path,label`` (classification), ``path,label1;label2`` (multilabel, ``;``-separated, may be
  empty), ``path,out1,out2,...`` (regression: the header is required and names the outputs).
- ``demo:NAME``: a set built from images that ship with scikit-learn / scikit-image
  (:mod:`restuning.train.demo_data`).

Every image carries the sha256 of its content, which keys its cached features.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from restuning.preprocess import PreprocessMode, preprocess
from restuning.presets import DataConfig
from tuners_store.config import TaskKind

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""File suffixes (lower case) read as images in a directory."""
HEADER_CELLS = frozenset({"path", "image", "file", "filename"})
"""First cells that mark a CSV row as the header."""
DEMO_PREFIX = "demo:"
MULTILABEL_SEPARATOR = ";"


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and line when there is one."""


@dataclass(frozen=True)
class ImageRef:
    """One image: a file or in-memory pixels, with the sha256 that keys its features."""

    sha256: str
    """Hex digest of the file's bytes, or of the pixels' shape and bytes."""
    path: Path | None = None
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)
    """(H, W) or (H, W, 3) uint8 when the image is not a file."""

    @classmethod
    def from_file(cls, path: str | Path) -> ImageRef:
        """An image file; its bytes are hashed now (not decoded)."""
        p = Path(path)
        digest = hashlib.sha256()
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return cls(digest.hexdigest(), path=p)

    @classmethod
    def from_array(cls, pixels: np.ndarray) -> ImageRef:
        """In-memory uint8 pixels (H, W) grey or (H, W, 3) RGB."""
        if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
            raise ValueError(
                f"expected uint8 (H, W[, 3]) pixels, got {pixels.dtype} {pixels.shape}"
            )
        if pixels.ndim == 3 and pixels.shape[2] != 3:
            raise ValueError(f"expected 3 channels, got {pixels.shape[2]}")
        array = np.ascontiguousarray(pixels)
        digest = hashlib.sha256(f"pixels:{array.shape}".encode())
        digest.update(array.tobytes())
        return cls(digest.hexdigest(), pixels=array)

    def problem(self) -> str | None:
        """Why this image cannot be trained on, read from its header only (cheap: nothing is
        decoded); ``None`` when it looks readable."""
        if self.path is None:
            return None
        try:
            with Image.open(self.path) as img:
                width, height = img.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if width < 1 or height < 1:
            return f"no pixels ({width}x{height})"
        return None

    def prepare(self, data_config: DataConfig, mode: PreprocessMode = "exact") -> Tensor:
        """The backbone's input (3, H, W) for this image, the way the server prepares an
        upload in the same ``mode`` (a file is cropped before it is converted, and in
        ``fast`` mode a JPEG decodes at a reduced scale), so training and serving see the same
        pixels."""
        if self.pixels is not None:
            return preprocess(Image.fromarray(self.pixels).convert("RGB"), data_config, mode)
        assert self.path is not None
        try:
            with Image.open(self.path) as img:
                img.seek(0)  # first frame of an animation / first page of a TIFF
                return preprocess(img, data_config, mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # A truncated file passes the header check and fails here: name it, no traceback.
            raise DataError(f"cannot read image {self.path}: {exc}") from exc

    def open(self) -> Image.Image:
        """The decoded image in RGB."""
        if self.pixels is not None:
            return Image.fromarray(self.pixels).convert("RGB")
        assert self.path is not None
        with Image.open(self.path) as img:
            return img.convert("RGB")


@dataclass(frozen=True)
class LabeledImages:
    """Images with their targets for one task kind.

    ``targets``: (n,) long class indices for classification and embedding (classes name the
    groups whose members should embed close together); (n, C) float for multilabel (0/1) and
    regression (values).
    """

    task: TaskKind
    labels: tuple[str, ...]
    """Class names, or output names for regression."""
    images: tuple[ImageRef, ...]
    targets: torch.Tensor  # (n,) long | (n, C) float32
    source: str
    """What the data was (recorded in the artifact's training summary)."""
    val_mask: tuple[bool, ...] | None = None
    """A fixed validation split (True = validation) that overrides the random one, for sets
    whose images overlap (crops of one photo must not straddle train and validation)."""

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.targets.shape[0] != n:
            raise DataError(f"{n} images but {self.targets.shape[0]} targets")
        if self.val_mask is not None and len(self.val_mask) != n:
            raise DataError(f"{n} images but a validation mask of {len(self.val_mask)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def class_indices(self) -> np.ndarray | None:
        """(n,) class of each image for kinds that have one (stratified splits), else None."""
        if self.task in ("classification", "embedding"):
            return self.targets.numpy()
        return None

    def subset(self, index: Sequence[int] | np.ndarray) -> LabeledImages:
        """The images at ``index`` (in that order), without a fixed split."""
        idx = [int(i) for i in index]
        return LabeledImages(
            task=self.task,
            labels=self.labels,
            images=tuple(self.images[i] for i in idx),
            targets=self.targets[torch.tensor(idx, dtype=torch.long)],
            source=self.source,
        )


MAX_NAMED_BAD_IMAGES = 10
"""Unreadable images a refusal lists by name (the rest are counted)."""


def check_images(data: LabeledImages, *, skip_bad: bool = False) -> tuple[LabeledImages, int]:
    """Every image's header read before minutes of feature computation: unreadable ones are
    named up front (``DataError``) or, with ``skip_bad``, left out; returns the data to train
    on and how many were left out."""
    bad = [(i, ref, why) for i, ref in enumerate(data.images) if (why := ref.problem())]
    if not bad:
        return data, 0
    if not skip_bad:
        named = "; ".join(f"{ref.path}: {why}" for _, ref, why in bad[:MAX_NAMED_BAD_IMAGES])
        more = f" (and {len(bad) - MAX_NAMED_BAD_IMAGES} more)" if len(bad) > 10 else ""
        raise DataError(
            f"{len(bad)} of {len(data)} images cannot be read: {named}{more}. Remove them or "
            "pass --skip-bad-images"
        )
    dropped = {i for i, _, _ in bad}
    keep = [i for i in range(len(data)) if i not in dropped]
    if not keep:
        raise DataError(f"none of the {len(data)} images can be read")
    kept = data.subset(keep)
    if data.val_mask is not None:
        kept = replace(kept, val_mask=tuple(data.val_mask[i] for i in keep))
    return kept, len(dropped)


def load_data(spec: str | Path, task: TaskKind = "classification") -> LabeledImages:
    """A dataset from a directory, a ``.csv`` manifest, or ``demo:NAME``."""
    text = str(spec)
    if text.startswith(DEMO_PREFIX):
        from restuning.train.demo_data import load_demo

        data = load_demo(text.removeprefix(DEMO_PREFIX))
        if data.task != task and not (task == "embedding" and data.task == "classification"):
            raise DataError(f"demo set {text!r} is a {data.task} set, not {task}")
        return replace(data, task=task)
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path, task)
    if path.is_file() and path.suffix.lower() == ".csv":
        return load_csv(path, task)
    raise DataError(f"{spec}: expected a directory of class folders, a .csv file or demo:NAME")


def load_image_folder(root: Path, task: TaskKind = "classification") -> LabeledImages:
    """One class per sub-folder of ``root``, every image below it (recursively)."""
    if task not in ("classification", "embedding"):
        raise DataError(f"a class-folder directory gives classes, not {task} targets; use a CSV")
    classes: list[str] = []
    images: list[ImageRef] = []
    targets: list[int] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            continue
        classes.append(folder.name)
        images.extend(ImageRef.from_file(p) for p in files)
        targets.extend([len(classes) - 1] * len(files))
    if len(classes) < 2:
        raise DataError(f"{root}: need at least two class folders with images, found {classes}")
    return LabeledImages(
        task, tuple(classes), tuple(images), torch.tensor(targets), source=f"folder:{root}"
    )


def load_csv(path: Path, task: TaskKind = "classification") -> LabeledImages:
    """A CSV manifest (see the module docstring for the three layouts)."""
    rows: list[tuple[int, list[str]]] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            rows.append((line_no, cells))
    header: list[str] | None = None
    if rows and rows[0][1][0].lower() in HEADER_CELLS:
        header = rows.pop(0)[1]
    if not rows:
        raise DataError(f"{path}: no rows")
    base = path.parent
    refs: list[ImageRef] = []
    for line_no, cells in rows:
        image_path = (base / cells[0]).resolve()
        if not image_path.is_file():
            raise DataError(f"{path}:{line_no}: image {cells[0]!r} not found")
        refs.append(ImageRef.from_file(image_path))
    source = f"csv:{path}"
    if task == "regression":
        return _regression(path, header, rows, refs, source)
    if task == "multilabel":
        return _multilabel(path, rows, refs, source)
    for line_no, cells in rows:
        if len(cells) != 2 or not cells[1]:
            raise DataError(f"{path}:{line_no}: expected 'path,label'")
    classes = sorted({cells[1] for _, cells in rows})
    if len(classes) < 2:
        raise DataError(f"{path}: need at least two classes, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([index[cells[1]] for _, cells in rows])
    return LabeledImages(task, tuple(classes), tuple(refs), targets, source)


def _multilabel(
    path: Path, rows: list[tuple[int, list[str]]], refs: list[ImageRef], source: str
) -> LabeledImages:
    per_row: list[set[str]] = []
    for line_no, cells in rows:
        if len(cells) > 2:
            raise DataError(f"{path}:{line_no}: expected 'path,label1;label2'")
        text = cells[1] if len(cells) == 2 else ""
        per_row.append({t.strip() for t in text.split(MULTILABEL_SEPARATOR) if t.strip()})
    labels = sorted(set().union(*per_row))
    if not labels:
        raise DataError(f"{path}: no labels")
    index = {label: i for i, label in enumerate(labels)}
    targets = torch.zeros(len(rows), len(labels))
    for row, names in enumerate(per_row):
        for name in names:
            targets[row, index[name]] = 1.0
    return LabeledImages("multilabel", tuple(labels), tuple(refs), targets, source)


def _regression(
    path: Path,
    header: list[str] | None,
    rows: list[tuple[int, list[str]]],
    refs: list[ImageRef],
    source: str,
) -> LabeledImages:
    if header is None or len(header) < 2:
        raise DataError(f"{path}: a regression CSV needs a header 'path,out1,out2,...'")
    outputs = header[1:]
    values: list[list[float]] = []
    for line_no, cells in rows:
        if len(cells) != len(header):
            raise DataError(f"{path}:{line_no}: expected {len(header)} cells, got {len(cells)}")
        try:
            row = [float(c) for c in cells[1:]]
        except ValueError:
            raise DataError(f"{path}:{line_no}: values must be numbers: {cells[1:]}") from None
        if not all(math.isfinite(v) for v in row):
            raise DataError(f"{path}:{line_no}: values must be finite: {cells[1:]}")
        values.append(row)
    targets = torch.tensor(values, dtype=torch.float32)
    return LabeledImages("regression", tuple(outputs), tuple(refs), targets, source)


def split_indices(
    data: LabeledImages, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices, sorted; the same for the same data, fraction and seed.

    A fixed ``val_mask`` wins. Sets with classes are split per class, and a class keeps at
    least one training image.
    """
    n = len(data)
    if data.val_mask is not None:
        mask = np.asarray(data.val_mask, dtype=bool)
        return np.flatnonzero(~mask), np.flatnonzero(mask)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    classes = data.class_indices
    groups = (
        [np.flatnonzero(classes == c) for c in np.unique(classes)]
        if classes is not None
        else [np.arange(n)]
    )
    val: list[np.ndarray] = []
    for members in groups:
        shuffled = rng.permutation(members)
        take = min(round(len(members) * val_fraction), len(members) - 1)
        val.append(shuffled[: max(take, 0)])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return train_idx, val_idx

"""Built-in datasets made of images that ship inside scikit-learn and scikit-image (no download).

- ``digits``: scikit-learn's 1,797 handwritten digits (8 x 8, 10 classes), drawn as dark ink
  on white; the backbone's preprocessing upsamples them to its input size.
- ``parity``: the same images, labelled even / odd.
- ``digit-props``: the same images, multilabel: even, prime, square, five-plus.
- ``faces``: scikit-image's ``lfw_subset``: 100 faces and 100 non-face patches (25 x 25).
- ``textures``: crops of scikit-image's brick, grass and gravel photos; training crops come from
  the top of each photo and validation crops from the bottom, so no pixel is in both.

``per_class`` caps the images of each class (digits: per digit), for quick runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import torch

from restuning.train.data import DataError, ImageRef, LabeledImages

DIGIT_PROPS: dict[str, frozenset[int]] = {
    "even": frozenset({0, 2, 4, 6, 8}),
    "prime": frozenset({2, 3, 5, 7}),
    "square": frozenset({0, 1, 4, 9}),
    "five-plus": frozenset({5, 6, 7, 8, 9}),
}
"""Labels of ``digit-props`` and the digits that carry each."""
TEXTURES = ("brick", "grass", "gravel")
TEXTURE_CROPS = 48
"""Crops per texture by default (a quarter of them for validation)."""
TEXTURE_VAL_TOP = 320
"""Validation crops lie entirely below this row of the 512-row photos; training crops above."""
TEXTURE_CROP_SIDES = (64, 160)
FACE_COUNT = 100
"""``lfw_subset``: the first 100 images are faces, the last 100 are not."""
DIGIT_INK_MAX = 16.0
"""scikit-learn's digits hold ink amounts 0..16."""


@cache
def _digits(per_class: int | None) -> tuple[tuple[ImageRef, ...], np.ndarray]:
    """(images, digit of each), at most ``per_class`` of each digit, in dataset order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    values = np.asarray(bunch.images, dtype=np.float64)  # (n, 8, 8) ink 0..16
    digits = np.asarray(bunch.target, dtype=np.int64)  # (n,)
    keep = _first_per_class(digits, per_class)
    # Dark ink on white paper: what a photo of a written digit looks like.
    paper = 255.0 - np.round(values[keep] * (255.0 / DIGIT_INK_MAX))
    refs = tuple(ImageRef.from_array(img.astype(np.uint8)) for img in paper)
    return refs, digits[keep]


def _first_per_class(classes: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` members of every class, in their original order."""
    if per_class is None:
        return np.arange(len(classes))
    if per_class < 1:
        raise DataError(f"per_class must be at least 1, got {per_class}")
    keep = [np.flatnonzero(classes == c)[:per_class] for c in np.unique(classes)]
    return np.sort(np.concatenate(keep))


def digits_set(per_class: int | None = None) -> LabeledImages:
    """Handwritten digits, 10 classes."""
    refs, digits = _digits(per_class)
    labels = tuple(str(d) for d in range(10))
    return LabeledImages(
        "classification", labels, refs, torch.from_numpy(digits), "demo:digits (scikit-learn)"
    )


def parity_set(per_class: int | None = None) -> LabeledImages:
    """Handwritten digits labelled even / odd."""
    refs, digits = _digits(per_class)
    return LabeledImages(
        "classification",
        ("even", "odd"),
        refs,
        torch.from_numpy(digits % 2),
        "demo:parity (scikit-learn digits)",
    )


def digit_props_set(per_class: int | None = None) -> LabeledImages:
    """Handwritten digits with several properties each (multilabel)."""
    refs, digits = _digits(per_class)
    targets = torch.tensor(
        [[float(int(d) in members) for members in DIGIT_PROPS.values()] for d in digits]
    )
    return LabeledImages(
        "multilabel",
        tuple(DIGIT_PROPS),
        refs,
        targets,
        "demo:digit-props (scikit-learn digits)",
    )


def faces_set(per_class: int | None = None) -> LabeledImages:
    """Faces vs other patches from scikit-image's ``lfw_subset``."""
    from skimage.data import lfw_subset

    patches = np.asarray(lfw_subset(), dtype=np.float64)  # type: ignore[no-untyped-call]  # (200, 25, 25) in [0, 1]
    classes = (np.arange(len(patches)) >= FACE_COUNT).astype(np.int64)  # 0 face, 1 not
    keep = _first_per_class(classes, per_class)
    refs = tuple(ImageRef.from_array(np.round(p * 255.0).astype(np.uint8)) for p in patches[keep])
    return LabeledImages(
        "classification",
        ("face", "not-face"),
        refs,
        torch.from_numpy(classes[keep]),
        "demo:faces (scikit-image lfw_subset)",
    )


def textures_set(per_class: int | None = None, seed: int = 0) -> LabeledImages:
    """Random crops of three texture photos; validation crops from a separate region."""
    from skimage import data as skdata

    count = per_class if per_class is not None else TEXTURE_CROPS
    if count < 2:
        raise DataError(f"textures need at least 2 crops per class, got {count}")
    n_val = max(1, count // 4)
    rng = np.random.default_rng(seed)
    refs: list[ImageRef] = []
    targets: list[int] = []
    val_mask: list[bool] = []
    for label, name in enumerate(TEXTURES):
        photo = np.asarray(getattr(skdata, name)(), dtype=np.uint8)  # (512, 512) grey
        for i in range(count):
            is_val = i >= count - n_val
            top_lo, top_hi = (TEXTURE_VAL_TOP, photo.shape[0]) if is_val else (0, TEXTURE_VAL_TOP)
            side = int(rng.integers(TEXTURE_CROP_SIDES[0], TEXTURE_CROP_SIDES[1] + 1))
            side = min(side, top_hi - top_lo)
            top = int(rng.integers(top_lo, top_hi - side + 1))
            left = int(rng.integers(0, photo.shape[1] - side + 1))
            refs.append(ImageRef.from_array(photo[top : top + side, left : left + side]))
            targets.append(label)
            val_mask.append(is_val)
    return LabeledImages(
        "classification",
        TEXTURES,
        tuple(refs),
        torch.tensor(targets),
        "demo:textures (scikit-image brick/grass/gravel crops)",
        val_mask=tuple(val_mask),
    )


DEMO_SETS: dict[str, Callable[[int | None], LabeledImages]] = {
    "digits": digits_set,
    "parity": parity_set,
    "digit-props": digit_props_set,
    "faces": faces_set,
    "textures": textures_set,
}
"""Built-in sets by name (``--data demo:NAME``)."""


def load_demo(name: str, per_class: int | None = None) -> LabeledImages:
    """The built-in set ``name``, capped at ``per_class`` images per class."""
    try:
        build = DEMO_SETS[name]
    except KeyError:
        raise DataError(f"unknown demo set {name!r}; known: {', '.join(DEMO_SETS)}") from None
    try:
        return build(per_class)
    except ImportError as err:
        raise DataError(
            f"demo set {name!r} needs scikit-learn and scikit-image: pip install 'restune[demo]'"
        ) from err

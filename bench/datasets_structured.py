"""Tasks for the accuracy benchmark, generated offline from a fixed seed.

Structured tasks in the spirit of VTAB's structured group (dSprites location and orientation,
CLEVR count and distance), where a linear probe on a frozen CLS token is known to be weak
because the answer is a spatial fact, not "what is in the picture":

- ``loc-x`` / ``loc-y``: one shape (disc, square or triangle) somewhere on a noisy
  background; the class is its centre's column / row bin (8 bins). Both tasks label the same
  images, so their features are computed once.
- ``orientation``: a long isosceles triangle (an arrow) near the centre, turned by a uniform
  angle; the class is the angle's bin (8 bins of 45 degrees).
- ``count``: 1 to 6 shapes that do not touch; the class is their number.
- ``distance``: two discs; the class is the bin of the distance between their centres
  (4 bins).

A natural-image task whose answer is semantic but fine-grained:

- ``photo-crops``: which of 10 scikit-image photos a small crop comes from; training crops
  lie in the left 60% of each photo and test crops in the right 40%, so no test pixel was
  seen in training.

Every class is drawn first and uniformly (balanced sets), then the image is drawn to match
it. One ``numpy`` generator seeded from (seed, task, split) draws everything, so a seed gives
the same pixels on every machine; train and test of a task use different streams.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from restuning.train.data import ImageRef, LabeledImages

SIDE = 64
"""Rendered images are SIDE x SIDE RGB; the backbone's preprocessing resizes them."""
LOC_BINS = 8
ORIENT_BINS = 8
MAX_COUNT = 6
DISTANCE_EDGES = (6.0, 16.0, 26.0, 36.0, 46.0)
"""Centre distances (px) of the ``distance`` bins: [6, 16), [16, 26), [26, 36), [36, 46)."""
NOISE_STD = 10.0
"""Per-pixel Gaussian noise on every image (grey levels)."""
PHOTOS = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "page",
    "hubble_deep_field",
    "immunohistochemistry",
)
"""scikit-image photos of ``photo-crops`` (they ship inside the package), shown in grey so
the class is not a colour cast."""
PHOTO_TRAIN_WIDTH = 0.6
"""Training crops lie left of this fraction of a photo's width, test crops right of it."""
PHOTO_CROP_SIDES = (32, 56)
MAX_IMAGES = 100_000
"""Upper bound on the images one call may generate (they are held in memory)."""

Part = Literal["train", "test"]
STRUCTURED = ("loc-x", "loc-y", "orientation", "count", "distance")
NATURAL = ("photo-crops",)
TASKS = STRUCTURED + NATURAL


@dataclass(frozen=True)
class TaskSplit:
    """One task's fixed training and held-out test images."""

    name: str
    family: Literal["structured", "natural", "demo"]
    train: LabeledImages
    test: LabeledImages


def _rng(seed: int, task: str, part: Part) -> np.random.Generator:
    """A stream per (seed, task, split); ``loc-x`` and ``loc-y`` share the location images."""
    images = "location" if task in ("loc-x", "loc-y") else task
    key = zlib.crc32(f"{images}/{part}".encode())
    return np.random.default_rng([seed, key])


def _background(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A flat random background colour (3,) and the canvas (SIDE, SIDE, 3) float."""
    colour = rng.uniform(30.0, 225.0, size=3)
    return colour, np.broadcast_to(colour, (SIDE, SIDE, 3)).copy()


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour at least 90 grey levels (L2 over RGB) away from ``background``."""
    while True:
        colour = rng.uniform(0.0, 255.0, size=3)
        if float(np.linalg.norm(colour - background)) >= 90.0:
            return colour


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (SIDE, SIDE): column x and row y."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64) + 0.5
    return xs, ys


def _shape_mask(kind: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Boolean (SIDE, SIDE) mask of a disc (0), square (1) or triangle (2) at (cx, cy)."""
    xs, ys = _grid()
    dx, dy = xs - cx, ys - cy
    if kind == 0:
        return np.asarray(dx * dx + dy * dy <= radius * radius)
    # Rotate the plane by -angle, then test the upright shape.
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == 1:
        half = radius * 0.85
        return np.asarray((np.abs(u) <= half) & (np.abs(v) <= half))
    return _triangle(u, v, length=radius * 1.3, width=radius * 1.1)


def _triangle(u: np.ndarray, v: np.ndarray, length: float, width: float) -> np.ndarray:
    """Isosceles triangle pointing along +u: tip at (length, 0), base at u = -length / 2."""
    base = -0.5 * length
    inside_u = (u >= base) & (u <= length)
    half_width = width * (length - u) / (length - base)
    return np.asarray(inside_u & (np.abs(v) <= half_width))


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> ImageRef:
    noisy = canvas + rng.normal(0.0, NOISE_STD, size=canvas.shape)
    return ImageRef.from_array(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    canvas[mask] = colour


def _location(n: int, rng: np.random.Generator) -> tuple[list[ImageRef], np.ndarray]:
    """Images of one shape each and the (n, 2) column and row bins of its centre."""
    refs: list[ImageRef] = []
    bins = np.empty((n, 2), dtype=np.int64)
    margin = 6.0
    width = (SIDE - 2 * margin) / LOC_BINS
    for i in range(n):
        bx, by = int(rng.integers(LOC_BINS)), int(rng.integers(LOC_BINS))
        cx = margin + (bx + rng.uniform(0.0, 1.0)) * width
        cy = margin + (by + rng.uniform(0.0, 1.0)) * width
        background, canvas = _background(rng)
        kind = int(rng.integers(3))
        mask = _shape_mask(kind, cx, cy, rng.uniform(3.5, 6.0), rng.uniform(0, 2 * math.pi))
        _paint(canvas, mask, _contrasting(rng, background))
        refs.append(_finish(rng, canvas))
        bins[i] = (bx, by)
    return refs, bins


def _orientation(n: int, rng: np.random.Generator) -> tuple[list[ImageRef], np.ndarray]:
    """Arrows turned by a uniform angle within their class's 45-degree bin."""
    refs: list[ImageRef] = []
    classes = rng.integers(ORIENT_BINS, size=n)
    step = 2 * math.pi / ORIENT_BINS
    xs, ys = _grid()
    for label in classes:
        angle = (int(label) + rng.uniform(0.0, 1.0)) * step
        cx, cy = SIDE / 2 + rng.uniform(-8, 8), SIDE / 2 + rng.uniform(-8, 8)
        background, canvas = _background(rng)
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = xs - cx, ys - cy
        # Image rows grow downwards: a positive angle turns counter-clockwise on screen.
        u, v = c * dx - s * dy, s * dx + c * dy
        length = rng.uniform(14.0, 20.0)
        _paint(canvas, _triangle(u, v, length, length * 0.35), _contrasting(rng, background))
        refs.append(_finish(rng, canvas))
    return refs, classes.astype(np.int64)


def _place_apart(
    rng: np.random.Generator, radii: list[float], gap: float = 2.0
) -> list[tuple[float, float]] | None:
    """Centres for shapes of ``radii`` inside the canvas that keep ``gap`` px apart."""
    centres: list[tuple[float, float]] = []
    for radius in radii:
        for _ in range(200):
            x, y = rng.uniform(radius + 1, SIDE - radius - 1, size=2)
            if all(
                math.hypot(x - ox, y - oy) >= radius + r2 + gap
                for (ox, oy), r2 in zip(centres, radii, strict=False)
            ):
                centres.append((float(x), float(y)))
                break
        else:
            return None
    return centres


def _count(n: int, rng: np.random.Generator) -> tuple[list[ImageRef], np.ndarray]:
    """1..MAX_COUNT separate shapes; the class is the count minus one."""
    refs: list[ImageRef] = []
    classes = rng.integers(MAX_COUNT, size=n)
    for label in classes:
        count = int(label) + 1
        while True:
            radii = [float(r) for r in rng.uniform(3.5, 6.5, size=count)]
            centres = _place_apart(rng, radii)
            if centres is not None:
                break
        background, canvas = _background(rng)
        for (x, y), radius in zip(centres, radii, strict=True):
            mask = _shape_mask(int(rng.integers(2)), x, y, radius, rng.uniform(0, 2 * math.pi))
            _paint(canvas, mask, _contrasting(rng, background))
        refs.append(_finish(rng, canvas))
    return refs, classes.astype(np.int64)


def _distance(n: int, rng: np.random.Generator) -> tuple[list[ImageRef], np.ndarray]:
    """Two discs whose centre distance falls in the class's bin."""
    refs: list[ImageRef] = []
    bins = len(DISTANCE_EDGES) - 1
    classes = rng.integers(bins, size=n)
    for label in classes:
        lo, hi = DISTANCE_EDGES[int(label)], DISTANCE_EDGES[int(label) + 1]
        radius = 3.0
        while True:
            distance = rng.uniform(max(lo, 2 * radius + 1.0), hi)
            theta = rng.uniform(0.0, 2 * math.pi)
            x1, y1 = rng.uniform(radius + 1, SIDE - radius - 1, size=2)
            x2, y2 = x1 + distance * math.cos(theta), y1 + distance * math.sin(theta)
            if radius + 1 <= x2 <= SIDE - radius - 1 and radius + 1 <= y2 <= SIDE - radius - 1:
                break
        background, canvas = _background(rng)
        colour = _contrasting(rng, background)
        for x, y in ((x1, y1), (x2, y2)):
            _paint(canvas, _shape_mask(0, float(x), float(y), radius, 0.0), colour)
        refs.append(_finish(rng, canvas))
    return refs, classes.astype(np.int64)


def _photos() -> list[np.ndarray]:
    """The PHOTOS as (H, W) uint8 grey."""
    from skimage import data as skdata

    grey: list[np.ndarray] = []
    for name in PHOTOS:
        photo = np.asarray(getattr(skdata, name)(), dtype=np.float64)
        if photo.ndim == 3:
            photo = photo[..., :3] @ np.array([0.299, 0.587, 0.114])
        grey.append(np.clip(np.round(photo), 0, 255).astype(np.uint8))
    return grey


def _photo_crops(n: int, rng: np.random.Generator, part: Part) -> tuple[list[ImageRef], np.ndarray]:
    """Crops of the photos: training ones from the left part, test ones from the right."""
    photos = _photos()
    refs: list[ImageRef] = []
    classes = rng.integers(len(photos), size=n)
    for label in classes:
        photo = photos[int(label)]
        height, width = photo.shape
        split = int(width * PHOTO_TRAIN_WIDTH)
        lo, hi = (0, split) if part == "train" else (split, width)
        side = int(rng.integers(PHOTO_CROP_SIDES[0], PHOTO_CROP_SIDES[1] + 1))
        side = min(side, hi - lo, height)
        left = int(rng.integers(lo, hi - side + 1))
        top = int(rng.integers(0, height - side + 1))
        refs.append(ImageRef.from_array(photo[top : top + side, left : left + side].copy()))
    return refs, classes.astype(np.int64)


def _labels(task: str) -> tuple[str, ...]:
    if task in ("loc-x", "loc-y"):
        return tuple(f"bin{i}" for i in range(LOC_BINS))
    if task == "orientation":
        step = 360 // ORIENT_BINS
        return tuple(f"{i * step}-{(i + 1) * step}deg" for i in range(ORIENT_BINS))
    if task == "count":
        return tuple(str(i) for i in range(1, MAX_COUNT + 1))
    if task == "distance":
        edges = DISTANCE_EDGES
        return tuple(f"{edges[i]:g}-{edges[i + 1]:g}px" for i in range(len(edges) - 1))
    return PHOTOS


def generate(task: str, part: Part, n: int, seed: int) -> LabeledImages:
    """``n`` images of ``task``'s ``part``, the same for the same arguments."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not 1 <= n <= MAX_IMAGES:
        raise ValueError(f"n must lie in [1, {MAX_IMAGES}], got {n}")
    rng = _rng(seed, task, part)
    if task in ("loc-x", "loc-y"):
        refs, bins = _location(n, rng)
        classes = bins[:, 0 if task == "loc-x" else 1]
    elif task == "orientation":
        refs, classes = _orientation(n, rng)
    elif task == "count":
        refs, classes = _count(n, rng)
    elif task == "distance":
        refs, classes = _distance(n, rng)
    else:
        refs, classes = _photo_crops(n, rng, part)
    return LabeledImages(
        "classification",
        _labels(task),
        tuple(refs),
        torch.from_numpy(classes),
        f"generated:{task}/{part} (seed {seed})",
    )


def task_split(task: str, train_size: int, test_size: int, seed: int) -> TaskSplit:
    """``task``'s training and test sets (independent streams of the same seed)."""
    family: Literal["structured", "natural"] = "structured" if task in STRUCTURED else "natural"
    return TaskSplit(
        task,
        family,
        generate(task, "train", train_size, seed),
        generate(task, "test", test_size, seed),
    )


__all__ = ["NATURAL", "STRUCTURED", "TASKS", "TaskSplit", "generate", "task_split"]

"""Training of bypass tuners on a frozen backbone's cached features (``restune train``).

The backbone is frozen and its features are detached, so each image goes through it once; the
features are cached on disk and the bypass + head then train on them in seconds.

- :mod:`~restuning.train.data`: labelled images from a folder, a CSV manifest or a demo set.
- :mod:`~restuning.train.feature_cache`: features computed once per image, kept on disk.
- :mod:`~restuning.train.loop`: the optimisation loop (AdamW, cosine schedule, early stop).
- :mod:`~restuning.train.augment`: per-epoch augmented features when asked for.
- :mod:`~restuning.train.api`: :func:`train_task`, what the CLI and the demo call.
"""

from restuning.train.api import TaskOptions, TrainedTask, train_task
from restuning.train.data import DataError, ImageRef, LabeledImages, load_data
from restuning.train.loop import TrainOptions

__all__ = [
    "DataError",
    "ImageRef",
    "LabeledImages",
    "TaskOptions",
    "TrainOptions",
    "TrainedTask",
    "load_data",
    "train_task",
]

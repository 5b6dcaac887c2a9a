"""Batch buckets: the fixed batch sizes CUDA graphs are captured at, and padding up to them.

A CUDA graph replays fixed shapes, so a batch of n images runs in the graph of the smallest
bucket >= n, its rows n..bucket-1 filled with zeros. Every op of the backbone and the fan-out
is per row, so padded rows change nothing for the real ones and their outputs are dropped.
A batch larger than the largest bucket runs in chunks of that bucket.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # settings import this module: it must not load torch
    import torch

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
"""Powers of two: at most 2x the rows of a batch are computed, and 8 graphs cover 1..128."""

MAX_BUCKET = 4096
"""Largest bucket accepted (a graph's static input at 224 px is 0.6 MB per row)."""


def validate_buckets(values: Iterable[int]) -> tuple[int, ...]:
    """``values`` sorted and unique; raises ``ValueError`` unless 1..MAX_BUCKET, non-empty."""
    buckets = tuple(sorted(set(values)))
    if not buckets:
        raise ValueError("give at least one batch bucket")
    bad = [b for b in buckets if not 1 <= b <= MAX_BUCKET]
    if bad:
        raise ValueError(f"batch buckets must lie in 1..{MAX_BUCKET}, got {bad}")
    return buckets


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding ``rows`` rows; ``None`` when even the largest is too small."""
    if rows < 1:
        raise ValueError("a batch has at least one row")
    for bucket in buckets:
        if bucket >= rows:
            return bucket
    return None


def split_rows(rows: int, buckets: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(start, stop, bucket)`` chunks covering ``rows`` rows: full largest buckets, then the
    smallest bucket that holds the rest."""
    largest = buckets[-1]
    chunks = []
    for start in range(0, rows, largest):
        stop = min(rows, start + largest)
        bucket = bucket_for(stop - start, buckets)
        assert bucket is not None  # stop - start <= largest
        chunks.append((start, stop, bucket))
    return chunks


def pad_rows(batch: torch.Tensor, bucket: int) -> torch.Tensor:
    """``batch`` (n, ...) with zero rows appended up to (bucket, ...); itself when n == bucket."""
    rows = int(batch.shape[0])
    if rows > bucket:
        raise ValueError(f"{rows} rows do not fit a bucket of {bucket}")
    if rows == bucket:
        return batch
    padded = batch.new_zeros((bucket, *batch.shape[1:]))
    padded[:rows] = batch
    return padded


def fill_padded(static: torch.Tensor, batch: torch.Tensor, *, dim: int = 0) -> None:
    """Write ``batch`` into the first rows of a static buffer along ``dim`` and zero the rest.

    The copy is non-blocking (from pinned host memory it overlaps the host's next step).
    """
    rows = int(batch.shape[dim])
    capacity = int(static.shape[dim])
    if rows > capacity:
        raise ValueError(f"{rows} rows do not fit a static buffer of {capacity}")
    static.narrow(dim, 0, rows).copy_(batch, non_blocking=True)
    if rows < capacity:
        # Stale rows of an earlier batch would be harmless (rows are independent), but zeros
        # keep the padded rows' arithmetic finite and the replay deterministic.
        static.narrow(dim, rows, capacity - rows).zero_()

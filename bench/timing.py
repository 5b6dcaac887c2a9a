"""Timing for the suite's sections: the run's clock and threads, medians, percentiles,
interleaved rounds.

On a shared CPU box timings swing by tens of percent between minutes, so sections compare
things measured next to each other: :func:`interleaved` runs every candidate once per round,
round after round, and ratios are taken within a round before the median over rounds.

Every function times on the wall clock unless given ``clock="cpu"``: this process's CPU
time over all its threads, which neighbours on an oversubscribed box barely disturb. The
run's choice (:func:`configure`, ``python -m bench --clock``) is :func:`clock`; a section
opts in by passing it. Use ``cpu`` with one thread only: with two, work that one thread runs
alone would count half, and runtimes whose idle threads spin would count double. Latencies of
services (HTTP, stores, queues) are wall time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Clock = Literal["wall", "cpu"]
PERCENTILES = (50, 95, 99)
_run: dict[str, object] = {"clock": "wall", "threads": 2}


def configure(*, clock: Clock | None = None, threads: int | None = None) -> None:
    """Set the run's clock for compute timings and the torch threads sections use."""
    if clock is not None:
        _run["clock"] = clock
    if threads is not None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        _run["threads"] = threads


def clock() -> Clock:
    """The run's clock for the compute comparisons that opt in."""
    return "cpu" if _run["clock"] == "cpu" else "wall"


def threads() -> int:
    """Torch intra-op threads for the run's sections (2 unless configured)."""
    value = _run["threads"]
    return value if isinstance(value, int) else 2


def once_ms(fn: Callable[[], object], clock: Clock = "wall") -> float:
    """Time of one call of ``fn`` in milliseconds on ``clock``."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    started = now()
    fn()
    return (now() - started) * 1000.0


def median_ms(
    fn: Callable[[], object], *, repeats: int, warmup: int = 1, clock: Clock = "wall"
) -> float:
    """Median time of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, in ms."""
    for _ in range(warmup):
        fn()
    return statistics.median(once_ms(fn, clock) for _ in range(max(1, repeats)))


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``, linear between closest ranks."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(samples: Sequence[float]) -> dict[str, float | int]:
    """``n``, ``mean`` and the p50/p95/p99 of latency samples in ms, rounded for JSON."""
    out: dict[str, float | int] = {"n": len(samples)}
    out["mean_ms"] = round(statistics.fmean(samples), 3) if samples else float("nan")
    for q in PERCENTILES:
        out[f"p{q}_ms"] = round(percentile(samples, q), 3)
    return out


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    repeats: int | Mapping[str, int] = 1,
    clock: Clock = "wall",
) -> dict[str, list[float]]:
    """Per-round times (ms) of every candidate, measured in turn within each round.

    Each round times each candidate once: the median of ``repeats`` calls (one number for
    all, or per candidate name, default 1). Drift of the machine's speed then hits every
    candidate of a round alike. No warm-up here.
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            n = repeats if isinstance(repeats, int) else repeats.get(name, 1)
            samples = [once_ms(fn, clock) for _ in range(max(1, n))]
            times[name].append(statistics.median(samples))
    return times


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median over rounds of ``numerators[i] / denominators[i]`` (same-round ratios)."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


@dataclass(frozen=True)
class Bracketed:
    """Times of candidates each measured between two calls of a reference."""

    times: dict[str, list[float]]
    """ms of every call of each candidate."""
    ratios: dict[str, list[float]]
    """Each call's time over the mean of the reference calls just before and after it."""
    reference: list[float]
    """ms of every reference call."""


def bracketed(
    reference: Callable[[], object],
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    clock: Clock = "wall",
) -> Bracketed:
    """Time ``ref, c1, ref, c2, ..., ref`` ``repeats`` times over.

    Every candidate's ratio is taken against the reference calls that bracket it, seconds
    apart, so a burst of load elsewhere on the machine that lasts longer than a call hits
    numerator and denominator alike.
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    ratios: dict[str, list[float]] = {name: [] for name in candidates}
    refs: list[float] = []
    for _ in range(max(1, repeats) if candidates else 0):
        before = once_ms(reference, clock)
        refs.append(before)
        for name, fn in candidates.items():
            took = once_ms(fn, clock)
            after = once_ms(reference, clock)
            refs.append(after)
            times[name].append(took)
            ratios[name].append(took / ((before + after) / 2.0))
            before = after
    return Bracketed(times, ratios, refs)

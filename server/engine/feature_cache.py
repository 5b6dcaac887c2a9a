"""An LRU of per-image backbone features, bounded in bytes: a hit skips the backbone.

Key: (digest of the backbone input, backbone fingerprint, token selection). Value: the detached
features of one image, (L', N', D), and the layers they hold. An entry serves a lookup when its
layers include the needed ones; an all-token entry also serves a CLS-only lookup. Entries of one
image under one key are merged when a later batch captured other layers, so the cache
converges on the union the traffic needs instead of holding near-duplicates.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from restuning.features import FeatureSpec, TokenSelection
from server.metrics import Metrics

CacheKey = tuple[str, str, TokenSelection]


@dataclass(frozen=True)
class _Entry:
    layers: tuple[int, ...]
    data: torch.Tensor  # (L', N', D), own storage (never a view of a batch)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class FeatureCache:
    """Thread-safe LRU of image features, at most ``capacity_bytes`` of tensor data."""

    def __init__(self, capacity_bytes: int, metrics: Metrics | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self._metrics = metrics
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str, fingerprint: str, spec: FeatureSpec) -> torch.Tensor | None:
        """Features of one image for ``spec``, (len(spec.layers), N', D), or ``None``.

        Counts a hit or a miss. The returned tensor may share storage with the entry; callers
        only read it.
        """
        if not self.enabled:
            self._count(hit=False)
            return None
        # A CLS lookup prefers the small CLS entry, then falls back to an all-token one.
        selections: tuple[TokenSelection, ...] = (
            ("cls", "all") if spec.tokens == "cls" else ("all",)
        )
        with self._lock:
            for tokens in selections:
                key = (digest, fingerprint, tokens)
                entry = self._entries.get(key)
                if entry is None or not set(spec.layers) <= set(entry.layers):
                    continue
                self._entries.move_to_end(key)
                found = _select(entry, spec.layers, tokens, spec.tokens)
                break
            else:
                found = None
        self._count(hit=found is not None)
        return found

    def put(self, digest: str, fingerprint: str, spec: FeatureSpec, data: torch.Tensor) -> None:
        """Remember one image's features ``data`` (len(spec.layers), N', D) captured with ``spec``.

        ``data`` is copied, so a row of a batch tensor does not pin the whole batch in memory.
        """
        if not self.enabled:
            return
        key = (digest, fingerprint, spec.tokens)
        with self._lock:
            old = self._entries.get(key)
            if old is not None and set(spec.layers) <= set(old.layers):
                self._entries.move_to_end(key)
                return
            if old is None:
                entry = _Entry(spec.layers, data.detach().clone())
            else:
                entry = _merge(old, spec.layers, data)
            if entry.nbytes > self.capacity_bytes:
                return
            if old is not None:
                self._remove(key)
            self._entries[key] = entry
            self._bytes += entry.nbytes
            if spec.tokens == "all":
                # An all-token entry answers every CLS lookup it covers; drop the redundant one.
                cls_key: CacheKey = (digest, fingerprint, "cls")
                cls_entry = self._entries.get(cls_key)
                if cls_entry is not None and set(cls_entry.layers) <= set(entry.layers):
                    self._remove(cls_key)
            while self._bytes > self.capacity_bytes:
                self._remove(next(iter(self._entries)))
            self._report()

    def clear(self) -> None:
        """Forget everything (e.g. after the backbone changed)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._report()

    def _remove(self, key: CacheKey) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.cache_bytes.set(self._bytes)

    def _count(self, *, hit: bool) -> None:
        if self._metrics is not None:
            (self._metrics.cache_hits if hit else self._metrics.cache_misses).inc()


def _select(
    entry: _Entry, layers: tuple[int, ...], have: TokenSelection, want: TokenSelection
) -> torch.Tensor:
    """``entry``'s rows for ``layers`` and ``want`` tokens: (len(layers), N', D)."""
    data = entry.data  # (L', N, D)
    if layers != entry.layers:
        data = data[[entry.layers.index(layer) for layer in layers]]
    if want == "cls" and have == "all":
        data = data[:, :1]
    return data


def _merge(old: _Entry, layers: tuple[int, ...], data: torch.Tensor) -> _Entry:
    """One entry holding the union of ``old``'s layers and ``layers`` (same image, backbone)."""
    union = tuple(sorted(set(old.layers) | set(layers)))
    rows = [
        data[layers.index(layer)] if layer in layers else old.data[old.layers.index(layer)]
        for layer in union
    ]
    return _Entry(union, torch.stack(rows))  # (L_union, N', D)

"""The feature cache: coverage rules, byte bound, LRU order, merging, metrics."""

from __future__ import annotations

import torch

from restuning.features import FeatureSpec
from server.engine.feature_cache import FeatureCache
from server.metrics import Metrics

FP = "fingerprint0"
D = 4
TOKENS = 5


def feats(layers: tuple[int, ...], tokens: int, fill: float = 0.0) -> torch.Tensor:
    """(L', N', D) whose value encodes (layer, token): easy to check what came back."""
    out = torch.empty(len(layers), tokens, D)
    for i, layer in enumerate(layers):
        for t in range(tokens):
            out[i, t] = fill + 10 * layer + t
    return out


def test_hit_needs_the_layers_and_tokens() -> None:
    cache = FeatureCache(1 << 20)
    cache.put("img", FP, FeatureSpec((0, 1, 2), "cls"), feats((0, 1, 2), 1))
    got = cache.get("img", FP, FeatureSpec((1, 2), "cls"))
    assert got is not None
    assert torch.equal(got, feats((1, 2), 1))
    assert cache.get("img", FP, FeatureSpec((2, 3), "cls")) is None  # layer 3 missing
    assert cache.get("img", FP, FeatureSpec((1,), "all")) is None  # only CLS rows held
    assert cache.get("img", "other-backbone", FeatureSpec((1,), "cls")) is None
    assert cache.get("other-image", FP, FeatureSpec((1,), "cls")) is None


def test_all_token_entry_serves_cls_lookups_and_replaces_the_cls_entry() -> None:
    cache = FeatureCache(1 << 20)
    cache.put("img", FP, FeatureSpec((1,), "cls"), feats((1,), 1))
    cache.put("img", FP, FeatureSpec((0, 1), "all"), feats((0, 1), TOKENS))
    assert len(cache) == 1  # the CLS entry is redundant now
    got = cache.get("img", FP, FeatureSpec((0, 1), "cls"))
    assert got is not None
    assert torch.equal(got, feats((0, 1), 1))
    assert cache.nbytes == 2 * TOKENS * D * 4


def test_entries_merge_their_layers() -> None:
    cache = FeatureCache(1 << 20)
    cache.put("img", FP, FeatureSpec((0, 1), "cls"), feats((0, 1), 1))
    cache.put("img", FP, FeatureSpec((2, 3), "cls"), feats((2, 3), 1))
    got = cache.get("img", FP, FeatureSpec((0, 1, 2, 3), "cls"))
    assert got is not None
    assert torch.equal(got, feats((0, 1, 2, 3), 1))
    assert len(cache) == 1
    assert cache.nbytes == 4 * D * 4


def test_byte_bound_evicts_least_recently_used() -> None:
    entry = 2 * 1 * D * 4  # two CLS layers of float32
    cache = FeatureCache(3 * entry)
    spec = FeatureSpec((0, 1), "cls")
    for name in ("a", "b", "c"):
        cache.put(name, FP, spec, feats((0, 1), 1))
    assert cache.get("a", FP, spec) is not None  # "a" is now the most recent
    cache.put("d", FP, spec, feats((0, 1), 1))
    assert cache.nbytes == 3 * entry
    assert cache.get("b", FP, spec) is None  # evicted: least recently used
    assert all(cache.get(n, FP, spec) is not None for n in ("a", "c", "d"))


def test_stored_rows_do_not_pin_the_batch() -> None:
    cache = FeatureCache(1 << 20)
    batch = torch.randn(2, 16, 1, D)  # (L', B, N', D)
    cache.put("img", FP, FeatureSpec((0, 1), "cls"), batch[:, 3])
    got = cache.get("img", FP, FeatureSpec((0, 1), "cls"))
    assert got is not None
    assert got.untyped_storage().nbytes() == 2 * D * 4  # its own storage, not the batch's
    batch.zero_()
    assert not torch.equal(got, torch.zeros_like(got))


def test_too_big_or_disabled_stores_nothing() -> None:
    spec = FeatureSpec((0,), "all")
    small = FeatureCache(16)
    small.put("img", FP, spec, feats((0,), TOKENS))
    assert len(small) == 0
    off = FeatureCache(0)
    off.put("img", FP, spec, feats((0,), TOKENS))
    assert off.get("img", FP, spec) is None


def test_metrics_count_hits_misses_and_bytes() -> None:
    metrics = Metrics()
    cache = FeatureCache(1 << 20, metrics)
    spec = FeatureSpec((0,), "cls")
    assert cache.get("img", FP, spec) is None
    cache.put("img", FP, spec, feats((0,), 1))
    assert cache.get("img", FP, spec) is not None
    assert metrics.registry.get_sample_value("restune_feature_cache_hits_total") == 1
    assert metrics.registry.get_sample_value("restune_feature_cache_misses_total") == 1
    assert metrics.registry.get_sample_value("restune_feature_cache_bytes") == D * 4

"""Backbone features computed once per image and kept on disk as safetensors shards.

The backbone is frozen and its features are detached, so an image's features never change for
one backbone, preprocessing and :class:`FeatureSpec`: a namespace directory is keyed by all of
them (the backbone fingerprint covers arch, configs and weights), and inside it each image is
keyed by its content sha256. A training run that sees an image again, or a second run, skips
the backbone for it.

Layout: ``<root>/<namespace>/meta.json`` (what the namespace is, for people) and
``shard-<digest>.safetensors`` files, each one tensor ``features`` (L', M, N', D) float32 plus
the M image keys in its metadata. Shards are written to a temp file and renamed, so a crash
leaves whole shards only; two writers of the same images write the same shard name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from restuning.features import Features, FeatureSpec
from restuning.preprocess import preprocess_batch
from restuning.presets import DataConfig
from restuning.train.data import ImageRef
from restuning.train.progress import Reporter

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"
"""Bumped when the shard layout or the feature computation changes."""
TENSOR_NAME = "features"
SHARD_BYTES = 64 * 1024 * 1024
"""Target size of one shard; CLS-only features of ViT-S fit ~3,000 images in one."""
DEFAULT_BATCH_SIZE = 32


class FeatureBackbone(Protocol):
    """What training needs of a backbone (``TorchBackbone`` and the server's runtimes have it)."""

    @property
    def arch(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def data_config(self) -> DataConfig: ...

    @property
    def final_norm(self) -> nn.LayerNorm: ...

    @property
    def dim(self) -> int: ...

    @property
    def depth(self) -> int: ...

    def forward_features(self, images: Tensor, spec: FeatureSpec) -> Features: ...


def namespace_of(backbone: FeatureBackbone, spec: FeatureSpec) -> dict[str, object]:
    """Everything the cached numbers depend on besides the image itself."""
    return {
        "format": CACHE_FORMAT,
        "arch": backbone.arch,
        "fingerprint": backbone.fingerprint,
        "preprocess": dataclasses.asdict(backbone.data_config),
        "layers": list(spec.layers),
        "tokens": spec.tokens,
        # Features computed in bf16 on a GPU differ from float32 ones; stored as float32 always.
        "compute_dtype": str(getattr(backbone, "dtype", "float32")).removeprefix("torch."),
    }


def compute_features(
    backbone: FeatureBackbone, images: Sequence[ImageRef], spec: FeatureSpec
) -> Tensor:  # (L', B, N', D) float32 on the CPU
    """One backbone forward over ``images`` with the backbone's own preprocessing."""
    pixels = preprocess_batch([ref.open() for ref in images], backbone.data_config)
    return backbone.forward_features(pixels, spec).data.to(device="cpu", dtype=torch.float32)


class FeatureCache:
    """Features of one backbone + preprocessing + spec; on disk under ``root`` (or in memory
    only when ``root`` is None)."""

    def __init__(
        self,
        root: Path | None,
        backbone: FeatureBackbone,
        spec: FeatureSpec,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        reporter: Reporter | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.backbone = backbone
        self.spec = spec
        self.batch_size = batch_size
        self.reporter = reporter or Reporter(False)
        namespace = namespace_of(backbone, spec)
        digest = hashlib.sha256(json.dumps(namespace, sort_keys=True).encode()).hexdigest()
        self.dir = root / digest[:32] if root is not None else None
        self._namespace = namespace
        self._index: dict[str, tuple[Path, int]] | None = None
        self._memory: dict[str, Tensor] = {}  # key -> (L', N', D), this instance's computations
        self.forwards = 0
        """Backbone forward calls made by this instance (tests count them)."""
        self.computed = 0
        """Images whose features this instance computed."""

    def features(self, images: Sequence[ImageRef], desc: str = "features") -> Tensor:
        """(L', n, N', D) float32 features of ``images`` in order, computing the missing ones."""
        if not images:
            raise ValueError("no images")
        index = self._load_index()
        missing: dict[str, ImageRef] = {}
        for ref in images:
            if ref.sha256 not in index and ref.sha256 not in self._memory:
                missing.setdefault(ref.sha256, ref)
        if missing:
            self._compute(list(missing.values()), desc)
        return self._gather([ref.sha256 for ref in images])

    # ------------------------------------------------------------------ internals

    def _load_index(self) -> dict[str, tuple[Path, int]]:
        """key -> (shard, row) for every readable shard on disk (read once per instance)."""
        if self._index is not None:
            return self._index
        index: dict[str, tuple[Path, int]] = {}
        if self.dir is not None and self.dir.is_dir():
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                try:
                    with safe_open(str(shard), framework="pt") as fh:
                        keys = (fh.metadata() or {}).get("keys", "").split()
                except Exception as err:  # a foreign or damaged file: skip it, recompute
                    log.warning("feature cache: ignoring unreadable shard %s: %s", shard, err)
                    continue
                for row, key in enumerate(keys):
                    index.setdefault(key, (shard, row))
        self._index = index
        return index

    def _compute(self, refs: list[ImageRef], desc: str) -> None:
        pending_keys: list[str] = []
        pending: list[Tensor] = []  # each (L', b, N', D)
        shard_rows: int | None = None
        with self.reporter.bar(len(refs), desc, unit="img") as bar:
            for start in range(0, len(refs), self.batch_size):
                chunk = refs[start : start + self.batch_size]
                data = compute_features(self.backbone, chunk, self.spec)  # (L', b, N', D)
                self.forwards += 1
                self.computed += len(chunk)
                for row, ref in enumerate(chunk):
                    self._memory[ref.sha256] = data[:, row]
                if self.dir is not None:
                    pending_keys.extend(ref.sha256 for ref in chunk)
                    pending.append(data)
                    if shard_rows is None:
                        row_bytes = data[:, 0].numel() * data.element_size()
                        shard_rows = max(1, SHARD_BYTES // row_bytes)
                    if len(pending_keys) >= shard_rows:
                        self._write_shard(pending_keys, pending)
                        pending_keys, pending = [], []
                bar.update(len(chunk))
        if pending_keys:
            self._write_shard(pending_keys, pending)

    def _write_shard(self, keys: list[str], parts: list[Tensor]) -> None:
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            _atomic_write_text(meta, json.dumps(self._namespace, indent=2, sort_keys=True))
        data = torch.cat(parts, dim=1).contiguous()  # (L', M, N', D)
        name = hashlib.sha256(" ".join(keys).encode()).hexdigest()[:24]
        path = self.dir / f"shard-{name}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({TENSOR_NAME: data}, tmp, metadata={"keys": " ".join(keys)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        index = self._load_index()
        for row, key in enumerate(keys):
            index.setdefault(key, (path, row))

    def _gather(self, keys: list[str]) -> Tensor:  # (L', n, N', D)
        index = self._load_index()
        from_disk: dict[Path, list[tuple[int, int]]] = {}  # shard -> [(position, row)]
        rows: dict[int, Tensor] = {}
        for pos, key in enumerate(keys):
            cached = self._memory.get(key)
            if cached is not None:
                rows[pos] = cached
            else:
                shard, shard_row = index[key]
                from_disk.setdefault(shard, []).append((pos, shard_row))
        out: Tensor | None = None
        for shard, wanted in from_disk.items():
            stored = load_file(str(shard))[TENSOR_NAME]  # (L', M, N', D)
            if out is None:
                out = _empty_like_rows(stored[:, 0], len(keys))
            positions = torch.tensor([p for p, _ in wanted])
            out[:, positions] = stored[:, torch.tensor([r for _, r in wanted])]
        for pos, features in rows.items():
            if out is None:
                out = _empty_like_rows(features, len(keys))
            out[:, pos] = features
        assert out is not None
        return out


def _empty_like_rows(row: Tensor, n: int) -> Tensor:
    """An uninitialised (L', n, N', D) tensor for rows shaped like ``row`` (L', N', D)."""
    return torch.empty((row.shape[0], n, *row.shape[1:]), dtype=row.dtype)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)

"""Backbone features computed once per image, kept on disk in chunks and read back a batch at a
time, so training memory is bounded by a batch, not by the dataset.

The backbone is frozen and its features are detached, so an image's features never change for
one backbone, preprocessing and :class:`FeatureSpec`: a namespace directory is keyed by all of
them (the backbone fingerprint covers arch, configs and weights) and by the storage dtype, and
inside it each image is keyed by its content sha256. A run that sees an image again, or a run
killed halfway and started again, skips the backbone for every image already on disk.

Layout of ``<root>/<namespace>/``:

- ``meta.json``: what the namespace is, for people.
- ``chunk-<digest>.safetensors``: one tensor ``features`` (M, L', N', D), image-major so that
  one image's features are one contiguous byte range, plus the M image keys in its metadata.
  Stored as float16 (half the bytes of float32, within training noise of it: see the tests);
  a chunk whose values leave float16's range is stored as float32 instead.
- ``manifest.jsonl``: one line per chunk (name, keys, dtype, bytes), appended after the chunk
  is renamed into place. It is the index a run reads instead of opening every chunk; a chunk
  that a killed run renamed but did not list is found by its header and listed.

Chunks are written to ``.tmp-<pid>-*`` files and renamed, so a crash leaves whole chunks only;
two writers of the same images write the same chunk name. Rows are read with ``pread``, one at a
time into the batch's tensor, not memory-mapped: pages of a mapped file count in the process's
RSS as they are touched, so an epoch over a mapped cache would grow RSS to the cache's size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from restuning.features import Features, FeatureSpec
from restuning.preprocess import PreprocessMode
from restuning.presets import DataConfig
from restuning.train.data import ImageRef
from restuning.train.progress import Reporter

log = logging.getLogger(__name__)

CACHE_FORMAT = "2"
"""Bumped when the chunk layout or the feature computation changes (1: float32 shards)."""
TENSOR_NAME = "features"
MANIFEST = "manifest.jsonl"
CHUNK_BYTES = 32 * 1024 * 1024
"""A chunk is written once it holds this many bytes (all-token ViT-S/14 features in float16:
every 16 images, two forwards)..."""
CHUNK_IMAGES = 256
"""... or this many images (CLS-only features: a killed run loses at most this many)."""
DEFAULT_BATCH_SIZE = 32
ALL_TOKENS_BATCH = 8
"""Most images per backbone forward when every token is captured: the capture of 32 ViT-S/14
images is 164 MB of float32, held twice while the backbone stacks its layers. Extracting 64
images for a mean-pooled task peaked at 1.08 GB RSS with 32 per forward, 0.59 GB with 8 (the
process with its backbone loaded: 0.47 GB)."""
DISK_RESERVE_BYTES = 256 * 1024 * 1024
"""Free space a cache write leaves on its disk."""
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest safetensors header read from a chunk (one of 256 keys is ~20 KB)."""
FLOAT16_MAX = float(torch.finfo(torch.float16).max)

StoreDtype = Literal["float16", "float32"]
STORE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, np.dtype[np.generic]]] = {
    "F16": (torch.float16, np.dtype(np.float16)),
    "F32": (torch.float32, np.dtype(np.float32)),
}
_DTYPE_NAMES = {torch.float16: "float16", torch.float32: "float32"}


class CacheSpaceError(ValueError):
    """The features to compute would not fit: over the cache's byte limit or the disk's space."""


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


def namespace_of(
    backbone: FeatureBackbone,
    spec: FeatureSpec,
    store_dtype: StoreDtype = "float16",
    preprocess: PreprocessMode = "exact",
) -> dict[str, object]:
    """Everything the cached numbers depend on besides the image itself."""
    return {
        "format": CACHE_FORMAT,
        "arch": backbone.arch,
        "fingerprint": backbone.fingerprint,
        "preprocess": dataclasses.asdict(backbone.data_config),
        "preprocess_mode": preprocess,
        "layers": list(spec.layers),
        "tokens": spec.tokens,
        # Features computed in bf16 on a GPU differ from float32 ones.
        "compute_dtype": str(getattr(backbone, "dtype", "float32")).removeprefix("torch."),
        "store_dtype": store_dtype,
    }


def compute_features(
    backbone: FeatureBackbone,
    images: Sequence[ImageRef],
    spec: FeatureSpec,
    preprocess: PreprocessMode = "exact",
) -> Tensor:  # (L', B, N', D) float32 on the CPU
    """One backbone forward over ``images`` with the backbone's own preprocessing, in the
    server's ``preprocess`` mode."""
    pixels = torch.stack([ref.prepare(backbone.data_config, preprocess) for ref in images])
    return backbone.forward_features(pixels, spec).data.to(device="cpu", dtype=torch.float32)


@dataclass(frozen=True)
class Chunk:
    """One chunk file: where its (M, L', N', D) tensor starts and how it is stored."""

    path: Path
    keys: tuple[str, ...]
    dtype: torch.dtype
    row_shape: tuple[int, int, int]
    """(L', N', D) of one image."""
    data_start: int
    """Byte offset of row 0 in the file."""

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * _element_size(self.dtype)

    @property
    def end(self) -> int:
        """The file's size: the tensor is its last bytes."""
        return self.data_start + len(self.keys) * self.row_bytes


def read_chunk_header(path: Path) -> Chunk:
    """The chunk's layout from its safetensors header; ValueError if it is not one of ours.

    Every size is checked against the file's own length before it is used.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if not 0 < header_len <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"header length {header_len} out of range")
        header = json.loads(fh.read(header_len))
    entry = header.get(TENSOR_NAME)
    if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES:
        raise ValueError(f"no {TENSOR_NAME!r} tensor of a known dtype")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) for s in shape)):
        raise ValueError(f"expected a 4-d shape, got {shape!r}")
    if not all(0 < s <= size for s in shape):
        raise ValueError(f"shape {shape} out of range")
    dtype = _SAFETENSORS_DTYPES[entry["dtype"]][0]
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and [type(o) for o in offsets] == [int, int]):
        raise ValueError(f"bad data offsets {offsets!r}")
    begin, end = offsets
    data_start = 8 + header_len + begin
    expected = shape[0] * shape[1] * shape[2] * shape[3] * _element_size(dtype)
    if end - begin != expected or data_start + expected > size:
        raise ValueError(f"data offsets {begin}..{end} do not match shape {shape}")
    keys = tuple(str((header.get("__metadata__") or {}).get("keys", "")).split())
    if len(keys) != shape[0]:
        raise ValueError(f"{len(keys)} keys for {shape[0]} rows")
    return Chunk(path, keys, dtype, (shape[1], shape[2], shape[3]), data_start)


class FeatureCache:
    """Features of one backbone + preprocessing + spec, on disk under ``root``.

    ``root`` None: a temporary directory that lives as long as this object, so even a run
    without a cache directory keeps only a batch of features in memory.
    """

    def __init__(
        self,
        root: Path | None,
        backbone: FeatureBackbone,
        spec: FeatureSpec,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        store_dtype: StoreDtype = "float16",
        max_bytes: int | None = None,
        reporter: Reporter | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        chunk_images: int = CHUNK_IMAGES,
        preprocess: PreprocessMode = "exact",
    ) -> None:
        if batch_size < 1 or chunk_bytes < 1 or chunk_images < 1:
            raise ValueError("batch_size, chunk_bytes and chunk_images must be at least 1")
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.backbone = backbone
        self.spec = spec
        self.batch_size = batch_size
        self.store_dtype = store_dtype
        self.max_bytes = max_bytes
        self.reporter = reporter or Reporter(False)
        self.chunk_bytes = chunk_bytes
        self.chunk_images = chunk_images
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="restune-features-")
            root = Path(self._tmp.name)
        self.root = root
        self.preprocess = preprocess
        """How images become the backbone's input: the serving setting (``RESTUNE_PREPROCESS``)."""
        namespace = namespace_of(backbone, spec, store_dtype, preprocess)
        digest = hashlib.sha256(json.dumps(namespace, sort_keys=True).encode()).hexdigest()
        self.dir = root / digest[:32]
        self._namespace = namespace
        self._index: dict[str, tuple[Chunk, int]] | None = None
        self.forwards = 0
        """Backbone forward calls made by this instance (tests count them)."""
        self.computed = 0
        """Images whose features this instance computed."""

    # ------------------------------------------------------------------ public

    def ensure(self, images: Sequence[ImageRef], desc: str = "features") -> None:
        """Compute and store the features of every image in ``images`` not yet on disk."""
        index = self._load_index()
        missing: dict[str, ImageRef] = {}
        for ref in images:
            if ref.sha256 not in index:
                missing.setdefault(ref.sha256, ref)
        unique = len({ref.sha256 for ref in images})
        if not missing:
            self.reporter.message(
                f"{desc}: all {unique} images cached ({self._bytes_per_image_text()}) in {self.dir}"
            )
            return
        self._remove_dead_temp_files()
        self._compute(list(missing.values()), desc, cached=unique - len(missing))

    def rows(self, images: Sequence[ImageRef], spec: FeatureSpec | None = None) -> CachedRows:
        """A batch reader over ``images`` (all must be stored: call :meth:`ensure` first),
        narrowed to ``spec`` (default: the cache's own)."""
        index = self._load_index()
        located = []
        for ref in images:
            entry = index.get(ref.sha256)
            if entry is None:
                raise KeyError(f"features of image {ref.sha256[:12]} are not in the cache")
            located.append(entry)
        return CachedRows(located, self.spec, spec or self.spec)

    def features(self, images: Sequence[ImageRef], desc: str = "features") -> Tensor:
        """(L', n, N', D) float32 features of ``images`` in order, all in memory at once.

        For small sets (tests, a handful of probe images); training reads :meth:`rows`.
        """
        if not images:
            raise ValueError("no images")
        self.ensure(images, desc)
        reader = self.rows(images)
        return reader.read(torch.arange(len(reader)))

    def disk_bytes(self) -> int:
        """Bytes of this namespace's chunk files."""
        return sum(p.stat().st_size for p in self.dir.glob("chunk-*.safetensors"))

    def close(self) -> None:
        """Remove the temporary directory of a cache made without a root (no-op otherwise)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._index = None

    # ------------------------------------------------------------------ index

    def _load_index(self) -> dict[str, tuple[Chunk, int]]:
        """key -> (chunk, row) for every readable chunk on disk (read once per instance).

        Chunks listed in the manifest are taken from it (their size is checked against the
        listed layout); only unlisted ones (a writer killed between rename and listing) have
        their headers read, and are then listed.
        """
        if self._index is not None:
            return self._index
        index: dict[str, tuple[Chunk, int]] = {}
        if self.dir.is_dir():
            sizes = {p.name: p.stat().st_size for p in self.dir.glob("chunk-*.safetensors")}
            listed: dict[str, Chunk] = {}
            manifest = self.dir / MANIFEST
            if manifest.is_file():
                for line in manifest.read_text(encoding="utf-8").splitlines():
                    chunk = _chunk_from_manifest(self.dir, line)
                    if chunk is not None and sizes.get(chunk.path.name) == chunk.end:
                        listed[chunk.path.name] = chunk
            for name in sorted(sizes):
                found = listed.get(name)
                if found is None:
                    try:
                        found = read_chunk_header(self.dir / name)
                    except (OSError, ValueError) as err:  # foreign or damaged: recompute
                        log.warning("feature cache: ignoring unreadable chunk %s: %s", name, err)
                        continue
                    self._append_manifest(found)
                for row, key in enumerate(found.keys):
                    index.setdefault(key, (found, row))
        self._index = index
        return index

    def _append_manifest(self, chunk: Chunk) -> None:
        line = json.dumps(
            {
                "chunk": chunk.path.name,
                "dtype": _DTYPE_NAMES[chunk.dtype],
                "row_shape": list(chunk.row_shape),
                "data_start": chunk.data_start,
                "bytes": chunk.end,
                "keys": list(chunk.keys),
            }
        )
        # One write of a whole line in append mode: concurrent writers interleave lines, not bytes.
        fd = os.open(self.dir / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ writing

    def _compute(self, refs: list[ImageRef], desc: str, cached: int) -> None:
        pending_keys: list[str] = []
        pending: list[Tensor] = []  # each (b, L', N', D) in the pending dtype
        pending_bytes = 0
        checked = False
        batch = (
            self.batch_size if self.spec.tokens == "cls" else min(self.batch_size, ALL_TOKENS_BATCH)
        )
        with self.reporter.bar(len(refs), desc, unit="img") as bar:
            for start in range(0, len(refs), batch):
                chunk = refs[start : start + batch]
                data = compute_features(self.backbone, chunk, self.spec, self.preprocess)
                self.forwards += 1
                self.computed += len(chunk)
                stored = self._to_store(data)  # (b, L', N', D)
                del data
                if not checked:
                    row_bytes = stored[0].numel() * stored.element_size()
                    self._check_space(len(refs), row_bytes, cached, tuple(stored.shape[1:]), desc)
                    checked = True
                if pending and pending[0].dtype != stored.dtype:
                    self._write_chunk(pending_keys, pending)
                    pending_keys, pending, pending_bytes = [], [], 0
                pending_keys.extend(ref.sha256 for ref in chunk)
                pending.append(stored)
                pending_bytes += stored.numel() * stored.element_size()
                if pending_bytes >= self.chunk_bytes or len(pending_keys) >= self.chunk_images:
                    self._write_chunk(pending_keys, pending)
                    pending_keys, pending, pending_bytes = [], [], 0
                bar.update(len(chunk))
            if pending_keys:
                self._write_chunk(pending_keys, pending)

    def _to_store(self, data: Tensor) -> Tensor:  # (L', b, N', D) -> (b, L', N', D)
        """Image-major rows in the storage dtype, or in float32 for a batch whose values
        float16 cannot hold (one copy, no temporaries of the batch's size)."""
        rows = data.transpose(0, 1)  # (b, L', N', D) view
        dtype = torch.float32
        if self.store_dtype == "float16":
            largest = float(torch.maximum(data.max(), -data.min()))  # NaN fails the test too
            if largest <= FLOAT16_MAX:
                dtype = torch.float16
        return torch.empty(rows.shape, dtype=dtype).copy_(rows)

    def _check_space(
        self,
        to_compute: int,
        row_bytes: int,
        cached: int,
        row_shape: tuple[int, ...],
        desc: str,
    ) -> None:
        """Say what the cache will cost; refuse before writing when it will not fit."""
        needed = to_compute * row_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        layers, tokens, dim = row_shape
        self.reporter.message(
            f"{desc}: {to_compute} images to compute ({cached} cached), "
            f"{_size(row_bytes)}/image ({self.store_dtype}, {layers} layers x {tokens} tokens x "
            f"{dim}) -> {_size(needed)} in {self.dir} ({_size(free)} free)"
        )
        if self.max_bytes is not None:
            used = _tree_bytes(self.root)
            if used + needed > self.max_bytes:
                raise CacheSpaceError(
                    f"the feature cache would grow to {_size(used + needed)} ({_size(used)} now "
                    f"+ {_size(needed)} for {to_compute} images), over its limit of "
                    f"{_size(self.max_bytes)}; raise --cache-max-bytes, use CLS pooling "
                    f"(1 token per layer) or fewer --layers, or point --cache-dir elsewhere"
                )
        if needed + DISK_RESERVE_BYTES > free:
            raise CacheSpaceError(
                f"the features of {to_compute} images need {_size(needed)} in {self.dir}, but "
                f"its disk has {_size(free)} free (and {_size(DISK_RESERVE_BYTES)} stays "
                f"free); point --cache-dir at a larger disk, or use CLS pooling or fewer --layers"
            )

    def _write_chunk(self, keys: list[str], parts: list[Tensor]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            _atomic_write_text(meta, json.dumps(self._namespace, indent=2, sort_keys=True))
        data = parts[0] if len(parts) == 1 else torch.cat(parts)  # (M, L', N', D)
        name = hashlib.sha256(" ".join(keys).encode()).hexdigest()[:24]
        path = self.dir / f"chunk-{name}.safetensors"
        fd, tmp = tempfile.mkstemp(
            dir=self.dir, prefix=f".tmp-{os.getpid()}-", suffix=".safetensors"
        )
        os.close(fd)
        try:
            save_file({TENSOR_NAME: data}, tmp, metadata={"keys": " ".join(keys)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        del data
        chunk = read_chunk_header(path)
        self._append_manifest(chunk)
        index = self._load_index()
        for row, key in enumerate(chunk.keys):
            index.setdefault(key, (chunk, row))

    def _remove_dead_temp_files(self) -> None:
        """Delete the temp files of writers that died mid-write (their pid is gone)."""
        if not self.dir.is_dir():
            return
        for tmp in self.dir.glob(".tmp-*"):
            pid_text = tmp.name.split("-")[1] if tmp.name.count("-") >= 2 else ""
            if re.fullmatch(r"[0-9]{1,10}", pid_text) and not _alive(int(pid_text)):
                tmp.unlink(missing_ok=True)

    def _bytes_per_image_text(self) -> str:
        index = self._load_index()
        if not index:
            return "empty"
        chunk, _ = next(iter(index.values()))
        return f"{_size(chunk.row_bytes)}/image, {_size(self.disk_bytes())} on disk"


class CachedRows:
    """Features of a fixed list of images, read from their chunks a batch at a time.

    Implements the training loop's ``FeatureRows``: ``read(index)`` returns only the rows
    asked for, so memory holds one batch, whatever the number of images.
    """

    def __init__(
        self, located: list[tuple[Chunk, int]], stored: FeatureSpec, spec: FeatureSpec
    ) -> None:
        if not stored.covers(spec):
            raise ValueError(f"cached features {stored} do not cover {spec}")
        self._located = located
        self._stored = stored
        self.spec = spec
        shape = located[0][0].row_shape if located else (len(stored.layers), 1, 0)
        tokens = 1 if spec.tokens == "cls" else shape[1]
        self.row_shape: tuple[int, int, int] = (len(spec.layers), tokens, shape[2])
        """(L', N', D) of one image as :meth:`read` returns it."""

    def __len__(self) -> int:
        return len(self._located)

    def read(self, index: Tensor, epoch: int = 0) -> Tensor:  # (L', b, N', D) float32
        """Features of the images at ``index`` (positions in this reader), in that order."""
        del epoch  # cached features do not change between epochs
        positions = [int(i) for i in index]
        by_file: dict[Path, list[tuple[int, Chunk, int]]] = {}
        for out_pos, pos in enumerate(positions):
            chunk, row = self._located[pos]
            by_file.setdefault(chunk.path, []).append((out_pos, chunk, row))
        stored_shape = self._located[positions[0]][0].row_shape if positions else (0, 0, 0)
        layers, tokens, dim = stored_shape
        out = torch.empty((layers, len(positions), tokens, dim), dtype=torch.float32)
        for path, wanted in by_file.items():
            wanted.sort(key=lambda item: item[2])  # file order: sequential reads
            chunk = wanted[0][1]
            # One row's buffer, converted into ``out`` row by row: no second batch-sized copy.
            row_buffer = np.empty(chunk.row_shape, dtype=_numpy_dtype(chunk.dtype))
            view = row_buffer.data.cast("B")
            fd = os.open(path, os.O_RDONLY)
            try:
                for out_pos, _, row in wanted:
                    got = os.preadv(fd, [view], chunk.data_start + row * chunk.row_bytes)
                    if got != chunk.row_bytes:
                        raise OSError(f"{path}: short read of row {row}")
                    out[:, out_pos].copy_(torch.from_numpy(row_buffer))  # (L, N, D)
            finally:
                os.close(fd)
        if self.spec == self._stored:
            return out  # (L', b, N', D)
        return Features(self._stored, out).select(self.spec).data.contiguous()


def _chunk_from_manifest(folder: Path, line: str) -> Chunk | None:
    """A manifest line as a chunk; None for a torn line (a killed writer) or a foreign one."""
    try:
        entry = json.loads(line)
        dtype = STORE_DTYPES[entry["dtype"]]
        shape = tuple(int(s) for s in entry["row_shape"])
        keys = tuple(str(k) for k in entry["keys"])
        name = str(entry["chunk"])
        data_start = int(entry["data_start"])
    except (ValueError, KeyError, TypeError):
        return None
    if len(shape) != 3 or not keys or "/" in name or not name.startswith("chunk-"):
        return None
    if data_start <= 8 or not all(0 < s < 1 << 31 for s in shape):
        return None
    return Chunk(folder / name, keys, dtype, (shape[0], shape[1], shape[2]), data_start)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[np.generic]:
    for torch_dtype, numpy_dtype in _SAFETENSORS_DTYPES.values():
        if torch_dtype == dtype:
            return numpy_dtype
    raise ValueError(f"no numpy dtype for {dtype}")


def _tree_bytes(root: Path) -> int:
    """Bytes of every file below ``root`` (the whole cache, all namespaces)."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue  # another writer's temp file, renamed meanwhile
    return total


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(nbytes: float) -> str:
    """Bytes for people: 20.0 KB, 2.5 MB, 10.2 GB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{os.getpid()}-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)

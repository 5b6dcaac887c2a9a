"""The on-disk feature cache at dataset scale: chunked float16 storage read a batch at a time,
resume after a killed extraction (a real child process, SIGKILL), space limits, damaged files,
and float16 training within noise of float32. Tiny random backbone, real PNG digits."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from restuning.backbone import TorchBackbone
from restuning.features import Features, FeatureSpec
from restuning.train import TaskOptions, TrainedTask, TrainOptions, load_data, train_task
from restuning.train.augment import AugmentedRows
from restuning.train.feature_cache import (
    MANIFEST,
    CacheSpaceError,
    FeatureBackbone,
    FeatureCache,
    StoreDtype,
    compute_features,
    read_chunk_header,
)
from restuning.train.loop import FORWARD_FEATURE_BYTES, TensorRows, rows_per_forward
from tests.fixtures.live_server import REPO_ROOT
from tests.fixtures.training_data import (
    CountingBackbone,
    one_torch_thread,  # noqa: F401  (fixture used by pytestmark)
    state_equal,
    write_digit_csv,
    write_digit_folder,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN = TaskOptions(bottleneck=4, pooling="mean")
OPTIONS = TrainOptions(epochs=3, batch_size=8, lr=3e-3)
BATCH = 8
"""Images per backbone forward, and per chunk: a 48-image set is written as 6 chunks."""


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Zeros and ones, 24 PNGs each."""
    return write_digit_folder(tmp_path_factory.mktemp("scale-digits"), (0, 1), per_class=24)


def all_tokens(backbone: FeatureBackbone) -> FeatureSpec:
    """Every layer, every token: what a mean-pooled tuner over every block reads."""
    return FeatureSpec(tuple(range(backbone.depth + 1)), "all")


def resumable_training(folder: Path, cache_dir: Path, backbone: FeatureBackbone) -> TrainedTask:
    """The run the resume test kills and repeats (also run by the child process)."""
    cache = FeatureCache(
        cache_dir, backbone, all_tokens(backbone), batch_size=BATCH, chunk_images=BATCH
    )
    return train_task(
        load_data(folder), "resume", backbone, task=MEAN, options=OPTIONS, cache=cache,
        progress=False,
    )  # fmt: skip


CHILD = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from restuning.backbone import load_backbone
from tests.restuning.test_training_cache import resumable_training

folder, cache_dir, flag = (Path(a) for a in sys.argv[1:4])
backbone = load_backbone("vit_test_tiny", "random:0")
forward = backbone.forward_features
calls = []

def stalling(images, spec):
    calls.append(len(images))
    if len(calls) == 3:  # two chunks are on disk: stand still until killed
        flag.touch()
        time.sleep(120)
    return forward(images, spec)

backbone.forward_features = stalling
resumable_training(folder, cache_dir, backbone)
"""


def test_killed_extraction_resumes_and_gives_the_same_artifact(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    cache_dir, flag = tmp_path / "cache", tmp_path / "stalled"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(digit_folder), str(cache_dir), str(flag)],
        cwd=REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert child.poll() is None, child.communicate()[1]
            assert time.monotonic() < deadline, "the child never reached its third forward"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    (namespace,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    chunks = sorted(namespace.glob("chunk-*.safetensors"))
    assert len(chunks) == 2
    # What a writer killed at other moments leaves: a temp file of a dead process, a torn last
    # manifest line, and a chunk renamed into place but never listed (dropped here).
    (namespace / f".tmp-{child.pid}-abc.safetensors").write_bytes(b"partial")
    lines = (namespace / MANIFEST).read_text().splitlines()
    assert len(lines) == 2
    (namespace / MANIFEST).write_text(lines[0] + "\n" + lines[1][:40])

    counting = CountingBackbone(tiny_backbone)
    resumed = resumable_training(digit_folder, cache_dir, counting)
    data = load_data(digit_folder)
    assert counting.images == len(data) - 2 * BATCH  # the two stored chunks were not recomputed
    assert not list(namespace.glob(".tmp-*"))
    assert len(list(namespace.glob("chunk-*.safetensors"))) == len(data) // BATCH

    fresh = resumable_training(digit_folder, tmp_path / "fresh", tiny_backbone)
    assert state_equal(resumed.module.state_dict(), fresh.module.state_dict())
    assert resumed.summary.val_score == fresh.summary.val_score


def test_rows_are_read_a_batch_at_a_time_in_any_order(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    data = load_data(digit_folder)
    spec = all_tokens(tiny_backbone)
    cache = FeatureCache(tmp_path, tiny_backbone, spec, batch_size=BATCH, chunk_images=BATCH)
    cache.ensure(data.images)
    rows = cache.rows(data.images)
    assert len(rows) == len(data)
    whole = rows.read(torch.arange(len(data)))  # (L', n, N', D)
    assert whole.shape == (len(spec.layers), len(data), *rows.row_shape[1:])
    index = torch.tensor([40, 3, 17, 3, 0])  # across chunks, out of order, repeated
    torch.testing.assert_close(rows.read(index), whole[:, index], rtol=0, atol=0)
    # A narrower spec (CLS rows of two layers) is cut from the stored rows.
    narrow = FeatureSpec((1, 2), "cls")
    torch.testing.assert_close(
        cache.rows(data.images, narrow).read(index),
        Features(spec, whole[:, index]).select(narrow).data,
        rtol=0,
        atol=0,
    )
    # float16 on disk: the stored values are the backbone's rounded to float16.
    fresh = compute_features(tiny_backbone, data.images[:BATCH], spec)  # (L', b, N', D)
    torch.testing.assert_close(whole[:, :BATCH], fresh.half().float(), rtol=0, atol=0)
    assert read_chunk_header(sorted(cache.dir.glob("chunk-*"))[0]).dtype == torch.float16


class RecordingRows:
    """A FeatureRows that records how many rows each read asked for."""

    def __init__(self, inner: TensorRows) -> None:
        self.inner = inner
        self.row_shape = inner.row_shape
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.inner)

    def read(self, index: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        self.reads.append(len(index))
        return self.inner.read(index, epoch)


def test_the_loop_never_reads_more_than_a_batch(
    digit_folder: Path, tiny_backbone: TorchBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    from restuning.train.api import build_config, frozen_norm_copy
    from restuning.train.loop import Objective, fit
    from restuning.tuners import init_task

    data = load_data(digit_folder)
    config = build_config("b", data, tiny_backbone, MEAN)
    module = init_task(config, frozen_norm_copy(tiny_backbone.final_norm), 0)
    features = FeatureCache(None, tiny_backbone, module.feature_spec).features(data.images)
    train, val = (
        RecordingRows(TensorRows(features[:, :40])),
        RecordingRows(TensorRows(features[:, 40:])),
    )
    objective = Objective(
        torch.nn.functional.cross_entropy,
        lambda o, t: {"acc": float((o.argmax(-1) == t).float().mean())},
        "acc",
    )
    options = TrainOptions(epochs=2, batch_size=16, eval_batch_size=3)
    fit(module, train, data.targets[:40], val, data.targets[40:], objective, options)
    assert train.reads == [16, 16, 8] * 2
    assert val.reads == [3, 3, 2] * 2
    # Rows bigger than a forward's budget: a step of 16 is read and run 6 rows at a time.
    monkeypatch.setattr(
        "restuning.train.loop.FORWARD_FEATURE_BYTES", 6 * 4 * math.prod(train.row_shape)
    )
    train.reads.clear()
    fit(module, train, data.targets[:40], None, None, objective, options)
    assert train.reads == [6, 6, 4, 6, 6, 4, 6, 2] * 2


def test_forwards_are_capped_by_feature_bytes() -> None:
    vit_s_all_tokens = (13, 257, 384)  # 5.1 MB of float32 per image
    expected = FORWARD_FEATURE_BYTES // (4 * 13 * 257 * 384)
    assert rows_per_forward(vit_s_all_tokens, 512) == expected == 13
    assert rows_per_forward((13, 1, 384), 512) == 512  # CLS rows: the configured batch
    assert rows_per_forward((1, 100_000, 10_000), 512) == 1


def test_micro_batches_give_the_mini_batch_gradient(
    digit_folder: Path, tiny_backbone: TorchBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = load_data(digit_folder)

    def weights() -> dict[str, torch.Tensor]:
        options = TrainOptions(epochs=2, batch_size=16, lr=3e-3)
        return train_task(data, "m", tiny_backbone, task=MEAN, options=options, progress=False)[
            0
        ].state_dict()

    whole = weights()
    row_bytes = 4 * 3 * 17 * 32  # x_0..x_2, 17 tokens, dim 32
    monkeypatch.setattr("restuning.train.loop.FORWARD_FEATURE_BYTES", 5 * row_bytes)
    split = weights()  # each step of 16 as micro-batches of 5, 5, 5, 1
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=1e-4, atol=1e-5)


class ScaledBackbone(CountingBackbone):
    """Features times ``factor``: values float16 cannot hold."""

    def __init__(self, backbone: TorchBackbone, factor: float) -> None:
        super().__init__(backbone)
        self.factor = factor

    def forward_features(self, images: torch.Tensor, spec: FeatureSpec) -> Features:
        out = super().forward_features(images, spec)
        return Features(spec, out.data * self.factor)


def test_values_beyond_float16_are_stored_as_float32(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    data = load_data(digit_folder)
    spec = FeatureSpec((0, 1), "cls")
    huge = ScaledBackbone(tiny_backbone, 1e9)
    features = FeatureCache(tmp_path, huge, spec, batch_size=BATCH).features(data.images)
    assert torch.isfinite(features).all()
    expected = compute_features(huge, data.images[:BATCH], spec)
    torch.testing.assert_close(features[:, :BATCH], expected, rtol=0, atol=0)
    chunks = list(tmp_path.rglob("chunk-*.safetensors"))
    assert chunks
    assert all(read_chunk_header(chunk).dtype == torch.float32 for chunk in chunks)


def test_cache_limit_and_full_disk_refuse_before_writing(
    digit_folder: Path,
    tiny_backbone: TorchBackbone,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = load_data(digit_folder)
    spec = all_tokens(tiny_backbone)
    with pytest.raises(CacheSpaceError, match="over its limit"):
        FeatureCache(tmp_path, tiny_backbone, spec, max_bytes=100_000).ensure(data.images)
    assert not list(tmp_path.rglob("chunk-*"))
    # A big enough limit: the same call succeeds and the cache stays under it.
    FeatureCache(tmp_path, tiny_backbone, spec, max_bytes=10_000_000).ensure(data.images)
    assert 0 < sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) < 10_000_000

    # A disk too small cannot be made for real in a test: its free space is reported as 1 MB.
    monkeypatch.setattr(
        "restuning.train.feature_cache.shutil.disk_usage",
        lambda _path: shutil._ntuple_diskusage(10**9, 10**9, 10**6),
    )
    with pytest.raises(CacheSpaceError, match="free"):
        FeatureCache(tmp_path / "other", tiny_backbone, spec).ensure(data.images)
    assert not list((tmp_path / "other").rglob("chunk-*"))


def test_progress_says_what_the_cache_costs(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    data = load_data(digit_folder)
    messages: list[str] = []
    train_task(data, "m", tiny_backbone, task=MEAN, options=TrainOptions(epochs=1),
               cache_dir=tmp_path, progress=messages.append)  # fmt: skip
    (cost,) = [m for m in messages if "to compute" in m]
    row_bytes = 3 * 17 * 32 * 2  # x_0..x_2, 1 + 4 x 4 tokens, dim 32, float16
    assert f"48 images to compute (0 cached), {row_bytes / 1000:.1f} KB/image (float16" in cost
    assert f"-> {48 * row_bytes / 1000:.1f} KB in {tmp_path}" in cost
    messages.clear()
    train_task(data, "m", tiny_backbone, task=MEAN, options=TrainOptions(epochs=1),
               cache_dir=tmp_path, progress=messages.append)  # fmt: skip
    assert any(m.startswith("features: all 48 images cached") for m in messages)


def test_a_damaged_chunk_is_ignored_and_its_images_recomputed(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    data = load_data(digit_folder)
    spec = FeatureSpec((0, 1, 2), "cls")
    first = FeatureCache(tmp_path, tiny_backbone, spec, batch_size=BATCH, chunk_images=BATCH)
    expected = first.features(data.images)
    victim = sorted(first.dir.glob("chunk-*"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])  # truncated: size no longer matches
    counting = CountingBackbone(tiny_backbone)
    again = FeatureCache(tmp_path, counting, spec, batch_size=BATCH, chunk_images=BATCH)
    torch.testing.assert_close(again.features(data.images), expected, rtol=0, atol=0)
    assert counting.images == BATCH


def test_float16_cache_trains_within_noise_of_float32(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    data = load_data(digit_folder)

    def run(dtype: StoreDtype, seed: int) -> TrainedTask:
        return train_task(
            data, "p", tiny_backbone, task=MEAN, cache_dir=tmp_path, cache_dtype=dtype,
            options=TrainOptions(epochs=10, batch_size=8, lr=3e-3, seed=seed), progress=False,
        )  # fmt: skip

    half, full, other_seed = run("float16", 0), run("float32", 0), run("float32", 1)
    assert half.summary.val_score is not None
    assert full.summary.val_score is not None
    assert abs(half.summary.val_score - full.summary.val_score) <= 0.1

    def distance(a: TrainedTask, b: TrainedTask) -> float:
        sa, sb = a.module.state_dict(), b.module.state_dict()
        return float(sum((sa[k] - sb[k]).norm() ** 2 for k in sa) ** 0.5)

    # Rounding the features moves the weights far less than training with another seed does.
    assert distance(half, full) < 0.05 * distance(full, other_seed)


def test_augmented_rows_do_not_depend_on_the_batching(
    digit_folder: Path, tiny_backbone: TorchBackbone
) -> None:
    data = load_data(digit_folder)
    spec = FeatureSpec((0, 2), "all")
    rows = AugmentedRows(tiny_backbone, data.images[:12], spec, seed=3, batch_size=5)
    together = rows.read(torch.arange(12), epoch=1)  # (L', 12, N', D)
    apart = torch.cat([rows.read(torch.tensor([i]), epoch=1) for i in reversed(range(12))], 1)
    torch.testing.assert_close(apart.flip(1), together, rtol=1e-5, atol=1e-5)
    assert rows.row_shape == (2, 17, 32)
    assert not torch.equal(rows.read(torch.arange(12), epoch=2), together)


def test_csv_targets_train_through_the_streamed_cache(
    tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    for kind, metric in (("multilabel", "map"), ("regression", "r2")):
        data = load_data(write_digit_csv(tmp_path / kind, kind, per_class=6), kind)  # type: ignore[arg-type]
        counting = CountingBackbone(tiny_backbone)
        trained = train_task(data, kind, counting, task=MEAN, options=OPTIONS,
                             cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
        assert trained.summary.val_metric == metric
        assert trained.summary.val_score is not None
        # The two manifests list the same PNGs: the second reads them all from the cache.
        assert counting.images == (len(data) if kind == "multilabel" else 0)
    manifest = next((tmp_path / "cache").rglob(MANIFEST))
    assert all(json.loads(line)["dtype"] == "float16" for line in manifest.read_text().splitlines())

"""``restune train`` end to end in a subprocess: artifact written and loadable, usage errors, and
``--push`` to a live server (tiny random backbone on both sides, so the fingerprints match)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clients.cli import main
from restuning.artifact_io import load_task
from restuning.backbone import TorchBackbone
from restuning.cli import _push_refusal
from restuning.train.metrics import chance_score, r2_score
from tests.fixtures.live_server import REPO_ROOT, TEST_ADMIN_TOKEN, LiveServer
from tests.fixtures.training_data import write_digit_folder
from tuners_store.artifact import read_header

TINY = ("--backbone", "vit_test_tiny", "--weights", "random:0")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digit_folder(tmp_path_factory.mktemp("cli-digits"), (3, 8), per_class=10)


def restune(*args: str, home: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``restune ARGS`` as a child process (the console script's module), caches in ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTUNE_")}
    env.update(RESTUNE_HOME=str(home), OMP_NUM_THREADS="1", **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def test_train_writes_a_loadable_artifact(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    out = tmp_path / "art" / "threes.safetensors"
    done = restune(
        "train", "--data", str(digit_folder), "--name", "threes", "--out", str(out), *TINY,
        "--epochs", "3", "--bottleneck", "4", "--layers", "1-2", "--seed", "7", "--quiet",
        "--cache-dir", str(tmp_path / "cache"), home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "threes: accuracy" in done.stdout
    module = load_task(out.read_bytes(), tiny_backbone.final_norm)
    config = module.config
    assert config.name == "threes"
    assert config.labels == ("eight", "three")
    assert config.bypass.layers == (1, 2)
    assert config.bypass.bottleneck == 4
    assert config.training.epochs == 3
    assert config.training.seed == 7
    assert config.training.data == f"folder:{digit_folder}"
    assert (config.training.train_size, config.training.val_size) == (16, 4)
    assert config.training.val_metric == "accuracy"
    assert any((tmp_path / "cache").rglob("chunk-*.safetensors"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--out", "x.bin"), "must end in .safetensors"),
        (("--name", "Bad Name"), "--name must match"),
        (("--layers", "2-x"), "--layers must be FIRST-LAST"),
        (("--layers", "1-9"), "exceed backbone depth"),
        (("--data", "nowhere"), "no such file or directory"),
        (("--lam", "1.5"), "--lam must be within [0, 1]"),
        (("--scale", "nan"), "--scale must be finite"),
        (("--scale", "1e38"), "--scale must be finite and within"),
        (("--prefix-len", "0"), "--prefix-len must be within"),
        (("--cache-max-bytes", "1K"), "over its limit of 1.0 KB"),
    ],
)
def test_usage_errors_exit_2(
    digit_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    # In process: the same handler the console script runs, without a child's start-up cost.
    monkeypatch.setenv("RESTUNE_HOME", str(tmp_path))
    options = {"--data": str(digit_folder), "--name": "x", "--out": str(tmp_path / "x.safetensors")}
    options.update(zip(args[::2], args[1::2], strict=True))
    argv = [part for option in options.items() for part in option]
    code = main(["train", *argv, *TINY, "--epochs", "1", "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_cache_sizes_parse_with_units() -> None:
    from restuning.cli import _parse_bytes

    assert _parse_bytes("20G") == 20 * 10**9
    assert _parse_bytes("500mb") == 500 * 10**6
    assert _parse_bytes("1.5K") == 1500
    assert _parse_bytes("4096") == 4096
    for bad in ("lots", "-1G", "inf", "nan", "1e30T"):
        with pytest.raises(argparse.ArgumentTypeError):
            _parse_bytes(bad)


def test_push_registers_on_a_live_server(
    digit_folder: Path, live_server: LiveServer, tmp_path: Path
) -> None:
    out = tmp_path / "pushed.safetensors"
    done = restune(
        "train", "--data", str(digit_folder), "--name", "pushed", "--out", str(out), *TINY,
        "--epochs", "2", "--bottleneck", "4", "--quiet", "--force",
        "--push", live_server.url, "--token", TEST_ADMIN_TOKEN, home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"pushed pushed v1 to {live_server.url}: registered" in done.stdout
    with live_server.client() as client:
        body = client.get("/v1/tuners/pushed").json()
    assert body["version"] == 1
    assert body["config"]["training"]["epochs"] == 2
    assert body["config"]["training"]["data"] == f"folder:{digit_folder}"


def test_push_with_a_wrong_token_fails_with_the_api_exit_code(
    digit_folder: Path, live_server: LiveServer, tmp_path: Path
) -> None:
    done = restune(
        "train", "--data", str(digit_folder), "--name", "refused", "--out",
        str(tmp_path / "r.safetensors"), *TINY, "--epochs", "1", "--quiet", "--force",
        "--push", live_server.url, "--token", "not-the-token", home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "forbidden" in done.stderr.lower()
    # The artifact is written before the push, so a refused push loses nothing.
    assert (tmp_path / "r.safetensors").is_file()


def test_a_tuner_below_the_bar_is_not_pushed(
    digit_folder: Path, live_server: LiveServer, tmp_path: Path
) -> None:
    """The quality gate: the artifact is written, the push refused with exit 1 and a reason,
    and nothing reaches the server."""
    out = tmp_path / "gated.safetensors"
    done = restune(
        "train", "--data", str(digit_folder), "--name", "gated", "--out", str(out), *TINY,
        "--epochs", "1", "--quiet", "--min-score", "1.01",
        "--push", live_server.url, "--token", TEST_ADMIN_TOKEN, home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not pushed" in done.stderr
    assert "below --min-score 1.01" in done.stderr
    assert out.is_file()
    with live_server.client() as client:
        assert client.get("/v1/tuners/gated").status_code == 404


def test_push_refusal_at_chance_level() -> None:
    args = argparse.Namespace(force=False, min_score=None)
    assert _push_refusal("accuracy", 0.5, 0.5, args) is not None  # a 2-class coin flip
    assert _push_refusal("accuracy", 0.51, 0.5, args) is not None  # within the margin
    assert _push_refusal("accuracy", 0.9, 0.5, args) is None
    assert _push_refusal("accuracy", None, None, args) is not None  # nothing to check
    assert (
        _push_refusal("accuracy", 0.5, 0.5, argparse.Namespace(force=True, min_score=None)) is None
    )
    assert _push_refusal("r2", 0.3, 0.0, argparse.Namespace(force=False, min_score=0.5)) is not None


def test_chance_scores() -> None:
    train = torch.tensor([0, 0, 0, 1])
    val = torch.tensor([0, 1, 1, 1])
    assert chance_score("classification", train, val) == pytest.approx(0.25)  # always class 0
    reg_train, reg_val = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [4.0]])
    assert chance_score("regression", reg_train, reg_val) == pytest.approx(
        r2_score(torch.tensor([[2.0], [2.0]]), reg_val)
    )
    assert chance_score("embedding", train, val) is None


def test_train_reads_the_servers_backbone_settings(digit_folder: Path, tmp_path: Path) -> None:
    """The environment that serves a backbone trains for it: RESTUNE_BACKBONE(_WEIGHTS) are the
    defaults of --backbone / --weights."""
    out = tmp_path / "env.safetensors"
    done = restune(
        "train", "--data", str(digit_folder), "--name", "env", "--out", str(out),
        "--epochs", "1", "--quiet", home=tmp_path,
        RESTUNE_BACKBONE="vit_test_tiny", RESTUNE_BACKBONE_WEIGHTS="random:0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "backbone vit_test_tiny" in done.stdout


def test_usage_errors_answer_before_torch_loads(tmp_path: Path) -> None:
    """A mistyped command answers at once: torch is never imported for it."""
    probe = (
        "import sys; from clients.cli import main; "
        f"code = main(['train', '--data', {str(tmp_path / 'missing')!r}, '--name', 'x', "
        f"'--out', {str(tmp_path / 'x.safetensors')!r}]); "
        "print(code, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert "no such file or directory" in done.stderr


@pytest.fixture
def folder_with_a_broken_image(digit_folder: Path, tmp_path: Path) -> Path:
    root = tmp_path / "with-broken"
    shutil.copytree(digit_folder, root)
    (next(p for p in root.iterdir() if p.is_dir()) / "broken.png").write_bytes(b"not an image")
    return root


def test_unreadable_images_are_named_before_training(
    folder_with_a_broken_image: Path, tmp_path: Path
) -> None:
    args = ("--name", "bad", "--out", str(tmp_path / "bad.safetensors"), *TINY, "--quiet")
    stopped = restune(
        "train", "--data", str(folder_with_a_broken_image), *args, "--epochs", "1", home=tmp_path
    )
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert "1 of" in stopped.stderr
    assert "broken.png" in stopped.stderr
    assert "--skip-bad-images" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    skipped = restune(
        "train", "--data", str(folder_with_a_broken_image), *args, "--epochs", "1",
        "--skip-bad-images", home=tmp_path,
    )  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr
    assert "left out 1 unreadable images" in skipped.stderr
    summary = read_header((tmp_path / "bad.safetensors").read_bytes()).config.training
    assert summary.extra["skipped_images"] == 1.0


def test_every_tuner_option_has_a_flag(digit_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "opts.safetensors"
    done = restune(
        "train", "--data", str(digit_folder), "--name", "opts", "--out", str(out), *TINY,
        "--epochs", "1", "--quiet", "--tuner", "res_prompt", "--combine", "lerp", "--lam", "0.3",
        "--scale-mode", "channel", "--prefix-len", "5", home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    bypass = read_header(out.read_bytes()).config.bypass
    assert (bypass.tuner, bypass.combine, bypass.lam) == ("res_prompt", "lerp", 0.3)
    assert (bypass.scale_mode, bypass.prefix_len) == ("channel", 5)


@pytest.mark.slow
def test_a_small_two_class_folder_trains_well_with_the_defaults(tmp_path: Path) -> None:
    """64 images, two classes, an easy signal, every default (the embedded DINOv2 ViT-S/14,
    the default schedule): the schedule gives a small folder enough optimizer steps to learn
    it (the former 64 images a step gave one step an epoch and chance accuracy)."""
    folder = write_digit_folder(tmp_path / "zero-one", (0, 1), per_class=32, size=64)
    out = tmp_path / "zero-one.safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTUNE_")}
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", "train", "--data", str(folder), "--name", "zo",
         "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    training = read_header(out.read_bytes()).config.training
    assert training.val_metric == "accuracy"
    assert training.val_score is not None
    assert training.val_score >= 0.9, done.stdout
    assert training.val_score > training.extra["chance"] + 0.3

"""The ``restune`` console script against a real server, as a script would run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clients.cli import EXIT_API_ERROR, EXIT_CONNECTION, EXIT_OK, EXIT_SERVER, EXIT_USAGE
from restuning.backbone import TorchBackbone
from tests.fixtures.live_server import LiveServer, StartServer
from tests.fixtures.models import tiny_images
from tests.fixtures.redis_server import RedisProcess, free_port
from tests.fixtures.tuners import make_artifact, make_config
from tuners_store.config import TaskKind

ROOT = Path(__file__).resolve().parents[2]


def restune_command() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("restune")
    if script.exists():
        return [str(script)]
    found = shutil.which("restune")
    return [found] if found else [sys.executable, "-m", "clients.cli"]


def run(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTUNE_")}
    if token is not None:
        env["RESTUNE_ADMIN_TOKEN"] = token
    return subprocess.run(
        [*restune_command(), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: TorchBackbone) -> Path:
    """Two images and two artifacts on disk."""
    d = tmp_path_factory.mktemp("cli")
    for i, data in enumerate(tiny_images(2, seed=3)):
        (d / f"img{i}.png").write_bytes(data)
    (d / "broken.png").write_bytes(b"definitely not a png")
    kinds: tuple[tuple[str, TaskKind], ...] = (
        ("cli-cls", "classification"),
        ("cli-reg", "regression"),
    )
    for name, task in kinds:
        config = make_config(name, tiny_backbone, task=task)
        (d / f"{name}.safetensors").write_bytes(make_artifact(config, tiny_backbone.final_norm))
    return d


def test_tuners_push_list_show_rm(live_server: LiveServer, files: Path) -> None:
    url = live_server.url
    art = str(files / "cli-cls.safetensors")
    pushed = run(
        "tuners", "push", "cli-cls", art, "--url", url, "--token", live_server.admin_token or ""
    )
    assert pushed.returncode == EXIT_OK, pushed.stderr
    assert "cli-cls v1" in pushed.stdout
    assert "registered" in pushed.stdout
    # The token from the environment works too; identical bytes are reported unchanged.
    again = run("tuners", "push", "cli-cls", art, "--url", url, token=live_server.admin_token)
    assert again.returncode == EXIT_OK, again.stderr
    assert "unchanged" in again.stdout
    reg = run(
        "tuners",
        "push",
        "cli-reg",
        str(files / "cli-reg.safetensors"),
        "--url",
        url,
        token=live_server.admin_token,
    )
    assert reg.returncode == EXIT_OK, reg.stderr

    listed = run("tuners", "list", "--url", url)
    assert listed.returncode == EXIT_OK, listed.stderr
    assert listed.stdout.splitlines()[0].split()[:3] == ["NAME", "VERSION", "KIND"]
    assert any(
        line.split()[:3] == ["cli-cls", "v1", "classification"]
        for line in listed.stdout.splitlines()
    )
    as_json = json.loads(run("tuners", "list", "--url", url, "--json").stdout)
    assert {t["name"] for t in as_json} >= {"cli-cls", "cli-reg"}

    shown = run("tuners", "show", "cli-cls", "--url", url)
    assert shown.returncode == EXIT_OK, shown.stderr
    assert json.loads(shown.stdout)["config"]["labels"] == ["cat", "dog", "bird"]

    missing = run("tuners", "show", "cli-nope", "--url", url)
    assert missing.returncode == EXIT_API_ERROR
    assert "tuner_not_found" in missing.stderr

    no_token = run("tuners", "rm", "cli-reg", "--url", url)
    assert no_token.returncode == EXIT_API_ERROR
    assert "unauthorized" in no_token.stderr
    assert "RESTUNE_ADMIN_TOKEN" in no_token.stderr
    wrong = run("tuners", "rm", "cli-reg", "--url", url, "--token", "nope")
    assert wrong.returncode == EXIT_API_ERROR
    assert "forbidden" in wrong.stderr
    removed = run("tuners", "rm", "cli-reg", "--url", url, token=live_server.admin_token)
    assert removed.returncode == EXIT_OK, removed.stderr
    assert "cli-reg" not in run("tuners", "list", "--url", url).stdout


def test_tuners_traffic_promote_and_rm_version(
    live_server: LiveServer, files: Path, tiny_backbone: TorchBackbone
) -> None:
    url, token = live_server.url, live_server.admin_token
    name = "cli-roll"
    for seed in (1, 2):
        path = files / f"{name}-{seed}.safetensors"
        path.write_bytes(
            make_artifact(make_config(name, tiny_backbone), tiny_backbone.final_norm, seed=seed)
        )
    first = run(
        "tuners", "push", name, str(files / f"{name}-1.safetensors"), "--url", url, token=token
    )
    assert first.returncode == EXIT_OK, first.stderr
    staged = run(
        "tuners",
        "push",
        name,
        str(files / f"{name}-2.safetensors"),
        "--no-promote",
        "--url",
        url,
        token=token,
    )
    assert staged.returncode == EXIT_OK, staged.stderr
    assert f"{name} v2" in staged.stdout
    assert "not current" in staged.stdout
    shown = run("tuners", "traffic", name, "--url", url)
    assert shown.stdout.strip() == f"{name}: current v1; v1 100%"
    split = run("tuners", "traffic", name, "1=90", "2=10", "--url", url, token=token)
    assert split.returncode == EXIT_OK, split.stderr
    assert split.stdout.strip() == f"{name}: current v1; v1 90%, v2 10%"
    as_json = json.loads(run("tuners", "traffic", name, "--json", "--url", url).stdout)
    assert as_json == {"name": name, "current": 1, "traffic": {"1": 90, "2": 10}}
    bad = run("tuners", "traffic", name, "1:90", "--url", url, token=token)
    assert bad.returncode == EXIT_USAGE
    assert "VERSION=WEIGHT" in bad.stderr
    unknown = run("tuners", "traffic", name, "7=100", "--url", url, token=token)
    assert unknown.returncode == EXIT_API_ERROR
    assert "invalid_traffic" in unknown.stderr

    in_use = run("tuners", "rm", name, "--version", "2", "--url", url, token=token)
    assert in_use.returncode == EXIT_API_ERROR
    assert "version_in_use" in in_use.stderr
    forced = run("tuners", "rm", name, "--version", "1", "--force", "--url", url, token=token)
    assert forced.returncode == EXIT_OK, forced.stderr
    assert forced.stdout.strip() == f"deleted {name} v1; current is v2"
    assert run("tuners", "rm", name, "--force", "--url", url, token=token).returncode == EXIT_USAGE
    promoted = run("tuners", "promote", name, "2", "--url", url, token=token)
    assert promoted.returncode == EXIT_OK, promoted.stderr
    assert promoted.stdout.strip() == f"{name}: current v2; v2 100%"
    assert run("tuners", "rm", name, "--url", url, token=token).returncode == EXIT_OK


def test_predict_table_and_json(live_server: LiveServer, files: Path) -> None:
    live_server.register("cli-cls", (files / "cli-cls.safetensors").read_bytes())
    images = [str(files / "img0.png"), str(files / "img1.png")]
    table = run("predict", live_server.url, *images, "--tasks", "cli-cls", "--top-k", "2")
    assert table.returncode == EXIT_OK, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "TASK", "VERSION", "ANSWER"]
    rows = [line.split(maxsplit=3) for line in lines[1:]]
    assert [r[0] for r in rows] == ["img0.png", "img1.png"]
    assert all(r[1:3] == ["cli-cls", "v1"] for r in rows)
    # Two "label score" pairs, best first.
    pairs = [p.split() for p in rows[0][3].split(", ")]
    assert len(pairs) == 2
    assert {p[0] for p in pairs} <= {"cat", "dog", "bird"}
    assert float(pairs[0][1]) >= float(pairs[1][1])

    raw = run("predict", live_server.url, *images, "--tasks", "cli-cls", "--json")
    assert raw.returncode == EXIT_OK, raw.stderr
    body = json.loads(raw.stdout)
    assert len(body["results"]) == 2
    assert body["results"][1]["tasks"]["cli-cls"]["kind"] == "classification"


def test_exit_codes(live_server: LiveServer, files: Path) -> None:
    live_server.register("cli-cls", (files / "cli-cls.safetensors").read_bytes())
    img = str(files / "img0.png")
    unknown = run("predict", live_server.url, img, "--tasks", "cli-cls,cli-nope")
    assert unknown.returncode == EXIT_API_ERROR
    assert "unknown_task" in unknown.stderr
    bad = run("predict", live_server.url, img, str(files / "broken.png"), "--tasks", "cli-cls")
    assert bad.returncode == EXIT_API_ERROR
    assert "broken.png" in bad.stderr  # the CLI names the file behind the image index
    usage = run("predict", live_server.url, img)
    assert usage.returncode == EXIT_USAGE
    refused = run("health", f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert refused.returncode == EXIT_CONNECTION
    ok = run("health", live_server.url)
    assert ok.returncode == EXIT_OK, ok.stderr
    assert "ready: yes" in ok.stdout


@pytest.mark.slow
def test_health_exit_4_when_not_ready(
    live_server_factory: StartServer, redis_process: RedisProcess
) -> None:
    """A live server that never reached its Redis store answers /readyz 503: exit code 4."""
    redis_process.kill()
    server = live_server_factory(RESTUNE_STORE=redis_process.url, wait_ready=False)
    out = run("health", server.url)
    assert out.returncode == EXIT_SERVER, out.stdout + out.stderr
    assert "ready: no" in out.stdout

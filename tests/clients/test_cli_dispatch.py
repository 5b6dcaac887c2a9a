"""The ``restune`` dispatcher without a server: usage errors, plugins, connection failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clients.cli import (
    DEFAULT_URL,
    EXIT_CONNECTION,
    EXIT_USAGE,
    OWN_COMMANDS,
    build_parser,
    describe_answer,
    main,
    resolve_url,
)
from clients.types import TaskAnswer, TaskError

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], pythonpath: list[Path] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("RESTUNE_ADMIN_TOKEN", None)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in [*(pythonpath or []), ROOT])
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    """A fake installed distribution with one broken and one working command plugin."""
    dist = tmp_path / "fakeplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[restune.commands]\nbroken = fakeplug_broken:register\nhello = fakeplug_hello:register\n"
    )
    (tmp_path / "fakeplug_broken.py").write_text("raise RuntimeError('plugin exploded')\n")
    (tmp_path / "fakeplug_hello.py").write_text(
        "def register(subparsers):\n"
        "    p = subparsers.add_parser('hello', help='say hello')\n"
        "    p.add_argument('--code', type=int, default=0)\n"
        "    p.set_defaults(func=lambda args: args.code)\n"
    )
    return tmp_path


def test_a_broken_plugin_warns_and_the_others_still_work(plugins: Path) -> None:
    out = _run(["hello", "--code", "7"], [plugins])
    assert out.returncode == 7, out.stderr
    assert "plugin exploded" in out.stderr
    assert "warning" in out.stderr
    helped = _run(["--help"], [plugins])
    assert helped.returncode == 0
    for command in ("hello", *OWN_COMMANDS):
        assert command in helped.stdout


def test_own_commands_do_not_load_plugins(plugins: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _run(["health", f"http://127.0.0.1:{port}"], [plugins])
    assert out.returncode == EXIT_CONNECTION
    assert "plugin exploded" not in out.stderr
    assert "connection_failed" in out.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert main(["predict", "http://x", str(tmp_path / "missing.png"), "--tasks", "a"]) == 2
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert main(["predict", "http://x", str(image), "--tasks", " , "]) == EXIT_USAGE
    assert main(["predict", "http://x", str(image)]) == EXIT_USAGE  # --tasks is required
    assert main(["predict", "http://x", str(image), "--tasks", "a", "--top-k", "0"]) == 2
    assert main(["tuners", "push", "a", str(tmp_path / "missing.safetensors")]) == EXIT_USAGE
    assert main(["tuners"]) == EXIT_USAGE
    assert main(["no-such-command"]) == EXIT_USAGE


def test_parser_has_the_documented_commands() -> None:
    parser, _ = build_parser(plugins=False)
    args = parser.parse_args(["tuners", "push", "a", "f.safetensors", "--token", "t"])
    assert (args.name, args.file, args.token) == ("a", "f.safetensors", "t")
    args = parser.parse_args(["predict", "x.png", "y.png", "--tasks", "a,b", "--top-k", "2"])
    assert (args.images, args.tasks, args.top_k) == (["x.png", "y.png"], "a,b", 2)


@pytest.mark.parametrize(
    ("argv", "env", "url", "rest"),
    [
        (["predict", "a.png", "--tasks", "t"], None, DEFAULT_URL, ["a.png"]),
        (["predict", "a.png", "--tasks", "t"], "http://env:1", "http://env:1", ["a.png"]),
        (
            ["predict", "--url", "http://f:2", "a.png", "--tasks", "t"],
            "http://e",
            "http://f:2",
            ["a.png"],
        ),
        (["predict", "http://p:3", "a.png", "--tasks", "t"], "http://e", "http://p:3", ["a.png"]),
        (["health"], "http://env:1", "http://env:1", None),
        (["health", "http://p:3"], None, "http://p:3", None),
        (["health", "--url", "http://f:2"], None, "http://f:2", None),
        (["tuners", "list"], "http://env:1", "http://env:1", None),
        (["tuners", "rm", "x", "--url", "http://f:2"], None, "http://f:2", None),
    ],
)
def test_every_verb_finds_the_server_the_same_way(
    argv: list[str],
    env: str | None,
    url: str,
    rest: list[str] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--url, else a leading URL argument (predict, health), else $RESTUNE_URL, else the
    default."""
    if env is None:
        monkeypatch.delenv("RESTUNE_URL", raising=False)
    else:
        monkeypatch.setenv("RESTUNE_URL", env)
    parser, _ = build_parser(plugins=False)
    args = parser.parse_args(argv)
    resolve_url(args)
    assert args.url == url
    if rest is not None:
        assert args.images == rest


def test_answer_cells() -> None:
    labels = TaskAnswer(1, "s", "classification", labels=[("cat", 0.9), ("dog", 0.1)])
    assert describe_answer(labels) == "cat 0.900, dog 0.100"
    assert describe_answer(TaskAnswer(1, "s", "regression", values={"age": 31.25})) == "age=31.25"
    emb = describe_answer(TaskAnswer(1, "s", "embedding", embedding=[0.6, 0.8]))
    assert emb.startswith("embedding dim 2")
    err = describe_answer(TaskAnswer(None, None, None, error=TaskError("tuner_load_failed", "x")))
    assert err == "error tuner_load_failed: x"

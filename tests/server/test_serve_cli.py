"""``restune serve`` / ``python -m server serve``: option precedence, config files, bad
settings, and a real start through the ``restune`` console script."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.cli import EXIT_CONFIG, register, run_serve, settings_from_args
from tests.fixtures.live_server import LiveServer, ServerStartError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_options_override_env_which_overrides_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "restune.toml"
    config.write_text('port = 9001\nbackbone = "vit_test_tiny"\nmax_wait_ms = 7.5\n')
    monkeypatch.setenv("RESTUNE_PORT", "9002")
    monkeypatch.delenv("RESTUNE_BACKBONE", raising=False)
    from_file_and_env = settings_from_args(parse("--config", str(config)))
    assert from_file_and_env.port == 9002
    assert from_file_and_env.backbone == "vit_test_tiny"
    assert from_file_and_env.max_wait_ms == 7.5
    with_option = settings_from_args(parse("--config", str(config), "--port", "9003"))
    assert with_option.port == 9003


def test_json_config_and_every_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RESTUNE_PORT", "RESTUNE_DEMO", "RESTUNE_STORE"):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "restune.json"
    config.write_text('{"demo": true, "max_top_k": 3}')
    s = settings_from_args(
        parse(
            "--config", str(config), "--host", "0.0.0.0", "--port", "0",
            "--backbone", "vit_test_tiny", "--weights", "random:3",
            "--store", "redis://127.0.0.1:1/0", "--runtime", "onnxruntime",
            "--device", "cpu", "--no-demo",
        )
    )  # fmt: skip
    assert (s.host, s.port, s.backbone, s.backbone_weights) == (
        "0.0.0.0", 0, "vit_test_tiny", "random:3",
    )  # fmt: skip
    assert (s.store, s.runtime, s.device, s.demo, s.max_top_k) == (
        "redis://127.0.0.1:1/0", "onnxruntime", "cpu", False, 3,
    )  # fmt: skip
    assert settings_from_args(parse("--demo")).demo is True


@pytest.mark.parametrize(
    "content", ['{"no_such_setting": 1}', '{"port": "many"}', "not json", '["a list"]']
)
def test_bad_settings_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    config = tmp_path / "bad.json"
    config.write_text(content)
    assert run_serve(parse("--config", str(config))) == EXIT_CONFIG
    assert "invalid settings" in capsys.readouterr().err


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_serve(parse("--config", "/nonexistent/restune.toml")) == EXIT_CONFIG
    assert "restune.toml" in capsys.readouterr().err


def test_python_m_server_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert "--config" in done.stdout
    assert "--no-demo" in done.stdout


def test_a_start_failure_surfaces_the_server_error(tmp_path: Path) -> None:
    server = LiveServer(tmp_path, {"RESTUNE_BACKBONE": "vit_does_not_exist"})
    with pytest.raises(ServerStartError) as failed:
        server.start(timeout=60)
    assert "vit_does_not_exist" in str(failed.value)
    assert not server.running


def test_restune_console_script_serves(tmp_path: Path) -> None:
    script = shutil.which("restune", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the restune console script is not installed in this environment")
    server = LiveServer(tmp_path, command=(script, "serve")).start()
    try:
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    finally:
        assert server.stop() == 0

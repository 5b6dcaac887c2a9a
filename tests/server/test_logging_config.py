"""JSON-lines and text log records, the format chosen by the terminal, and the secret
scrubber."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import subprocess
import sys

import pytest

from server.logging_config import (
    REDACTED,
    JsonLinesFormatter,
    SecretScrubber,
    TextFormatter,
    configure_logging,
)
from tests.fixtures.live_server import REPO_ROOT

SECRET = "s3cr3t-token-value"


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("restune.test", logging.INFO, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_json_line_has_fields_and_extras() -> None:
    line = JsonLinesFormatter().format(record("hello %s", "world", request_id="r1", status=200))
    entry = json.loads(line)
    assert entry["msg"] == "hello world"
    assert entry["level"] == "info"
    assert entry["logger"] == "restune.test"
    assert entry["request_id"] == "r1"
    assert entry["status"] == 200
    assert "\n" not in line


def test_json_line_carries_the_traceback_in_one_line() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonLinesFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: bad" in json.loads(line)["exc"]


def test_scrubber_removes_the_secret_everywhere() -> None:
    scrub = SecretScrubber([SECRET, ""])
    try:
        raise RuntimeError(f"header was Bearer {SECRET}")
    except RuntimeError:
        rec = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "got %s", (SECRET,), sys.exc_info()
        )
    rec.__dict__["auth"] = f"Bearer {SECRET}"
    assert scrub.filter(rec)
    line = JsonLinesFormatter().format(rec)
    assert SECRET not in line
    assert REDACTED in json.loads(line)["msg"]
    assert REDACTED in json.loads(line)["auth"]
    assert REDACTED in json.loads(line)["exc"]


def test_configure_logging_writes_json_to_stderr_without_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("json", "info", secrets=[SECRET])
        logging.getLogger("restune.access").info("request", extra={"token_echo": SECRET})
        logging.getLogger("uvicorn.error").info("uvicorn line")
        logging.getLogger("restune.debugging").debug("not shown at info")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["msg"] for e in entries] == ["request", "uvicorn line"]
    assert SECRET not in stream.getvalue()


def test_text_format_appends_extras() -> None:
    line = TextFormatter().format(record("request", route="/v1/predict", status=200))
    assert line.endswith("route=/v1/predict status=200")


LOG_ONE_LINE = (
    "import logging; from server.logging_config import configure_logging; "
    "configure_logging('auto'); logging.getLogger('restune.test').warning('hello')"
)


def test_auto_format_is_text_at_a_terminal_and_json_elsewhere() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    piped = subprocess.run(
        [sys.executable, "-c", LOG_ONE_LINE], capture_output=True, env=env, check=True
    )
    assert json.loads(piped.stderr)["msg"] == "hello"

    controller, terminal = pty.openpty()
    try:
        subprocess.run(
            [sys.executable, "-c", LOG_ONE_LINE], stderr=terminal, env=env, check=True, timeout=60
        )
        line = os.read(controller, 4096).decode()
    finally:
        os.close(controller)
        os.close(terminal)
    assert "WARNING restune.test: hello" in line
    assert not line.lstrip().startswith("{")

"""The CPU image's contents, entrypoint, environment and HEALTHCHECK, without a Docker engine.

What the image would do, done here step by step from the Dockerfile's own text: build the
project from exactly the files its build stage COPYs, install that wheel into a fresh
virtualenv (dependencies come from the test's environment, the project itself only from the
wheel), start the ENTRYPOINT + CMD with the stage's ENV (``/data`` mapped to a temp dir, a tiny
random backbone), and run the HEALTHCHECK command against it: healthy while it serves, unhealthy
once SIGTERM has stopped it, and the stop is graceful (exit 0).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.dashboard_queries import REPO

pytestmark = pytest.mark.slow

DOCKERFILE = REPO / "Dockerfile"
BUILD_STAGE = "cpu-build"
RUNTIME_STAGE = "cpu"
START_S = 120.0


def stage_lines(stage: str) -> list[str]:
    """The instructions of one Dockerfile stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines: list[str] = []
    current = None
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            current = m.group(1)
        elif current == stage and line and not line.startswith("#"):
            lines.append(line)
    assert lines, f"no stage {stage}"
    return lines


def stage_env(stage: str) -> dict[str, str]:
    """ENV key=value pairs of a stage (the Dockerfile only uses the key=value form)."""
    env: dict[str, str] = {}
    for line in stage_lines(stage):
        if line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line):
                env[key] = value
    return env


def exec_form(stage: str, instruction: str) -> list[str]:
    """The JSON exec form of ENTRYPOINT / CMD / HEALTHCHECK ... CMD."""
    line = next(ln for ln in stage_lines(stage) if ln.startswith(instruction))
    array: list[str] = json.loads(line[line.index("[") :])
    return array


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding the project only as the wheel built from the COPYed files."""
    root = tmp_path_factory.mktemp("image")
    context = root / "src"
    for line in stage_lines(BUILD_STAGE):
        if line.startswith("COPY") and "--from" not in line:
            *sources, _dest = line.split()[1:]
            for src in sources:
                path = REPO / src
                if path.is_dir():
                    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                    shutil.copytree(path, context / src, ignore=ignore)
                else:
                    context.mkdir(exist_ok=True)
                    shutil.copy(path, context / src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # Offline when this environment can build the project itself; else pip fetches the backend.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", *isolation, str(context), "-w", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = root.glob("restune-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # Third-party dependencies from this environment (the image installs them from PyPI); a
    # path added by a .pth is not a site dir, so the repo's editable install stays invisible.
    (purelib,) = venv.glob("lib/python*/site-packages")
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "zz_test_deps.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run(
        [
            *pip,
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    return venv


def test_entrypoint_env_and_healthcheck(image_venv: Path, tmp_path: Path) -> None:
    env_defaults = stage_env(RUNTIME_STAGE)
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTUNE_")}
    env.update(
        {
            k: v.replace("/data", str(data))
            for k, v in env_defaults.items()
            if k.startswith(("RESTUNE_", "PYTHON"))
        }
    )
    env.update(
        PATH=f"{image_venv / 'bin'}:{env['PATH']}",
        RESTUNE_PORT=str(port),
        RESTUNE_BACKBONE="vit_test_tiny",
        RESTUNE_BACKBONE_WEIGHTS="random:0",
    )
    assert env["RESTUNE_HOST"] == "0.0.0.0"
    assert env["RESTUNE_STORE"] == f"file://{data}/tuners"
    workdir = tmp_path / "home"
    workdir.mkdir()

    # The project is imported from the installed wheel, not from this checkout.
    where = subprocess.run(
        ["python", "-c", "import server, restuning; print(server.__file__, restuning.__file__)"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(REPO) not in where
    assert str(image_venv) in where

    command = exec_form(RUNTIME_STAGE, "ENTRYPOINT") + exec_form(RUNTIME_STAGE, "CMD")
    healthcheck = exec_form(RUNTIME_STAGE, "HEALTHCHECK")

    def healthy() -> bool:
        r = subprocess.run(healthcheck, env=env, cwd=workdir, capture_output=True, timeout=10)
        return r.returncode == 0

    assert not healthy(), "HEALTHCHECK passes with nothing listening"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_S
        while not healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(
                    f"not healthy (exit {proc.poll()}):\n"
                    f"{(tmp_path / 'serve.log').read_text()[-4000:]}"
                )
            time.sleep(0.5)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        # The file store lives under the /data volume.
        assert (data / "tuners").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-4000:]
    assert not healthy(), "HEALTHCHECK passes after the server stopped"

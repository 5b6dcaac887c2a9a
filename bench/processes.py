"""Child processes the suite measures against: a throwaway redis-server and ``restune serve``.

The suite never imports from ``tests/`` (a benchmark is not a test fixture); these starters
are small on purpose: start, wait until usable, stop by pid.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import httpx
import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
_URL_LINE = re.compile(r"restune serving on (http://\S+)")


def free_port() -> int:
    """A TCP port nothing listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[str | None]:
    """``REDIS_URL``, or a throwaway redis-server without persistence; None if neither."""
    env = os.environ.get("REDIS_URL")
    if env:
        yield env
        return
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="restune-bench-redis-")
    # No persistence: a benchmark's Redis is thrown away with its directory.
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, *args, "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


class ServeProcess:
    """``python -m server serve`` on a free port with ``RESTUNE_*`` settings; a context manager.

    Entering returns once ``/readyz`` answers 200; leaving sends SIGTERM (SIGKILL after a
    grace period). The server's output goes to files in ``workdir``, quoted on failure.
    """

    def __init__(self, workdir: Path, env: Mapping[str, str], *, start_timeout: float = 300):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env)
        self.start_timeout = start_timeout
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_headers(self) -> dict[str, str]:
        """The Authorization header admin routes want (empty without a token)."""
        token = self.env.get("RESTUNE_ADMIN_TOKEN")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def __enter__(self) -> ServeProcess:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("RESTUNE_")}
        child_env.update(self.env)
        child_env.setdefault("RESTUNE_HOME", str(self.workdir / "home"))
        child_env["PYTHONUNBUFFERED"] = "1"
        out_path, err_path = self.workdir / "stdout.log", self.workdir / "stderr.log"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0"]
            self._proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env, stdout=out, stderr=err)
        try:
            self._wait_ready(time.monotonic() + self.start_timeout, out_path)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self, deadline: float, out_path: Path) -> None:
        while not self.url:
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"restune serve printed no URL in time\n{self.stderr_tail()}")
            found = _URL_LINE.search(out_path.read_text(errors="replace"))
            if found:
                self.url = found.group(1)
            else:
                time.sleep(0.05)
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while True:
                self._check_alive()
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"/readyz never answered 200\n{self.stderr_tail()}")
                time.sleep(0.05)

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(
                f"restune serve exited with {self._proc.returncode}\n{self.stderr_tail()}"
            )

    def stderr_tail(self, chars: int = 4000) -> str:
        """The end of the server's stderr (its log)."""
        path = self.workdir / "stderr.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

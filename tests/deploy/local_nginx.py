"""The shipped nginx config run locally: Docker's parts replaced by local addresses.

``deploy/nginx/nginx.conf`` assumes Docker (a service name resolved through Docker's DNS, fixed
paths under /tmp, port 8080). :func:`local_nginx_conf` changes only those lines, each of which
must still be there (a config that drifts fails the tests using it loudly); everything else,
the retry and failure policy included, is what ships.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures.redis_server import free_port


def local_nginx_conf(text: str, upstreams: list[int], port: int, run_dir: Path) -> str:
    """The shipped config with Docker's parts replaced: every ``server restune:8000 resolve
    ...`` entry becomes one entry per local replica with the same parameters, the Docker
    resolver goes, and pid/temp paths/listen port move to ``run_dir``/``port``."""

    def sub(pattern: str, repl: str | Callable[[re.Match[str]], str], min_count: int = 1) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
        assert n >= min_count, f"nginx.conf no longer has {pattern!r}: adapt this test"

    def per_replica(match: re.Match[str]) -> str:
        indent, params = match.group(1), match.group(2)
        return "\n".join(f"{indent}server 127.0.0.1:{p}{params};" for p in upstreams)

    sub(r"^([ \t]*)server restune:\d+ resolve([^;]*);", per_replica)
    sub(r"^[ \t]*resolver [^;]*;", "")
    sub(r"^pid [^;]*;", f"pid {run_dir / 'nginx.pid'};")
    sub(r"client_body_temp_path [^;]*;", f"client_body_temp_path {run_dir / 'client_body'};")
    sub(r"proxy_temp_path [^;]*;", f"proxy_temp_path {run_dir / 'proxy'};")
    sub(r"^([ \t]*)listen \d+;", rf"\1listen 127.0.0.1:{port};")
    return text


class Nginx:
    """nginx in the foreground on the adapted config; its JSON access log is read back."""

    def __init__(self, conf: Path, run_dir: Path, upstreams: list[int]) -> None:
        self.run_dir = run_dir
        self.port = free_port()
        for sub in ("client_body", "proxy"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
            (run_dir / sub).chmod(0o777)  # workers run as nobody when the master is root
        self.conf = run_dir / "nginx.conf"
        self.conf.write_text(local_nginx_conf(conf.read_text(), upstreams, self.port, run_dir))
        self.access = run_dir / "access.log"
        self.errors = run_dir / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [shutil.which("nginx") or "nginx", "-e", "stderr", "-p", str(self.run_dir)]

    def check(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` on the adapted config."""
        return subprocess.run(
            [*self._command(), "-t", "-c", str(self.conf)],
            capture_output=True,
            text=True,
            check=False,
        )

    def start(self) -> None:
        checked = self.check()
        assert checked.returncode == 0, checked.stderr
        base = self._command()
        with self.access.open("wb") as out, self.errors.open("wb") as err:
            self.proc = subprocess.Popen(
                [*base, "-c", str(self.conf), "-g", "daemon off;"], stdout=out, stderr=err
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{self.url}/lb-healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.errors.read_text()
            assert time.monotonic() < deadline, "nginx did not answer"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.access.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

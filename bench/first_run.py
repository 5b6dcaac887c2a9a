"""How long a first start takes to answer: ``restune serve --demo`` on an empty store, from the
process start to each demo task's first 200, polled once a second.

The embedded backbone is copied in already converted (its conversion is the same before and
after any change, and not what this measures); no features are cached, so the demo tuners'
features are computed as on a fresh clone. Run it against two checkouts back to back on the
same machine to compare (``--tree``): the numbers are wall seconds, so a busy machine shifts
both.

    python -m bench.first_run --tree /path/to/checkout [--out bench/results/first_run.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

DEMO_TASKS = ("digit", "parity", "digit-props", "face", "texture")
TIMEOUT_S = 1800.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _three_png() -> bytes:
    pixels = (255 - load_digits().images[3] * 255 / 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((64, 64)).save(buf, format="PNG")
    return buf.getvalue()


def measure(tree: Path) -> dict[str, float]:
    """Seconds from the server's start to each demo task's first answer."""
    home = Path(tempfile.mkdtemp(prefix="restune-first-run-"))
    converted = Path.home() / ".cache" / "restune" / "backbones"
    if converted.is_dir():
        shutil.copytree(converted, home / "backbones")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTUNE_")}
    env.update(
        PYTHONPATH=str(tree),
        RESTUNE_HOME=str(home),
        RESTUNE_STORE=f"file://{home / 'tuners'}",
        RESTUNE_DEMO="true",
        RESTUNE_PORT=str(port),
    )
    png = _three_png()
    answered: dict[str, float] = {}
    started = time.monotonic()
    with (home / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve"], cwd=tree, env=env, stdout=log, stderr=log
        )
        try:
            while len(answered) < len(DEMO_TASKS) and time.monotonic() - started < TIMEOUT_S:
                for task in DEMO_TASKS:
                    if task in answered:
                        continue
                    try:
                        resp = httpx.post(
                            f"http://127.0.0.1:{port}/v1/predict",
                            files={"image": ("three.png", png)},
                            data={"tasks": task},
                            timeout=30,
                        )
                    except httpx.HTTPError:
                        continue
                    if resp.status_code == 200:
                        answered[task] = round(time.monotonic() - started, 1)
                time.sleep(1.0)
        finally:
            proc.terminate()
            proc.wait(60)
    shutil.rmtree(home, ignore_errors=True)
    return answered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.first_run", description=__doc__)
    parser.add_argument("--tree", type=Path, default=Path.cwd(), help="checkout to serve")
    parser.add_argument("--out", type=Path, default=None, help="append the result (JSON)")
    args = parser.parse_args(argv)
    result = {"tree": str(args.tree), "seconds_to_answer": measure(args.tree.resolve())}
    print(json.dumps(result))
    if args.out is not None:
        runs = json.loads(args.out.read_text()) if args.out.is_file() else []
        args.out.write_text(json.dumps([*runs, result], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

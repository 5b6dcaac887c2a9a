"""The wheels a lent GPU machine needs to run ``restune serve`` and ``bench/gpu.py``.

That machine reaches no registry and its image lacks the server's web stack, so the missing
wheels travel with the working tree (docs/GPU.md). Which ones is not guessed: an import check
runs, in a fresh interpreter, everything the server loads at start (its CLI, the app with its
routers and middleware, uvicorn's chosen loop and protocol modules, the engine, the stores) and
everything the GPU bench loads, maps each imported top-level module to its distribution, adds
their requirements (markers evaluated for the lent machine), and drops what the machine's
image already has. ``python -m bench.gpu_carry --write`` turns that list into
``bench/gpu_carry.sh``; ``--check`` fails when the script is out of date (the test suite runs
it), so a new import cannot be forgotten.

Wheels with compiled code are downloaded for every Python in :data:`DEVICE_PYTHONS`; the lent
machine installs from the folder with ``--find-links``, and pip picks the one that matches its
interpreter.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_carry.sh"

DEVICE_PYTHONS = ("3.11", "3.12", "3.13")
"""Interpreters compiled wheels are fetched for. The lent machine's python3 is 3.12 (its
image, 2026-11); the neighbours cover an image update and this project's own 3.11."""

PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)

DEVICE_IMAGE = frozenset(
    [
        "absl-py",
        "accelerate",
        "aiofiles",
        "aiohappyeyeballs",
        "aiohttp",
        "aiosignal",
        "anyio",
        "attrs",
        "certifi",
        "charset-normalizer",
        "click",
        "cloudpickle",
        "contourpy",
        "cycler",
        "filelock",
        "fonttools",
        "fsspec",
        "h11",
        "h5py",
        "httpcore",
        "httpx",
        "huggingface-hub",
        "idna",
        "imageio",
        "jinja2",
        "joblib",
        "kiwisolver",
        "lazy-loader",
        "markdown",
        "markdown-it-py",
        "markupsafe",
        "matplotlib",
        "mdurl",
        "ml-dtypes",
        "mpmath",
        "networkx",
        "numpy",
        "nvidia-ml-py",
        "onnx",
        "onnx-ir",
        "onnxruntime",
        "onnxscript",
        "opencv-python-headless",
        "packaging",
        "pandas",
        "peft",
        "pillow",
        "pip",
        "pluggy",
        "prometheus-client",
        "protobuf",
        "psutil",
        "pygments",
        "pyparsing",
        "python-dateutil",
        "pyyaml",
        "regex",
        "requests",
        "rich",
        "safetensors",
        "scikit-image",
        "scikit-learn",
        "scipy",
        "sentencepiece",
        "setuptools",
        "six",
        "sympy",
        "threadpoolctl",
        "tifffile",
        "timm",
        "tokenizers",
        "torch",
        "torchvision",
        "tqdm",
        "transformers",
        "triton",
        "typing-extensions",
        "urllib3",
        "uvloop",
        "wheel",
        "zipp",
    ]
)
"""Distributions the lent machine's image has, as its description lists them (the subset
this project could load; names normalised). Its ``annotated-doc`` is left out on purpose: the
image's version is unknown and FastAPI imports it at load, so ours travels."""

SERVE_MODULES = (
    "server.cli",
    "server.app",
    "server.engine.service",
    "server.engine.gpu_engine",
    "server.engine.decode_gpu",
    "server.engine.runtime",
    "tuners_store.filesystem",
    "tuners_store.redis_store",
)
"""What ``python -m server serve`` imports at start (besides the app it builds)."""

BENCH_MODULES = ("bench.gpu", "bench.processes", "bench.server_throughput")
"""What ``python -m bench.gpu`` and its load generator import."""

OPTIONAL = frozenset({"brotli", "httptools", "watchfiles", "websockets"})
"""Compiled modules imported only when present (httpx's brotli decoding, uvicorn's faster
HTTP parser, reloader and WebSocket protocol): the import check runs with them blocked, so the
server is proven to start without them, and they are not carried."""

_CHECK = """
import importlib, importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked by the import check: {name}", name=name)
        return None

BLOCKED = set(json.loads(sys.argv[2]))
sys.meta_path.insert(0, Block())
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
import uvicorn
from server.app import create_app
from server.settings import Settings
config = uvicorn.Config(create_app(Settings()), log_config=None)
config.load()  # imports the loop, HTTP and WebSocket implementations uvicorn picks
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""

PROJECT = "restune"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> list[str]:
    """Top-level modules loaded by the server's start and the GPU bench, in a fresh
    interpreter with the repository first on the path and :data:`OPTIONAL` unimportable."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    modules = json.dumps([*SERVE_MODULES, *BENCH_MODULES])
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, modules, json.dumps(sorted(OPTIONAL))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    names: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return names


def device_environment() -> dict[str, str]:
    """Marker values of the lent machine (Linux x86-64, the first of its Pythons)."""
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    version = DEVICE_PYTHONS[1]
    env.update(
        python_version=version,
        python_full_version=f"{version}.0",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def carried() -> dict[str, str]:
    """Distribution -> version (as installed here) of every wheel the lent machine lacks."""
    owners = md.packages_distributions()
    wanted: set[str] = set()
    for module in imported_modules():
        for dist in owners.get(module, []):
            wanted.add(_normalise(dist))
    env = device_environment()
    out: dict[str, str] = {}
    todo = sorted(wanted)
    while todo:
        name = todo.pop()
        if name in out or name in DEVICE_IMAGE or name == PROJECT:
            continue
        try:
            found = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional import that is not installed here
        out[name] = found.version
        for line in found.requires or []:
            req = Requirement(line)
            marker_env = {**env, "extra": ""}
            if req.marker is None or req.marker.evaluate(marker_env):
                todo.append(_normalise(req.name))
    return dict(sorted(out.items()))


def is_pure(name: str) -> bool:
    """Whether the installed wheel of ``name`` is pure Python (one wheel for every Python)."""
    wheel = md.distribution(name).read_text("WHEEL") or ""
    return "Root-Is-Purelib: true" in wheel


def render(packages: dict[str, str]) -> str:
    """The carry script for ``packages``."""
    pure = [f"{n}=={v}" for n, v in packages.items() if is_pure(n)]
    compiled = [f"{n}=={v}" for n, v in packages.items() if not is_pure(n)]
    platforms = " ".join(f"--platform {p}" for p in PLATFORMS)
    lines = [
        "#!/usr/bin/env bash",
        "# Generated by `python -m bench.gpu_carry --write` from an import check of what",
        "# `restune serve` and bench/gpu.py load; do not edit (tests/bench/test_gpu_carry.py",
        "# fails when it is out of date). Downloads, into .whl/ (ignored by git, carried by the",
        "# device call: see docs/GPU.md), the wheels the lent GPU machine's image lacks, compiled",
        f"# ones for Python {', '.join(DEVICE_PYTHONS)}, and .whl/requirements.txt to install",
        "# them with: pip install --no-index --find-links .whl -r .whl/requirements.txt",
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        'exclude="$(git rev-parse --git-path info/exclude)"  # a worktree\'s .git is a file',
        'mkdir -p "$(dirname "$exclude")"',
        "grep -qxF '/.whl/' \"$exclude\" 2>/dev/null || echo '/.whl/' >> \"$exclude\"",
        "rm -rf .whl && mkdir -p .whl",
        'PY="${PYTHON:-.venv/bin/python}"',
        f"PURE=({' '.join(pure)})",
        f"COMPILED=({' '.join(compiled)})",
        f"PLATFORMS=({platforms})",
        f'"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version '
        f'{DEVICE_PYTHONS[1]} --implementation cp "${{PLATFORMS[@]}}" -d .whl "${{PURE[@]}}"',
        f"for version in {' '.join(DEVICE_PYTHONS)}; do",
        '    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \\',
        '        --implementation cp "${PLATFORMS[@]}" -d .whl "${COMPILED[@]}"',
        "done",
        'printf "%s\\n" "${PURE[@]}" "${COMPILED[@]}" > .whl/requirements.txt',
        "du -sh .whl",
        "",
    ]
    return "\n".join(lines)


def script_packages(text: str) -> dict[str, str]:
    """The name -> version pins a carry script downloads."""
    out: dict[str, str] = {}
    for array in ("PURE", "COMPILED"):
        match = re.search(rf"^{array}=\((.*)\)$", text, re.MULTILINE)
        for pin in (match.group(1) if match else "").split():
            name, version = pin.split("==")
            out[name] = version
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="regenerate bench/gpu_carry.sh")
    action.add_argument("--check", action="store_true", help="fail if the script is stale")
    args = parser.parse_args(argv)
    packages = carried()
    if args.write:
        SCRIPT.write_text(render(packages))
        print(f"wrote {SCRIPT}: {len(packages)} wheels")
        return 0
    have = script_packages(SCRIPT.read_text())
    if have != packages:
        missing = sorted(set(packages.items()) - set(have.items()))
        extra = sorted(set(have.items()) - set(packages.items()))
        print(f"{SCRIPT} is stale: missing {missing}, not needed {extra}; run --write")
        return 1
    print(f"{SCRIPT} carries the {len(packages)} wheels the import check finds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

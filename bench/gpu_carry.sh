#!/usr/bin/env bash
# Wheels that bench/gpu.py needs on a lent GPU machine and that its image lacks (the server,
# its settings and the tuner artifact format use pydantic; the server section runs FastAPI
# and uvicorn). The image has torch, torchvision, triton, timm, httpx, anyio, h11, click,
# prometheus-client, numpy, pillow, scikit-learn. Downloads into .whl/ (ignored by git, carried
# by the device call: see docs/GPU.md), for the machine's Python 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY="${PYTHON:-.venv/bin/python}"
# Versions as in this project's venv; pure-Python wheels except pydantic-core.
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 -d .whl \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 python-multipart==0.0.34 redis==8.1.0
du -sh .whl

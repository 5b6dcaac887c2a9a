"""The client installs alone: ``pip install ./clients`` in a fresh virtualenv gets the SDK and
the ``restune`` HTTP verbs with httpx only (no torch, no server), and they work against a real
server."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

from restuning.backbone import TorchBackbone
from tests.fixtures.live_server import REPO_ROOT, LiveServer
from tests.fixtures.models import tiny_images
from tests.fixtures.tuners import make_artifact, make_config

SERVER_SIDE = ("torch", "numpy", "fastapi", "server", "restuning", "tuners_store", "PIL")


@pytest.fixture(scope="module")
def client_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with only the client distribution (and what pip pulls for it)."""
    root = tmp_path_factory.mktemp("client-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    install = subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "-q", str(REPO_ROOT / "clients")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0 and "Could not find a version" in install.stderr:
        pytest.skip(f"no package index reachable: {install.stderr[-300:]}")
    assert install.returncode == 0, install.stderr
    return root


@pytest.mark.slow
def test_client_installs_alone_and_talks_to_a_server(
    client_env: Path, live_server: LiveServer, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    python, restune = client_env / "bin" / "python", client_env / "bin" / "restune"
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    )
    installed = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert "restune-client" in installed
    assert not installed & {"torch", "numpy", "fastapi", "restune", "pillow"}

    # The SDK, run from outside the repository so nothing of the source tree is importable.
    config = make_config("light", tiny_backbone)
    created = live_server.register("light", make_artifact(config, tiny_backbone.final_norm))
    assert created.status_code in (200, 201), created.text
    image = tmp_path / "a.png"
    image.write_bytes(tiny_images(1, seed=3)[0])
    script = (
        "import sys; from clients import Client\n"
        f"c = Client({live_server.url!r})\n"
        f"answer = c.predict({str(image)!r}, tasks=['light'])[0]['light']\n"
        "assert answer.top is not None, answer\n"
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {SERVER_SIDE!r}]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    sdk = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.strip() == "ok"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(restune), *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )

    assert cli("health", "--url", live_server.url).returncode == 0
    predicted = cli("predict", str(image), "--tasks", "light", "--url", live_server.url)
    assert predicted.returncode == 0, predicted.stderr
    assert "light" in predicted.stdout
    # Verbs that need the server's own code are absent, with a usage error, not a traceback.
    serve = cli("serve")
    assert serve.returncode == 2
    assert "Traceback" not in serve.stderr

"""The playground page at / in a real headless Chromium (Debian's, driven by Playwright).

Uploads two real images, ticks two registered tasks, runs them and checks both answers render
for every image; uploads a tuner through the page's form and sees it appear without a reload.
A screenshot is saved under ``test-artifacts/``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from restuning.backbone import TorchBackbone
from tests.fixtures.live_server import TEST_ADMIN_TOKEN, LiveServer
from tests.fixtures.models import tiny_image
from tests.fixtures.tuners import make_artifact, make_config

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

if CHROMIUM is None:
    pytest.skip("no Chromium (.ci/run installs Debian's chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def register(server: LiveServer, backbone: TorchBackbone, name: str, task: str, seed: int) -> None:
    config = make_config(name, backbone, task=task)  # type: ignore[arg-type]
    resp = httpx.put(
        f"{server.url}/v1/tuners/{name}",
        content=make_artifact(config, backbone.final_norm, seed=seed),
        headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"},
        timeout=30,
    )
    assert resp.status_code in (200, 201), resp.text


@pytest.fixture
def page(live_server: LiveServer) -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 1000})
            yield pg
        finally:
            browser.close()


def test_two_images_two_tasks_render(
    live_server: LiveServer, tiny_backbone: TorchBackbone, page: object, tmp_path: Path
) -> None:
    register(live_server, tiny_backbone, "pg-animal", "classification", seed=1)
    register(live_server, tiny_backbone, "pg-colour", "multilabel", seed=2)
    register(live_server, tiny_backbone, "pg-unticked", "classification", seed=3)
    files = []
    for i in range(2):
        path = tmp_path / f"photo{i}.png"
        tiny_image(i, size=(64, 48)).save(path)
        files.append(str(path))

    pg = page  # playwright Page
    pg.goto(live_server.url + "/")  # type: ignore[attr-defined]
    pg.wait_for_selector('#task-list input[value="pg-colour"]')  # type: ignore[attr-defined]
    pg.set_input_files("#files", files)  # type: ignore[attr-defined]
    pg.uncheck('#task-list input[value="pg-unticked"]')  # type: ignore[attr-defined]
    pg.check('#task-list input[value="pg-animal"]')  # type: ignore[attr-defined]
    pg.check('#task-list input[value="pg-colour"]')  # type: ignore[attr-defined]
    pg.keyboard.press("Tab")  # type: ignore[attr-defined]
    pg.click("#run")  # type: ignore[attr-defined]
    pg.wait_for_selector('.result[data-image="1"] .task[data-task="pg-colour"] .bar')  # type: ignore[attr-defined]

    for image in ("0", "1"):
        for task in ("pg-animal", "pg-colour"):
            bars = pg.locator(f'.result[data-image="{image}"] .task[data-task="{task}"] .bar')  # type: ignore[attr-defined]
            assert bars.count() >= 1, f"no answer for task {task} on image {image}"
        unticked = pg.locator(f'.result[data-image="{image}"] .task[data-task="pg-unticked"]')  # type: ignore[attr-defined]
        assert unticked.count() == 0
    timing = pg.inner_text("#timing")  # type: ignore[attr-defined]
    assert "Backbone" in timing
    assert "fan-out" in timing
    assert pg.inner_text("#predict-error") == ""  # type: ignore[attr-defined]
    # The live panel reads /metrics every 2 s: it must show the batch just served.
    pg.wait_for_function(  # type: ignore[attr-defined]
        "document.getElementById('m-tpf').textContent !== '\u2013'", timeout=10_000
    )
    assert float(pg.inner_text("#m-tpf")) >= 2.0  # type: ignore[attr-defined]

    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)  # type: ignore[attr-defined]


def test_upload_form_registers_without_reload(
    live_server: LiveServer, tiny_backbone: TorchBackbone, page: object, tmp_path: Path
) -> None:
    config = make_config("pg-uploaded", tiny_backbone, task="classification")
    artifact = tmp_path / "pg-uploaded.safetensors"
    artifact.write_bytes(make_artifact(config, tiny_backbone.final_norm, seed=4))

    pg = page
    pg.goto(live_server.url + "/")  # type: ignore[attr-defined]
    pg.fill("#up-name", "pg-uploaded")  # type: ignore[attr-defined]
    pg.set_input_files("#up-file", str(artifact))  # type: ignore[attr-defined]
    pg.fill("#up-token", "wrong-token")  # type: ignore[attr-defined]
    pg.click('#upload-form button[type="submit"]')  # type: ignore[attr-defined]
    pg.wait_for_selector("#upload-status.error")  # type: ignore[attr-defined]
    assert "forbidden" in pg.inner_text("#upload-status")  # type: ignore[attr-defined]

    pg.fill("#up-token", TEST_ADMIN_TOKEN)  # type: ignore[attr-defined]
    pg.click('#upload-form button[type="submit"]')  # type: ignore[attr-defined]
    pg.wait_for_selector('#tuners tbody th:text-is("pg-uploaded")')  # type: ignore[attr-defined]
    assert pg.locator('#task-list input[value="pg-uploaded"]').count() == 1  # type: ignore[attr-defined]
    assert "Registered pg-uploaded v1" in pg.inner_text("#upload-status")  # type: ignore[attr-defined]


def test_versions_and_split_are_shown(
    live_server: LiveServer, tiny_backbone: TorchBackbone, page: object
) -> None:
    name = "pg-canary"
    for seed in (5, 6, 7):
        register(live_server, tiny_backbone, name, "classification", seed=seed)
    split = httpx.put(
        f"{live_server.url}/v1/tuners/{name}/traffic",
        json={"traffic": {"2": 90, "3": 10}},
        headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"},
    )
    assert split.status_code == 200, split.text

    pg = page
    pg.goto(live_server.url + "/")  # type: ignore[attr-defined]
    cell = f'td.versions[data-tuner="{name}"]'
    pg.wait_for_selector(f"{cell} .split")  # type: ignore[attr-defined]
    text = pg.inner_text(cell)  # type: ignore[attr-defined]
    assert "v3 (current)" in text
    assert "v1 (no traffic)" in text
    assert "split: v2 90% · v3 10%" in text

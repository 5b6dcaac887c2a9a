"""``/metrics`` stays under a fixed size with 10,000 registered tuners: per-tuner series exist
for at most ``max_task_metric_labels`` tuners, the rest are summed under ``other``.

The tuners are put straight into a file store (as another replica would) and the server
mirrors its index at start; only the ones a request names are ever loaded.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette nudges towards httpx2
    from fastapi.testclient import TestClient

from restuning.backbone import TorchBackbone
from server.app import create_app
from server.settings import Settings
from tests.fixtures.models import tiny_images
from tests.fixtures.tuners import make_artifact, make_config
from tuners_store.filesystem import FilesystemStore

REGISTERED = 10_000
ANSWERED = 150
"""Tuners that answer requests: more than the label cap, so some answer as ``other``."""
LABEL_CAP = 100
TASKS_PER_REQUEST = 50
METRICS_BOUND_BYTES = 128 * 1024
"""The fixed size /metrics stays under (10,000 uncapped tuner series alone would be ~700 KiB)."""


def name_of(i: int) -> str:
    return f"t{i:05d}"


@pytest.fixture(scope="module")
def crowded_store(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: TorchBackbone) -> Path:
    """A file store holding 10,000 tuners (one valid artifact under every name)."""
    root = tmp_path_factory.mktemp("crowded") / "store"
    store = FilesystemStore(root, fsync=False)
    data = make_artifact(make_config("t", tiny_backbone), tiny_backbone.final_norm)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: store.put_sync(name_of(i), data), range(REGISTERED)))
    return root


@pytest.fixture(scope="module")
def app_client(
    crowded_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    settings = Settings(
        backbone="vit_test_tiny",
        backbone_weights="random:0",
        store=f"file://{crowded_store}",
        home=str(tmp_path_factory.mktemp("home")),
        max_task_metric_labels=LABEL_CAP,
        max_tasks_per_request=TASKS_PER_REQUEST,
        max_wait_ms=1,
        threads=1,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_metrics_stay_small_with_10000_registered_tuners(app_client: TestClient) -> None:
    image = tiny_images(1, seed=6)[0]
    answered = [name_of(i * (REGISTERED // ANSWERED)) for i in range(ANSWERED)]
    for start in range(0, ANSWERED, TASKS_PER_REQUEST):
        tasks = ",".join(answered[start : start + TASKS_PER_REQUEST])
        resp = app_client.post(
            "/v1/predict",
            files=[("image", ("a.png", image, "image/png"))],
            data={"tasks": tasks, "top_k": "1"},
        )
        assert resp.status_code == 200, resp.text
        assert all("labels" in a for a in resp.json()["results"][0]["tasks"].values())
    text = app_client.get("/metrics").text
    size = len(text.encode())
    print(f"\n/metrics with {REGISTERED} registered, {ANSWERED} answering: {size} bytes")
    assert re.search(rf"^restune_tuners_registered {REGISTERED}\.0$", text, re.MULTILINE)
    assert re.search(rf"^restune_tuners_loaded {ANSWERED}\.0$", text, re.MULTILINE)
    for metric in (
        "restune_predictions_total",
        "restune_answers_total",
        "restune_tuner_location",
        "restune_task_successes_total",
        "restune_task_duration_seconds_count",
    ):
        labelled = set(re.findall(rf'^{metric}\{{.*?task="([^"]+)"', text, re.MULTILINE))
        assert len(labelled - {"other"}) <= LABEL_CAP, metric
        assert "other" in labelled, metric
    # Every registered tuner is counted once by where it lives.
    locations = re.findall(r"^restune_tuner_location\{.*\} (\S+)$", text, re.MULTILINE)
    assert sum(float(v) for v in locations) == REGISTERED
    stored_only = re.search(
        r'^restune_tuner_location\{location="store",task="other",version=""\} (\S+)$',
        text,
        re.MULTILINE,
    )
    assert stored_only is not None
    assert float(stored_only.group(1)) == REGISTERED - ANSWERED
    assert size < METRICS_BOUND_BYTES

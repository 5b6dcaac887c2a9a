"""The real Prometheus server scrapes a real `restune serve` with the deploy/ configuration.

The scrape config is derived from deploy/prometheus/prometheus.yml (same job, same path, the
same alert rules; only the target is the live server instead of Docker's DNS). Then the
dashboard's queries run through Prometheus's HTTP API: every one must evaluate, the main panels
must show data, and every alert rule must evaluate healthily.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from clients import Client
from restuning.backbone import TorchBackbone
from tests.deploy.dashboard_queries import (
    PROMETHEUS_CONFIG,
    RULES,
    dashboard_queries,
    dashboard_variable_queries,
)
from tests.fixtures.models import tiny_images
from tests.fixtures.tuners import make_artifact, make_config

pytestmark = pytest.mark.slow

JOB = "restune"
# Bounds on waiting for Prometheus (start, first scrapes, first rule evaluation); polling stops
# as soon as the condition holds.
STARTUP_S = 60.0
DATA_S = 60.0
CANARY = "canary"
IMAGES = tiny_images(8, seed=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape_config(target: str, rules_file: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the restune job pointed at ``target``, 1 s scrapes."""
    deployed = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(j for j in deployed["scrape_configs"] if j["job_name"] == JOB)
    static = {k: v for k, v in job.items() if not k.endswith("_sd_configs")}
    static.update(
        scrape_interval="1s",
        scrape_timeout="1s",
        static_configs=[{"targets": [target]}],
    )
    return {
        "global": {
            **deployed.get("global", {}),
            "scrape_interval": "1s",
            "evaluation_interval": "1s",
        },
        "rule_files": [rules_file],
        "scrape_configs": [static],
    }


def wait_until(what: str, probe: Callable[[], Any], timeout_s: float) -> Any:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def prometheus(
    live_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """A Prometheus server scraping ``live_server``; yields a client on its HTTP API."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`)")
    tmp_path = tmp_path_factory.mktemp("prometheus")
    target = urlsplit(live_server.url).netloc
    shutil.copy(RULES, tmp_path / "rules.yml")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(target, "rules.yml")))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited {proc.returncode}:\n{log_text()}")
        try:
            return client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def log_text() -> str:
        log.flush()
        return (tmp_path / "prometheus.log").read_text()[-4000:]

    try:
        wait_until("prometheus /-/ready", ready, STARTUP_S)
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(client: httpx.Client, expr: str) -> list[dict[str, Any]]:
    """Instant query; fails the test on a PromQL error."""
    r = client.get("/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200, f"{expr!r}: {body.get('error')}"
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def label_values(client: httpx.Client, label: str, metric: str) -> list[str]:
    """Values of ``label`` over the series of ``metric`` (what a Grafana variable lists)."""
    r = client.get(f"/api/v1/label/{label}/values", params={"match[]": metric})
    values: list[str] = r.json()["data"]
    return values


def test_prometheus_scrapes_the_live_server(live_server: Any, prometheus: httpx.Client) -> None:
    # Traffic, so that request counters and latency histograms have series.
    with httpx.Client(base_url=live_server.url, timeout=10.0) as api:
        for path in ("/healthz", "/readyz", "/v1/tuners", "/v1/tuners/no-such-tuner"):
            api.get(path)

    target = urlsplit(live_server.url).netloc

    def target_up() -> bool:
        active = prometheus.get("/api/v1/targets").json()["data"]["activeTargets"]
        return any(t["labels"]["job"] == JOB and t["health"] == "up" for t in active)

    wait_until("the restune target to be up", target_up, DATA_S)

    info = wait_until(
        "restune_backbone_info",
        lambda: query(prometheus, f'restune_backbone_info{{job="{JOB}"}}'),
        DATA_S,
    )
    labels = info[0]["metric"]
    assert labels["instance"] == target
    assert {"arch", "runtime", "device", "dtype"} <= labels.keys()
    assert float(info[0]["value"][1]) == 1.0

    requests = wait_until(
        "restune_requests_total",
        lambda: query(prometheus, f'restune_requests_total{{job="{JOB}"}}'),
        DATA_S,
    )
    assert sum(float(r["value"][1]) for r in requests) >= 1


def canary_traffic(server: Any, backbone: TorchBackbone) -> None:
    """A tuner split 50/50 between two versions, answering predictions (per-task panels)."""
    with Client(server.url, admin_token=server.admin_token) as c:
        for seed in (1, 2):
            config = make_config(CANARY, backbone)
            c.push_tuner(CANARY, make_artifact(config, backbone.final_norm, seed=seed))
    with httpx.Client(base_url=server.url, timeout=30.0) as api:
        resp = api.put(
            f"/v1/tuners/{CANARY}/traffic",
            json={"traffic": {"1": 50, "2": 50}},
            headers=server.admin_headers,
        )
        assert resp.status_code == 200, resp.text
        files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(IMAGES)]
        resp = api.post("/v1/predict", files=files, data={"tasks": CANARY})
        assert resp.status_code == 200, resp.text


def test_dashboard_and_rules_evaluate_on_live_data(
    live_server: Any, prometheus: httpx.Client, tiny_backbone: TorchBackbone
) -> None:
    with httpx.Client(base_url=live_server.url, timeout=10.0) as api:
        for _ in range(3):
            api.get("/v1/tuners")
    canary_traffic(live_server, tiny_backbone)
    queries = {q.where: q.expr for q in dashboard_queries()}

    # The core panels show data once two scrapes have happened (rate() needs two samples),
    # and so do the per-task and canary panels once a split tuner has answered.
    for title in (
        "Replicas serving",
        "Request rate by status",
        "Latency p50 / p95 / p99",
        "Answers by version (canary splits)",
        "Traffic weights (canary splits)",
        "Task latency p95",
        "Probes, scrapes and static files",
    ):
        wheres = [w for w in queries if title in w]
        assert wheres, title
        wait_until(
            f"data for panel {title!r}", partial(query, prometheus, queries[wheres[0]]), DATA_S
        )
    # Every query evaluates without a PromQL error (empty is fine: no predictions were made).
    for where, expr in queries.items():
        try:
            query(prometheus, expr)
        except AssertionError as e:
            pytest.fail(f"{where}: {e}")

    # The dashboard's variables find the live replica.
    target = urlsplit(live_server.url).netloc
    for name, metric, label in dashboard_variable_queries():
        values = wait_until(
            f"values of ${name}", partial(label_values, prometheus, label, metric), DATA_S
        )
        if label == "instance":
            assert target in values

    # The alert rules from deploy/prometheus/rules.yml load and evaluate healthily.
    def evaluated_rules() -> list[dict[str, Any]]:
        groups = prometheus.get("/api/v1/rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        # A rule's health stays "unknown" until its group has been evaluated once.
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    rules = wait_until("rule evaluation", evaluated_rules, DATA_S)
    expected = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {r["name"] for r in rules} == expected
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"

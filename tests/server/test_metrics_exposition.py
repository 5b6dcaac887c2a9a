"""What a scrape gets: OpenMetrics when the scraper offers it, the text format otherwise;
``process_*`` series; no ``_created`` series."""

from __future__ import annotations

from server.metrics import Metrics
from tests.fixtures.live_server import LiveServer

OPENMETRICS = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
"""The Accept header Prometheus sends."""


def test_exposition_negotiates_openmetrics() -> None:
    m = Metrics()
    m.requests.labels(route="/v1/predict", method="POST", status="200").inc()
    body, content_type = m.exposition(accept=OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")
    body, content_type = m.exposition(accept="")
    assert content_type.startswith("text/plain")
    assert "# EOF" not in body.decode()


def test_process_series_and_no_created_series() -> None:
    text = Metrics().render().decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"):
        assert name in text
    assert "_created" not in text


def test_the_route_negotiates(live_server: LiveServer) -> None:
    with live_server.client() as c:
        om = c.get("/metrics", headers={"Accept": OPENMETRICS})
        plain = c.get("/metrics")
    assert om.status_code == plain.status_code == 200
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert plain.headers["content-type"].startswith("text/plain")
    assert "restune_requests_total" in plain.text
    assert "process_resident_memory_bytes" in om.text

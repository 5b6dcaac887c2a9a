"""Read the PromQL out of the deploy files and name what it refers to.

Used by the offline manifest checks (metric and label names against ``server.metrics``) and by
the live Prometheus test (every query evaluates without error on a real server).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "restune.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"

# Grafana's built-in interval and the dashboard's own variables, replaced by values Prometheus
# accepts, so that the query text is plain PromQL.
_GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")

# PromQL words that are neither functions (those are followed by "(") nor metric names.
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_IDENT = re.compile(r"(?<![\w.:])[a-zA-Z_:][\w:]*")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)")


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it came from."""

    where: str
    expr: str


def substitute_variables(expr: str) -> str:
    """Replace Grafana variables: intervals by durations, the dashboard's own by ``.*``."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return _GRAFANA_VARS.get(name, ".*")

    return _VAR.sub(repl, expr)


def dashboard() -> dict[str, Any]:
    """The provisioned dashboard as JSON."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    return _panels(dashboard()["panels"])


def dashboard_queries() -> list[Query]:
    """Every panel target's expression, variables substituted."""
    out = []
    for p in dashboard_panels():
        for t in p.get("targets", []):
            if t.get("expr"):
                where = f"panel {p['title']!r} target {t['refId']}"
                out.append(Query(where, substitute_variables(t["expr"])))
    return out


def dashboard_variable_queries() -> list[tuple[str, str, str]]:
    """``(variable, metric, label)`` for each ``label_values(metric, label)`` variable."""
    out = []
    for v in dashboard()["templating"]["list"]:
        q = v.get("query")
        text = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = _LABEL_VALUES.fullmatch(text.strip())
        if v.get("type") == "query":
            assert m, f"variable {v['name']}: unsupported query {text!r}"
        if m:
            out.append((v["name"], m.group(1), m.group(2)))
    return out


def rule_queries() -> list[Query]:
    """Every alerting or recording rule expression in deploy/prometheus/rules.yml."""
    data = yaml.safe_load(RULES.read_text())
    out = []
    for group in data["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            out.append(Query(f"rule {name}", rule["expr"]))
    return out


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """``(metric, label names matched)`` for every vector selector in ``expr``.

    A light tokenizer, enough for the queries this repository writes: strings, grouping
    clauses and ranges are removed first, so what is left that is not a function call or a
    keyword is a metric name.
    """
    text = _STRING.sub('""', expr)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    found: list[tuple[str, set[str]]] = []
    pos = 0
    stripped = ""
    # Pull out each {matchers} block, remembering which identifier it belongs to.
    pending: dict[int, set[str]] = {}
    for m in _MATCHERS.finditer(text):
        stripped += text[pos : m.start()]
        labels = {part.split("=")[0].split("!")[0].strip() for part in m.group(1).split(",")}
        pending[len(stripped)] = {lab for lab in labels if lab}
        stripped += " "
        pos = m.end()
    stripped += text[pos:]
    for m in _IDENT.finditer(stripped):
        name = m.group(0)
        rest = stripped[m.end() :].lstrip()
        if rest.startswith("(") or name in _KEYWORDS:
            continue
        found.append((name, pending.get(m.end(), set())))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` reads."""
    return {name for name, _ in selectors(expr)}

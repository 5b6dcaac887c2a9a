"""Fuzzing the live server: no generated request gets a 5xx, and the registry stays consistent.

Three parts, all against one real ``restune serve`` process:

* Schemathesis generates requests for every operation of the server's own OpenAPI (the list of
  operations is read from the app, so a new route is fuzzed without editing this file): once
  without credentials (mutating routes must refuse), and the admin operations once more with
  the token, so their validation runs and not only the auth check.
* Schemathesis' stateful run follows the links it infers between operations (a registration's
  name and version into the OIP model routes, with the token).
* Generated bodies never form a valid artifact, so registration, replacement and deletion of
  real tuners get a state machine of their own: random sequences of PUT (valid artifacts,
  repeated bytes included), DELETE, predict and list, checked after every step against a model
  of what the server must hold (versions never reused, identical bytes answer 200, predict
  serves exactly the current version).

``RESTUNE_FUZZ_EXAMPLES`` sets the examples per operation (default 20, for CI); ``make fuzz``
runs 500. Runs are derandomized: the same examples every time.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from schemathesis.checks import not_a_server_error

from restuning.backbone import TorchBackbone
from server.app import create_app
from server.settings import Settings
from tests.fixtures.live_server import LiveServer
from tests.fixtures.models import tiny_images
from tests.reliability import bad_artifacts as art
from tuners_store.artifact import pack_artifact, random_arrays

EXAMPLES = int(os.environ.get("RESTUNE_FUZZ_EXAMPLES", "20"))
SEEDED = {"fz-cls": "classification", "fz-reg": "regression", "fz-emb": "embedding"}
MACHINE_NAMES = ("sm-a", "sm-b", "sm-c")
MACHINE_SEEDS = (0, 1, 2)
# About a minute at 20 examples (CI runs slow tests; `make test-fast` skips them). One
# operation at 500 examples (make fuzz) takes minutes on a small machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(max(300, 3 * EXAMPLES))]

_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": list(HealthCheck),
    # No shrinking on a pass, and a failure is reported as found (the server log has the rest).
    "phases": [hypothesis.Phase.explicit, hypothesis.Phase.generate],
}
STATUSES: Counter[tuple[str, int]] = Counter()
"""(run, status) of every generated request, printed by the last test."""


def _operations() -> list[tuple[str, str, bool]]:
    """(method, path, needs admin) of every documented operation, from the app itself."""
    spec = create_app(Settings()).openapi()
    return [
        (method.upper(), path, bool(op.get("security")))
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    ]


OPERATIONS = _operations()
ADMIN_OPERATIONS = [op for op in OPERATIONS if op[2]]


def op_id(op: tuple[str, str, bool]) -> str:
    return f"{op[0]} {op[1]}"


@pytest.fixture(scope="module")
def api_schema(live_server: LiveServer, tiny_backbone: TorchBackbone) -> Any:
    """The live server's OpenAPI, with real tuners registered so generated names can hit."""
    for name, task in SEEDED.items():
        config = art.config_for(name, tiny_backbone, task=task)
        resp = live_server.register(name, pack_artifact(config, random_arrays(config, seed=3)))
        assert resp.status_code in (200, 201), resp.text
    return schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")


def refused_without_token(ctx: Any, response: Any, case: Any) -> bool | None:
    """Mutating routes never succeed without the admin token."""
    if case.method.upper() in ("PUT", "DELETE"):
        assert not 200 <= response.status_code < 300, (
            f"{case.method} {case.formatted_path} succeeded without the admin token"
        )
    return None


def fuzz(
    schema: Any,
    method: str,
    path: str,
    run: str,
    prepare: Callable[[Any], None],
    checks: list[Any],
) -> None:
    """``EXAMPLES`` generated calls of one operation; each must pass ``checks``."""
    operation = schema[path][method]

    @hypothesis.settings(max_examples=EXAMPLES, **_SETTINGS)  # type: ignore[arg-type]
    @given(case=operation.as_strategy())
    def one(case: Any) -> None:
        prepare(case)
        response = case.call_and_validate(checks=checks)
        STATUSES[(run, response.status_code)] += 1

    one()


def without_token(case: Any) -> None:
    headers = dict(case.headers or {})
    headers.pop("Authorization", None)
    headers.pop("authorization", None)
    case.headers = headers


@pytest.mark.parametrize(("method", "path", "admin"), OPERATIONS, ids=map(op_id, OPERATIONS))
def test_fuzz_without_credentials(
    method: str, path: str, admin: bool, api_schema: Any, live_server: LiveServer
) -> None:
    fuzz(
        api_schema,
        method,
        path,
        "anonymous",
        without_token,
        [not_a_server_error, refused_without_token],
    )
    assert live_server.running, live_server.stderr_tail()


@pytest.mark.parametrize(
    ("method", "path", "admin"), ADMIN_OPERATIONS, ids=map(op_id, ADMIN_OPERATIONS)
)
def test_fuzz_admin_routes_with_the_token(
    method: str, path: str, admin: bool, api_schema: Any, live_server: LiveServer
) -> None:
    def with_token(case: Any) -> None:
        without_token(case)
        case.headers.update(live_server.admin_headers)

    fuzz(api_schema, method, path, "admin", with_token, [not_a_server_error])
    assert live_server.running, live_server.stderr_tail()


def test_fuzz_stateful_links(api_schema: Any, live_server: LiveServer) -> None:
    """Schemathesis' own stateful run over the links it infers, with the admin token."""
    base = api_schema.as_state_machine()

    class Workflow(base):  # type: ignore[misc, valid-type]
        def before_call(self, case: Any) -> None:
            without_token(case)
            case.headers.update(live_server.admin_headers)

        def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any) -> None:
            STATUSES[("stateful", response.status_code)] += 1
            case.validate_response(response, checks=[not_a_server_error])

    Workflow.run(
        settings=hypothesis.settings(
            max_examples=EXAMPLES,
            stateful_step_count=8,
            **_SETTINGS,  # type: ignore[arg-type]
        )
    )
    assert live_server.running, live_server.stderr_tail()


# --- registry state machine ------------------------------------------------------------------


@dataclass
class Expected:
    """What the server must hold for one name."""

    versions: dict[str, int] = field(default_factory=dict)
    """sha256 -> version of every stored version."""
    current: tuple[int, str] | None = None
    """(version, sha256) served now; None when deleted or never registered."""
    high_water: int = 0
    """Highest version ever assigned: a new version must exceed it (numbers never reused)."""


class RegistryMachine(RuleBasedStateMachine):
    """PUT / DELETE / predict / list in any order, checked against :class:`Expected`."""

    server: LiveServer
    artifacts: dict[tuple[str, int], bytes]
    image: bytes

    def __init__(self) -> None:
        super().__init__()
        self.client = httpx.Client(base_url=self.server.url, timeout=60.0)
        self.admin = self.server.admin_headers
        # Each run starts from no machine tuners (deleting also keeps the high-water marks).
        self.expected = {name: Expected() for name in MACHINE_NAMES}
        for name in MACHINE_NAMES:
            resp = self.client.delete(f"/v1/tuners/{name}", headers=self.admin)
            assert resp.status_code in (200, 404), resp.text

    def teardown(self) -> None:
        self.client.close()

    def count(self, resp: httpx.Response) -> httpx.Response:
        STATUSES[("registry-machine", resp.status_code)] += 1
        assert resp.status_code < 500, resp.text
        return resp

    @rule(name=st.sampled_from(MACHINE_NAMES), seed=st.sampled_from(MACHINE_SEEDS))
    def register(self, name: str, seed: int) -> None:
        resp = self.count(
            self.client.put(
                f"/v1/tuners/{name}",
                content=self.artifacts[(name, seed)],
                headers={**self.admin, "Content-Type": "application/octet-stream"},
            )
        )
        body = resp.json()
        exp = self.expected[name]
        known = exp.versions.get(body.get("sha256", ""))
        if known is not None:
            assert (resp.status_code, body["version"]) == (200, known), body
        else:
            assert resp.status_code == 201, body
            assert body["version"] > exp.high_water, (body, exp)
            exp.versions[body["sha256"]] = body["version"]
            exp.high_water = body["version"]
        exp.current = (body["version"], body["sha256"])

    @rule(name=st.sampled_from(MACHINE_NAMES))
    def delete(self, name: str) -> None:
        resp = self.count(self.client.delete(f"/v1/tuners/{name}", headers=self.admin))
        exp = self.expected[name]
        if exp.current is None:
            assert (resp.status_code, resp.json()["code"]) == (404, "tuner_not_found")
        else:
            assert resp.status_code == 200, resp.text
            exp.current = None
            exp.versions.clear()  # every version goes; the high-water mark stays

    @rule(names=st.lists(st.sampled_from(MACHINE_NAMES), min_size=1, max_size=3, unique=True))
    def predict(self, names: list[str]) -> None:
        resp = self.count(
            self.client.post(
                "/v1/predict",
                files=[("image", ("x.png", self.image, "image/png"))],
                data={"tasks": ",".join(names)},
            )
        )
        missing = [n for n in names if self.expected[n].current is None]
        if missing:
            body = resp.json()
            assert (resp.status_code, body["code"]) == (404, "unknown_task"), body
            assert body["task"] in missing
            return
        assert resp.status_code == 200, resp.text
        answers = resp.json()["results"][0]["tasks"]
        for name in names:
            assert (answers[name]["version"], answers[name]["sha256"]) == self.expected[
                name
            ].current

    @invariant()
    def listing_matches(self) -> None:
        listed = self.count(self.client.get("/v1/tuners")).json()["tuners"]
        served = {
            t["name"]: (t["version"], t["sha256"]) for t in listed if t["name"] in self.expected
        }
        wanted = {n: e.current for n, e in self.expected.items() if e.current is not None}
        assert served == wanted


def test_fuzz_registry_state_machine(live_server: LiveServer, tiny_backbone: TorchBackbone) -> None:
    RegistryMachine.server = live_server
    RegistryMachine.image = tiny_images(1, seed=9)[0]
    RegistryMachine.artifacts = {
        (name, seed): art.valid(name, tiny_backbone, seed=seed)
        for name in MACHINE_NAMES
        for seed in MACHINE_SEEDS
    }
    run_state_machine_as_test(
        RegistryMachine,
        settings=hypothesis.settings(
            max_examples=max(5, EXAMPLES // 2),
            stateful_step_count=12,
            **_SETTINGS,  # type: ignore[arg-type]
        ),
    )
    assert live_server.running


def test_fuzz_summary(live_server: LiveServer) -> None:
    """No 5xx anywhere in the server's own request counter; prints what the runs saw."""
    with live_server.client() as c:
        metrics = c.get("/metrics").text
    server_errors = [
        line
        for line in metrics.splitlines()
        if line.startswith("restune_requests_total{")
        and 'status="5' in line
        and float(line.rsplit(" ", 1)[1]) > 0
    ]
    assert server_errors == []
    for (run, status), n in sorted(STATUSES.items()):
        print(f"fuzz {run:<17} status {status}: {n}")
    print(f"fuzz total requests: {sum(STATUSES.values())} ({EXAMPLES} examples per operation)")

"""Only the admin token changes state; the token never reaches a log; nothing is unpickled or
fetched.

Mutating routes are found in the app itself (every documented operation that is not a read),
so a new one that forgets the admin dependency fails here. The OIP repository load/unload
routes are among them: they change neither what is registered nor any answer (tested below),
but they move tuners in and out of this replica's memory, and an anonymous client looping on
unload would make every request pay a reload.
"""

from __future__ import annotations

import ast
import base64
import inspect
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import server
import tuners_store
from restuning.backbone import TorchBackbone
from server.api import deps
from server.app import create_app
from server.logging_config import REDACTED
from server.settings import Settings
from tests.fixtures.live_server import LiveServer, StartServer
from tests.fixtures.models import tiny_images
from tests.reliability import bad_artifacts as art
from tests.reliability.raw_http import RawRequest, send

REPO = Path(__file__).resolve().parents[2]
READ_ONLY_POSTS = {
    "/v1/predict",
    "/v2/models/{task}/infer",
    "/v2/models/{task}/versions/{version}/infer",
    "/v2/repository/index",
}
"""POST routes that compute an answer and change nothing."""
NAME = "auth-kept"
WRONG_TOKENS = [
    "Bearer wrong-token",
    "Bearer test-admin-token-012345678",  # the real token minus its last character
    "Bearer test-admin-token-01234567890",  # plus one
    "Bearer TEST-ADMIN-TOKEN-0123456789",
]
CONSTANT_TIME = {"hmac.compare_digest", "secrets.compare_digest"}
SECRET_NAME = re.compile(r"^(admin_)?token$|credential|authorization|secret|password")
MALFORMED = ["", "Bearer", "Bearer ", "Basic dGVzdDp0ZXN0", "test-admin-token-0123456789"]


def _operations() -> dict[tuple[str, str], bool]:
    """(method, path) -> whether OpenAPI says it needs the admin token, for every operation."""
    spec = create_app(Settings()).openapi()
    return {
        (method.upper(), path): bool(op.get("security"))
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    }


OPERATIONS = _operations()
MUTATING = sorted(
    (method, path)
    for method, path in OPERATIONS
    if method in {"PUT", "DELETE", "PATCH"} or (method == "POST" and path not in READ_ONLY_POSTS)
)


def test_exactly_the_mutating_routes_need_the_token() -> None:
    assert ("PUT", "/v1/tuners/{name}") in MUTATING
    assert ("DELETE", "/v1/tuners/{name}") in MUTATING
    assert ("POST", "/v2/repository/models/{task}/unload") in MUTATING
    assert sorted(op for op, secured in OPERATIONS.items() if secured) == MUTATING
    # The live tests below check each of them answers 401/403, whatever the OpenAPI says.


def test_token_comparison_is_constant_time() -> None:
    """``require_admin`` compares with ``hmac.compare_digest``; nothing in the server compares
    anything token-like with ``==``/``!=`` (a timing side channel)."""
    calls = {
        ast.unparse(node.func)
        for node in ast.walk(ast.parse(inspect.getsource(deps.require_admin)))
        if isinstance(node, ast.Call)
    }
    assert calls & CONSTANT_TIME
    checkers = 0
    for path in Path(server.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        # Whatever else checks a presented token (tenant tokens) compares in constant time too.
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and fn.name in (
                "require_admin",
                "authenticate",
            ):
                checkers += 1
                used = {ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
                assert used & CONSTANT_TIME, (path, fn.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Eq | ast.NotEq) for op in node.ops
            ):
                names = {
                    n.id if isinstance(n, ast.Name) else n.attr
                    for n in ast.walk(node)
                    if isinstance(n, ast.Name | ast.Attribute)
                }
                secret_like = {n for n in names if SECRET_NAME.search(n.lower())}
                assert not secret_like, (path, ast.unparse(node))
    assert checkers >= 1


def test_uploads_are_never_unpickled() -> None:
    """No unpickling call in the code that reads uploads; the one torch.load (local backbone
    checkpoints, not uploads) is weights-only."""
    risky = {
        "pickle.load",
        "pickle.loads",
        "dill.load",
        "dill.loads",
        "joblib.load",
        "marshal.loads",
        "cloudpickle.load",
        "cloudpickle.loads",
        "numpy.load",
        "np.load",
    }
    roots = [Path(server.__file__).parent, Path(tuners_store.__file__).parent, REPO / "restuning"]
    torch_loads = []
    for root in roots:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                assert name not in risky, f"{path}: {name}"
                if name == "torch.load":
                    torch_loads.append(path)
                    kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    assert kwargs.get("weights_only") == "True", path
    assert all(p.name == "backbone.py" for p in torch_loads), torch_loads


# --- live -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kept(live_server: LiveServer, tiny_backbone: TorchBackbone) -> dict[str, Any]:
    """A registered tuner that refused requests must leave exactly as it is."""
    resp = live_server.register(NAME, art.valid(NAME, tiny_backbone, seed=1))
    assert resp.status_code == 201, resp.text
    with live_server.client() as c:
        detail: dict[str, Any] = c.get(f"/v1/tuners/{NAME}").json()
    return detail


def mutation(
    method: str, path: str, backbone: TorchBackbone, name: str, authorization: str | None
) -> RawRequest:
    """The request of a mutating operation on ``name``, sent as written (``Bearer `` too)."""
    headers = {} if authorization is None else {"Authorization": authorization}
    body = b""
    if method == "PUT":
        body = art.valid(name, backbone, seed=2)
        headers["Content-Type"] = "application/octet-stream"
    return RawRequest(method, path.replace("{name}", name).replace("{task}", name), body, headers)


def refusal(resp: Any, path: str) -> tuple[int, str | None]:
    """(status, code) of a refusal; OIP routes answer the protocol's ``{"error"}`` body,
    which has no code."""
    body = resp.json()
    if path.startswith("/v2/"):
        assert isinstance(body.get("error"), str), body
        return resp.status, None
    return resp.status, body["code"]


@pytest.mark.parametrize(("method", "path"), MUTATING, ids=[f"{m} {p}" for m, p in MUTATING])
@pytest.mark.parametrize("target", [NAME, "auth-new"])
def test_mutations_without_the_token_are_refused(
    method: str,
    path: str,
    target: str,
    live_server: LiveServer,
    kept: dict[str, Any],
    tiny_backbone: TorchBackbone,
) -> None:
    for header in [None, *MALFORMED]:
        oip = path.startswith("/v2/")
        resp = send(live_server.url, mutation(method, path, tiny_backbone, target, header))
        assert refusal(resp, path) == (401, None if oip else "unauthorized"), header
        assert resp.headers["www-authenticate"] == 'Bearer realm="restune"'
    for header in WRONG_TOKENS:
        resp = send(live_server.url, mutation(method, path, tiny_backbone, target, header))
        assert refusal(resp, path) == (403, None if oip else "forbidden"), header
        assert "www-authenticate" not in resp.headers
    # Nothing changed: the kept tuner is as it was, the new name does not exist.
    with live_server.client() as c:
        assert c.get(f"/v1/tuners/{NAME}").json() == kept
        assert c.get("/v1/tuners/auth-new").status_code == 404


def test_a_server_without_a_token_refuses_every_mutation(
    live_server_factory: StartServer, tiny_backbone: TorchBackbone
) -> None:
    open_server = live_server_factory(RESTUNE_ADMIN_TOKEN="")
    for method, path in MUTATING:
        for auth in (None, "Bearer ", "Bearer x", "Bearer null"):
            resp = send(open_server.url, mutation(method, path, tiny_backbone, "no-token", auth))
            status, code = refusal(resp, path)
            assert status in (401, 403), resp.body
            assert code in ("unauthorized", "forbidden", None if path.startswith("/v2/") else "")
    with open_server.client() as c:
        assert c.get("/v1/tuners").json()["tuners"] == []


def test_oip_load_unload_change_no_state(live_server: LiveServer, kept: dict[str, Any]) -> None:
    """Load/unload take the token, and change neither the registered tuners nor an answer."""
    image = tiny_images(1, seed=4)
    admin = live_server.admin_headers
    with live_server.client() as c:

        def answer() -> Any:
            resp = c.post(
                "/v1/predict", files=[("image", ("a.png", image[0]))], data={"tasks": NAME}
            )
            assert resp.status_code == 200, resp.text
            return resp.json()["results"]

        before, listed = answer(), c.get("/v1/tuners").json()
        assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 401
        assert c.get(f"/v1/tuners/{NAME}").json()["loaded"] is True
        assert c.post(f"/v2/repository/models/{NAME}/unload", headers=admin).status_code == 200
        assert c.get(f"/v1/tuners/{NAME}").json()["loaded"] is False
        assert c.post(f"/v2/repository/models/{NAME}/load", headers=admin).status_code == 200
        assert answer() == before
        assert c.get("/v1/tuners").json() == listed


# --- logs -------------------------------------------------------------------------------------


def test_the_token_never_reaches_the_logs(
    live_server: LiveServer, kept: dict[str, Any], tiny_backbone: TorchBackbone
) -> None:
    """Requests carry the token (and wrong ones) everywhere a log could pick it up: headers,
    request id, path, query, body, a failed registration, and the 500 of a corrupt blob."""
    token = live_server.admin_token
    assert token
    wrong = "Bearer not-the-token-4242-secret"
    admin = live_server.admin_headers
    with live_server.client() as c:
        c.get("/v1/tuners", headers={**admin, "X-Request-ID": token})
        c.get(f"/v1/tuners?token={token}", headers=admin)
        c.put(f"/v1/tuners/{token}", content=b"not an artifact", headers=admin)
        c.put(f"/v1/tuners/{NAME}", content=b"x", headers={"Authorization": wrong})
        c.delete("/v1/tuners/auth-absent", headers={"Authorization": wrong})
        c.post("/v1/predict", json={"images": [{"b64": "AA=="}], "tasks": [token]}, headers=admin)
        # A 500 by design: a stored blob corrupted on disk cannot be loaded back.
        name = "auth-corrupt"
        assert live_server.register(name, art.valid(name, tiny_backbone)).status_code == 201
        blob = next((live_server.workdir / "store" / name).glob("*.safetensors"))
        blob.write_bytes(blob.read_bytes()[:-8] + b"\xff" * 8)
        assert c.post(f"/v2/repository/models/{name}/unload", headers=admin).status_code == 200
        failed = c.post(f"/v2/repository/models/{name}/load", headers=admin)
        assert failed.status_code == 500, failed.text
        assert c.get("/v1/tuners", headers={"X-Request-ID": "auth-log-flush"}).status_code == 200
    logs = _wait_for_log(live_server, "auth-log-flush")
    assert token not in logs
    assert "not-the-token-4242-secret" not in logs
    assert REDACTED in logs  # the scrubber met the token (and replaced it)
    for line in live_server.stderr_text().splitlines():
        if line.strip():
            json.loads(line)  # still one JSON object per line


def _wait_for_log(server: LiveServer, marker: str) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = server.stderr_text() + server.stdout_path.read_text(errors="replace")
        if marker in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"log line {marker!r} never written")


# --- no image URL fetching --------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """A local TCP listener; the list collects the address of every connection it accepts."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.1)
    accepted: list[tuple[str, int]] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, addr = sock.accept()
            except TimeoutError:
                continue
            accepted.append(addr)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/cat.png", accepted
    finally:
        stop.set()
        thread.join()
        sock.close()


def test_image_urls_are_never_fetched(
    live_server: LiveServer, kept: dict[str, Any], listener: tuple[str, list[tuple[str, int]]]
) -> None:
    url, accepted = listener
    b64_url = base64.b64encode(url.encode()).decode()
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg"><image href="{url}"/></svg>').encode()
    with live_server.client() as c:
        answers = [
            c.post("/v1/predict", json={"images": [{"url": url}], "tasks": [NAME]}),
            c.post("/v1/predict", json={"images": [url], "tasks": [NAME]}),
            c.post("/v1/predict", json={"images": [{"b64": url}], "tasks": [NAME]}),
            c.post("/v1/predict", json={"images": [{"b64": b64_url}], "tasks": [NAME]}),
            c.post(
                "/v1/predict",
                json={"images": [{"b64": f"data:text/uri-list;base64,{b64_url}"}], "tasks": [NAME]},
            ),
            c.post(
                "/v1/predict",
                files=[("image", ("u.txt", url.encode(), "text/uri-list"))],
                data={"tasks": NAME},
            ),
            c.post(
                "/v1/predict",
                files=[("image", ("u.svg", svg, "image/svg+xml"))],
                data={"tasks": NAME},
            ),
            c.post(
                "/v1/predict",
                files=[("image", ("a.png", tiny_images(1)[0]))],
                data={"tasks": NAME, "url": url},
            ),
            c.post(
                f"/v2/models/{NAME}/infer",
                json={
                    "inputs": [
                        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64_url]}
                    ]
                },
            ),
            c.post(
                f"/v2/models/{NAME}/infer",
                json={
                    "inputs": [{"name": "url", "shape": [1], "datatype": "BYTES", "data": [url]}]
                },
            ),
        ]
    statuses = [a.status_code for a in answers]
    assert all(400 <= s < 500 for s in statuses), statuses
    # Give a fetch that might run in the background time to connect.
    time.sleep(0.5)
    assert accepted == []

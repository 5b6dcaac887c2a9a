"""Hostile and lying tuner artifacts against one real server: refused before anything is stored.

Three parts, all through a real ``restune serve`` process (file store):

* a corpus of uploads that each break one thing: configs that lie about the backbone while
  carrying its fingerprint (as ``/readyz`` shows it), non-finite or absurd numbers in the
  config, weights that overflow on the first input, and headers built to be expensive (a
  780 KB shape list, 5000-digit integers, deep nesting, lone surrogates, thousands of tensors):
  each answers its exact 4xx code, and the store holds nothing of it;
* generated uploads (hypothesis, in the style of ``test_fuzz.py``): a valid artifact with one
  config field or one header entry replaced by generated JSON, never a 5xx, never stored
  unless accepted, and an accepted one serves;
* versions that never went through admission (written straight into the store, as another
  replica or an older server could have): the server lists them, answers a per-task error for
  them, and keeps answering every other task of the same and of concurrent requests.

``RESTUNE_FUZZ_EXAMPLES`` sets the generated examples per strategy (default 25).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import hypothesis
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from restuning.backbone import TorchBackbone
from tests.fixtures.live_server import LiveServer
from tests.fixtures.models import tiny_images
from tests.fixtures.tuners import FakeBackboneRef
from tests.reliability import bad_artifacts as art
from tests.tuners_store.artifact_factory import join, split
from tuners_store import open_store

EXAMPLES = int(os.environ.get("RESTUNE_FUZZ_EXAMPLES", "25"))
_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": list(HealthCheck),
    "phases": [hypothesis.Phase.explicit, hypothesis.Phase.generate],
}
GOOD = "steady"
"""A valid tuner registered first; every check below also asks that it still answers."""


@dataclass(frozen=True)
class Case:
    """One hostile upload and the exact answer expected."""

    id: str
    build: Callable[[str, FakeBackboneRef], bytes]
    status: int
    code: str


def _config(path: tuple[str, ...], raw: str) -> Callable[[str, FakeBackboneRef], bytes]:
    return lambda name, bb: art.config_value(name, bb, path, raw)


def _header(old: str, new: str) -> Callable[[str, FakeBackboneRef], bytes]:
    return lambda name, bb: art.raw_header_edit(name, bb, old, new)


CASES = [
    Case("depth-20-lie", art.lying_depth, 422, "artifact_incompatible"),
    Case("dim-8-lie", art.lying_dim, 422, "artifact_incompatible"),
    Case("scale-nan", _config(("bypass", "scale"), "NaN"), 422, "artifact_bad_config"),
    Case("scale-1e38", _config(("bypass", "scale"), "1e38"), 422, "artifact_bad_config"),
    Case("scale-inf", _config(("bypass", "scale"), "-Infinity"), 422, "artifact_bad_config"),
    Case("lam-nan", _config(("bypass", "lam"), "NaN"), 422, "artifact_bad_config"),
    Case("val-score-nan", _config(("training", "val_score"), "NaN"), 422, "artifact_bad_config"),
    Case(
        "extra-inf",
        _config(("training", "extra"), '{"loss": Infinity}'),
        422,
        "artifact_bad_config",
    ),
    Case(
        "config-5000-digits",
        _config(("bypass", "bottleneck"), "9" * 5000),
        422,
        "artifact_bad_config",
    ),
    Case(
        "overflowing-weights", lambda n, bb: art.overflowing(n, bb), 422, "artifact_dry_run_failed"
    ),
    Case(
        "header-5000-digits",
        _header('"data_offsets": [0,', '"data_offsets": [' + "9" * 5000 + ","),
        422,
        "artifact_bad_header",
    ),
    Case(
        "header-nan",
        _header('"data_offsets": [0,', '"data_offsets": [NaN,'),
        422,
        "artifact_bad_header",
    ),
    Case(
        "lone-surrogate-name",
        _header('"head.bias"', '"head.bias\\ud800"'),
        422,
        "artifact_bad_header",
    ),
    Case(
        "lone-surrogate-metadata-key",
        _header('"restune.format"', '"\\udc00": "1", "restune.format"'),
        422,
        "artifact_bad_header",
    ),
    Case("huge-shape-list", lambda n, bb: art.huge_shape_list(n, bb), 422, "artifact_bad_header"),
    Case("too-many-tensors", lambda n, bb: art.many_tensors(n, bb), 422, "artifact_bad_header"),
    Case("deep-nesting", lambda n, bb: art.deep_header(), 422, "artifact_bad_header"),
]


def stored(server: LiveServer) -> dict[str, int]:
    """Every name in the server's store with its number of versions (read from the store)."""

    async def read() -> dict[str, int]:
        store = open_store(server.env["RESTUNE_STORE"])
        try:
            return {name: len(await store.versions(name)) for name in await store.list()}
        finally:
            await store.close()

    return asyncio.run(read())


def form(images: list[bytes], tasks: str) -> dict[str, Any]:
    return {
        "files": [("image", (f"i{i}.png", b, "image/png")) for i, b in enumerate(images)],
        "data": {"tasks": tasks, "top_k": "2"},
    }


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with live_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def served(
    live_server: LiveServer, client: httpx.Client, tiny_backbone: TorchBackbone
) -> FakeBackboneRef:
    """The backbone as an uploader sees it (``/readyz``), after registering :data:`GOOD`."""
    assert live_server.register(GOOD, art.valid(GOOD, tiny_backbone)).status_code == 201
    seen = client.get("/readyz").json()["backbone"]
    return FakeBackboneRef(
        dim=tiny_backbone.dim,
        depth=tiny_backbone.depth,
        arch=seen["arch"],
        fingerprint=seen["fingerprint"],
    )


def good_answers(client: httpx.Client, images: list[bytes]) -> list[Any]:
    resp = client.post("/v1/predict", **form(images, GOOD))
    assert resp.status_code == 200, resp.text
    return [r["tasks"][GOOD] for r in resp.json()["results"]]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_upload_is_refused_and_not_stored(
    case: Case, live_server: LiveServer, client: httpx.Client, served: FakeBackboneRef
) -> None:
    name = f"hostile-{case.id}"
    resp = live_server.register(name, case.build(name, served))
    assert (resp.status_code, resp.json().get("code")) == (case.status, case.code), resp.text
    assert name not in stored(live_server)
    assert client.get(f"/v1/tuners/{name}").status_code == 404
    assert GOOD in stored(live_server)


# -- generated uploads -------------------------------------------------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
CONFIG_PATHS = [
    ("name",),
    ("task",),
    ("labels",),
    ("embedding_dim",),
    ("pooling",),
    ("backbone", "dim"),
    ("backbone", "depth"),
    ("backbone", "fingerprint"),
    ("bypass", "tuner"),
    ("bypass", "layers"),
    ("bypass", "bottleneck"),
    ("bypass", "combine"),
    ("bypass", "lam"),
    ("bypass", "scale"),
    ("bypass", "scale_mode"),
    ("bypass", "prefix_len"),
    ("training", "val_score"),
    ("training", "extra"),
    ("training", "epochs"),
]
TENSOR_FIELDS = ["dtype", "shape", "data_offsets", None]
"""A tensor entry's field to replace (``None``: replace the whole entry)."""


def _check_upload(server: LiveServer, client: httpx.Client, name: str, data: bytes) -> None:
    before = stored(server).get(name, 0)
    resp = server.register(name, data)
    assert resp.status_code < 500, resp.text
    after = stored(server).get(name, 0)
    if resp.status_code in (200, 201):
        # Accepted by chance (a value that happens to be valid): then it must serve.
        answer = client.post("/v1/predict", **form(tiny_images(1, seed=2), name))
        assert answer.status_code == 200, answer.text
        assert "error" not in answer.json()["results"][0]["tasks"][name], answer.text
    else:
        assert 400 <= resp.status_code < 500, resp.text
        assert resp.json()["code"], resp.text
        assert after == before, f"refused ({resp.status_code}) but stored"


def test_generated_configs_never_5xx_never_stored(
    live_server: LiveServer, client: httpx.Client, served: FakeBackboneRef
) -> None:
    name = "gen-config"
    base_header, payload = split(art.valid(name, served))

    @hypothesis.settings(max_examples=EXAMPLES, **_SETTINGS)  # type: ignore[arg-type]
    @given(path=st.sampled_from(CONFIG_PATHS), value=_JSON)
    def check(path: tuple[str, ...], value: Any) -> None:
        header = json.loads(json.dumps(base_header))
        doc = json.loads(header["__metadata__"]["restune.config"])
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        header["__metadata__"]["restune.config"] = json.dumps(doc)  # NaN/Infinity as written
        _check_upload(live_server, client, name, join(header, payload))

    check()


def test_generated_headers_never_5xx_never_stored(
    live_server: LiveServer, client: httpx.Client, served: FakeBackboneRef
) -> None:
    name = "gen-header"
    base_header, payload = split(art.valid(name, served))
    tensors = sorted(k for k in base_header if k != "__metadata__")

    @hypothesis.settings(max_examples=EXAMPLES, **_SETTINGS)  # type: ignore[arg-type]
    @given(tensor=st.sampled_from(tensors), field=st.sampled_from(TENSOR_FIELDS), value=_JSON)
    def check(tensor: str, field: str | None, value: Any) -> None:
        header = json.loads(json.dumps(base_header))
        if field is None:
            header[tensor] = value
        else:
            header[tensor][field] = value
        _check_upload(live_server, client, name, join(header, payload))

    check()


# -- versions that never went through admission ----------------------------------------------


def test_unloadable_versions_answer_per_task_and_others_keep_serving(
    live_server: LiveServer, client: httpx.Client, served: FakeBackboneRef
) -> None:
    rotten = {
        "rotten-depth": art.lying_depth("rotten-depth", served),
        "rotten-dim": art.lying_dim("rotten-dim", served),
        "rotten-scale": art.config_value("rotten-scale", served, ("bypass", "scale"), "NaN"),
    }

    async def write_behind_admission() -> None:
        store = open_store(live_server.env["RESTUNE_STORE"])
        try:
            for name, data in rotten.items():
                await store.put(name, data)  # no validator: as an older server would have
        finally:
            await store.close()

    asyncio.run(write_behind_admission())
    for name in rotten:  # the server learns them from the store's change feed
        for _ in range(200):
            if client.get(f"/v1/tuners/{name}").status_code == 200:
                break
            time.sleep(0.05)
        assert client.get(f"/v1/tuners/{name}").status_code == 200, name
    listed = {row["name"] for row in client.get("/v1/tuners").json()["tuners"]}
    assert set(rotten) <= listed

    images = tiny_images(2, seed=11)
    reference = good_answers(client, images)
    mixed = ",".join([GOOD, *rotten])

    def predict(tasks: str) -> httpx.Response:
        with live_server.client() as c:
            return c.post("/v1/predict", **form(images, tasks))

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(predict, [mixed, GOOD] * 6))
    for resp in responses:
        assert resp.status_code == 200, resp.text
        for i, result in enumerate(resp.json()["results"]):
            assert result["tasks"][GOOD] == reference[i]
            for name in rotten:
                if name in result["tasks"]:
                    error = result["tasks"][name]["error"]
                    assert error["code"] == "tuner_unloadable", error
                    assert name in error["detail"]

    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(images[0]).decode()],
            }
        ]
    }
    for name in rotten:
        resp = client.post(f"/v2/models/{name}/infer", json=body)
        assert resp.status_code == 409, resp.text
        assert "NaN" not in resp.text
    assert good_answers(client, images) == reference

"""Open Inference Protocol v2 with the stock ``tritonclient.http`` against a real server.

Every answer is checked against ``/v1/predict`` for the same image: the protocol is another
door to the same engine, not another engine.
"""

from __future__ import annotations

import base64
import gzip
import io
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from clients import Client
from restuning.backbone import TorchBackbone
from restuning.preprocess import preprocess
from tests.fixtures.live_server import LiveServer
from tests.fixtures.models import tiny_images
from tests.fixtures.tuners import make_artifact, make_config
from tuners_store.config import TaskKind

TASKS: dict[str, TaskKind] = {
    "oip-cls": "classification",
    "oip-ml": "multilabel",
    "oip-reg": "regression",
    "oip-emb": "embedding",
}
IMAGES = tiny_images(3, seed=11)


@pytest.fixture(scope="module")
def server(live_server: LiveServer, tiny_backbone: TorchBackbone) -> LiveServer:
    """The module's server with one tuner of every kind; oip-cls has versions 1 and 2."""
    with Client(live_server.url, admin_token=live_server.admin_token) as c:
        for name, kind in TASKS.items():
            config = make_config(name, tiny_backbone, task=kind)
            c.push_tuner(name, make_artifact(config, tiny_backbone.final_norm, seed=1))
        v2 = make_artifact(make_config("oip-cls", tiny_backbone), tiny_backbone.final_norm, seed=2)
        assert c.push_tuner("oip-cls", v2).version == 2
    return live_server


@pytest.fixture
def triton_client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


def v1_answers(server: LiveServer, task: str, images: list[bytes]) -> list[dict[str, object]]:
    """The raw ``/v1/predict`` answers of ``task`` (``name@v`` allowed), all labels."""
    with Client(server.url) as c:
        p = c.predict(images, task, top_k=100)
    name = task.split("@")[0]
    return [r[name].raw for r in p]


def score_rows(answers: list[dict[str, object]], labels: list[str]) -> np.ndarray:
    """(B, C) scores in label order from v1 answers."""
    rows = np.zeros((len(answers), len(labels)), dtype=np.float32)
    for b, answer in enumerate(answers):
        for item in answer["labels"]:  # type: ignore[attr-defined]
            rows[b, labels.index(item["label"])] = item["score"]
    return rows


def image_input(images: list[bytes], binary: bool) -> triton.InferInput:
    inp = triton.InferInput("image", [len(images)], "BYTES")
    # JSON cannot carry raw bytes: in JSON the images travel base64-encoded.
    elements = images if binary else [base64.b64encode(i) for i in images]
    inp.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return inp


def test_server_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    meta = triton_client.get_server_metadata()
    assert meta["name"] == "restune"
    assert "model_repository" in meta["extensions"]


def test_model_metadata(triton_client: triton.InferenceServerClient) -> None:
    meta = triton_client.get_model_metadata("oip-cls")
    assert meta["name"] == "oip-cls"
    assert meta["versions"] == ["1", "2"]
    # One input, so a client that fills every listed input sends one; pixels are documented
    # beside it as the accepted alternative.
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    pixels = meta["parameters"]["pixels_input"]
    assert pixels == {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["scores"]["shape"] == [-1, 3]
    assert outputs["labels"]["datatype"] == "BYTES"
    assert meta["parameters"]["labels"] == ["cat", "dog", "bird"]
    assert meta["parameters"]["preprocess"]["input_size"] == [3, 32, 32]
    reg = triton_client.get_model_metadata("oip-reg")
    assert [o["name"] for o in reg["outputs"]] == ["values"]
    emb = triton_client.get_model_metadata("oip-emb")
    assert emb["outputs"][0]["shape"] == [-1, 6]
    pinned = triton_client.get_model_metadata("oip-cls", model_version="1")
    assert pinned["parameters"]["version"] == "1"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_encoded_images_equals_v1(
    server: LiveServer, triton_client: triton.InferenceServerClient, binary: bool
) -> None:
    outputs = [
        triton.InferRequestedOutput("scores", binary_data=binary),
        triton.InferRequestedOutput("labels", binary_data=binary),
    ]
    result = triton_client.infer("oip-cls", [image_input(IMAGES, binary)], outputs=outputs)
    scores = result.as_numpy("scores")
    assert scores.shape == (3, 3)
    assert scores.dtype == np.float32
    v1 = v1_answers(server, "oip-cls", IMAGES)
    np.testing.assert_allclose(scores, score_rows(v1, ["cat", "dog", "bird"]), rtol=1e-5, atol=1e-6)
    top1 = [x if isinstance(x, bytes) else x.encode() for x in result.as_numpy("labels")]
    assert top1 == [a["labels"][0]["label"].encode() for a in v1]  # type: ignore[index]
    assert result.get_response()["model_version"] == "2"


@pytest.mark.parametrize("task", ["oip-ml", "oip-reg", "oip-emb"])
def test_infer_every_kind_equals_v1(
    server: LiveServer, triton_client: triton.InferenceServerClient, task: str
) -> None:
    result = triton_client.infer(task, [image_input(IMAGES, True)])  # all outputs, binary
    v1 = v1_answers(server, task, IMAGES)
    if TASKS[task] == "multilabel":
        labels = ["red", "green", "blue", "round"]
        got = result.as_numpy("scores")
        np.testing.assert_allclose(got, score_rows(v1, labels), rtol=1e-5, atol=1e-6)
    elif TASKS[task] == "regression":
        want = np.array([[a["values"][k] for k in ("age", "size")] for a in v1])  # type: ignore[index]
        np.testing.assert_allclose(result.as_numpy("values"), want, rtol=1e-5, atol=1e-6)
    else:
        want = np.array([a["embedding"] for a in v1])
        np.testing.assert_allclose(result.as_numpy("embedding"), want, rtol=1e-5, atol=1e-6)


def test_infer_preprocessed_pixels_equals_v1(
    server: LiveServer, triton_client: triton.InferenceServerClient, tiny_backbone: TorchBackbone
) -> None:
    pixels = np.stack(
        [
            preprocess(
                Image.open(io.BytesIO(data)).convert("RGB"), tiny_backbone.data_config
            ).numpy()
            for data in IMAGES
        ]
    ).astype(np.float32)  # (B, 3, 32, 32)
    inp = triton.InferInput("pixels", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels, binary_data=True)
    result = triton_client.infer("oip-cls", [inp], outputs=[triton.InferRequestedOutput("scores")])
    v1 = v1_answers(server, "oip-cls", IMAGES)
    np.testing.assert_allclose(
        result.as_numpy("scores"), score_rows(v1, ["cat", "dog", "bird"]), rtol=1e-4, atol=1e-5
    )
    json_inp = triton.InferInput("pixels", list(pixels.shape), "FP32")
    json_inp.set_data_from_numpy(pixels, binary_data=False)
    again = triton_client.infer("oip-cls", [json_inp])
    np.testing.assert_allclose(again.as_numpy("scores"), result.as_numpy("scores"), rtol=1e-6)


def test_pinned_version_and_classification_extension(
    server: LiveServer, triton_client: triton.InferenceServerClient
) -> None:
    outputs = [triton.InferRequestedOutput("scores", class_count=2)]
    result = triton_client.infer(
        "oip-cls", [image_input(IMAGES[:1], True)], model_version="1", outputs=outputs
    )
    assert result.get_response()["model_version"] == "1"
    top = [x.decode().split(":") for x in result.as_numpy("scores").reshape(-1)]
    v1 = v1_answers(server, "oip-cls@1", IMAGES[:1])[0]["labels"]
    assert [t[2] for t in top] == [x["label"] for x in v1[:2]]  # type: ignore[index]
    assert [float(t[0]) for t in top] == pytest.approx([x["score"] for x in v1[:2]], rel=1e-5)  # type: ignore[index]
    assert [int(t[1]) for t in top] == [["cat", "dog", "bird"].index(t[2]) for t in top]
    v2 = v1_answers(server, "oip-cls@2", IMAGES[:1])[0]["labels"]
    assert [x["score"] for x in v1] != pytest.approx([x["score"] for x in v2])  # type: ignore[index,attr-defined]


def test_repository_load_unload(
    triton_client: triton.InferenceServerClient, server: LiveServer
) -> None:
    index = {m["name"]: m for m in triton_client.get_model_repository_index()}
    assert set(TASKS) <= set(index)
    assert index["oip-reg"]["state"] == "READY"
    assert index["oip-cls"]["version"] == "2"
    assert triton_client.is_model_ready("oip-reg")
    # Load and unload take a writer or admin token; the reads around them do not.
    with pytest.raises(InferenceServerException) as no_token:
        triton_client.unload_model("oip-reg")
    assert no_token.value.status() == "401"
    with pytest.raises(InferenceServerException) as bad_token:
        triton_client.unload_model("oip-reg", headers={"Authorization": "Bearer wrong"})
    assert bad_token.value.status() in ("401", "403")
    triton_client.unload_model("oip-reg", headers=server.admin_headers)
    index = {m["name"]: m for m in triton_client.get_model_repository_index()}
    assert index["oip-reg"]["state"] == "UNAVAILABLE"  # still registered, not in memory
    # Ready all the same: the next request loads it (a 503 here would page the on-call).
    assert triton_client.is_model_ready("oip-reg")
    result = triton_client.infer("oip-reg", [image_input(IMAGES[:1], True)])
    assert result.as_numpy("values").shape == (1, 2)
    triton_client.unload_model("oip-reg", headers=server.admin_headers)
    triton_client.load_model("oip-reg", headers=server.admin_headers)
    assert triton_client.is_model_ready("oip-reg")
    assert triton_client.is_model_ready("oip-cls", model_version="2")
    assert triton_client.is_model_ready("oip-cls", model_version="1")
    assert not triton_client.is_model_ready("oip-cls", model_version="9")


def test_errors_use_the_protocol_shape(triton_client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.infer("oip-nope", [image_input(IMAGES[:1], True)])
    assert unknown.value.status() == "404"
    assert "oip-nope" in unknown.value.message()
    with pytest.raises(InferenceServerException) as bad:
        triton_client.infer("oip-cls", [image_input([b"not an image"], True)])
    assert bad.value.status() == "422"
    wrong = triton.InferInput("tokens", [1], "INT32")
    wrong.set_data_from_numpy(np.array([1], dtype=np.int32))
    with pytest.raises(InferenceServerException) as unknown_input:
        triton_client.infer("oip-cls", [wrong])
    assert unknown_input.value.status() == "400"
    with pytest.raises(InferenceServerException) as bad_version:
        triton_client.get_model_metadata("oip-cls", model_version="9")
    assert bad_version.value.status() == "404"
    assert not triton_client.is_model_ready("oip-nope")


def test_generic_client_fills_every_listed_input(
    server: LiveServer, triton_client: triton.InferenceServerClient
) -> None:
    """A client that builds its request from the metadata alone (one tensor per listed input,
    every listed output) gets the /v1 answer."""
    meta = triton_client.get_model_metadata("oip-cls")
    inputs = []
    for spec in meta["inputs"]:
        assert spec["datatype"] == "BYTES"
        inputs.append(image_input(IMAGES, binary=True))
    outputs = [triton.InferRequestedOutput(o["name"]) for o in meta["outputs"]]
    result = triton_client.infer("oip-cls", inputs, outputs=outputs)
    v1 = v1_answers(server, "oip-cls", IMAGES)
    np.testing.assert_allclose(
        result.as_numpy("scores"), score_rows(v1, ["cat", "dog", "bird"]), rtol=1e-5, atol=1e-6
    )


def test_model_config(triton_client: triton.InferenceServerClient) -> None:
    config = triton_client.get_model_config("oip-cls")
    assert config["name"] == "oip-cls"
    assert config["max_batch_size"] == 8  # the live server's images per request
    assert config["input"] == [
        {"name": "image", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}
    ]
    outputs = {o["name"]: o for o in config["output"]}
    assert outputs["scores"]["data_type"] == "TYPE_FP32"
    assert outputs["scores"]["dims"] == [3]
    assert outputs["labels"]["data_type"] == "TYPE_STRING"
    assert config["parameters"]["labels"] == {"string_value": "cat,dog,bird"}
    assert config["version_policy"] == {"specific": {"versions": [2]}}
    emb = triton_client.get_model_config("oip-emb")
    assert [(o["name"], o["dims"]) for o in emb["output"]] == [("embedding", [6])]
    pinned = triton_client.get_model_config("oip-cls", model_version="1")
    assert pinned["version_policy"] == {"specific": {"versions": [1]}}
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.get_model_config("oip-nope")
    assert unknown.value.status() == "404"


def _stats(client: triton.InferenceServerClient, model: str, version: str = "") -> dict[str, dict]:  # type: ignore[type-arg]
    """Version -> its inference_stats, from the statistics extension."""
    reply = client.get_inference_statistics(model, model_version=version)
    return {s["version"]: s["inference_stats"] for s in reply["model_stats"]}


def test_statistics_count_answers(
    server: LiveServer, triton_client: triton.InferenceServerClient
) -> None:
    before = _stats(triton_client, "oip-ml")["1"]
    triton_client.infer("oip-ml", [image_input(IMAGES, True)])
    with pytest.raises(InferenceServerException):  # refused before it reaches the engine
        triton_client.infer("oip-ml", [image_input([b"not an image"], True)])
    after = _stats(triton_client, "oip-ml")["1"]
    assert after["success"]["count"] == before["success"]["count"] + len(IMAGES)
    assert after["success"]["ns"] > before["success"]["ns"]
    assert after["queue"]["count"] == after["success"]["count"]
    assert after["compute_infer"]["count"] == after["success"]["count"]
    assert after["compute_infer"]["ns"] > before["compute_infer"]["ns"]
    assert after["fail"]["count"] == before["fail"]["count"]
    # Every registered version has a row; a pinned version only its own.
    assert set(_stats(triton_client, "oip-cls")) == {"1", "2"}
    assert set(_stats(triton_client, "oip-cls", "1")) == {"1"}
    every = triton_client.get_inference_statistics()
    assert {s["name"] for s in every["model_stats"]} >= set(TASKS)
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.get_inference_statistics("oip-nope")
    assert unknown.value.status() == "404"

    # The same answers in the per-task Prometheus series.
    with server.client() as c:
        text = c.get("/metrics").text
    assert 'restune_task_successes_total{task="oip-ml"}' in text
    assert 'restune_task_duration_seconds_count{task="oip-ml"}' in text


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(
    server: LiveServer, triton_client: triton.InferenceServerClient, algorithm: str
) -> None:
    result = triton_client.infer(
        "oip-cls",
        [image_input(IMAGES, binary=False)],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    v1 = v1_answers(server, "oip-cls", IMAGES)
    np.testing.assert_allclose(
        result.as_numpy("scores"), score_rows(v1, ["cat", "dog", "bird"]), rtol=1e-5, atol=1e-6
    )


def test_zip_bomb_and_bad_encodings_answer_in_protocol_shape(server: LiveServer) -> None:
    """8 MiB of zeros in 8 KiB of gzip against a 2 MiB limit: 413, not a buffer of 8 MiB."""
    bomb = gzip.compress(b"0" * (8 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 64 * 1024
    url = "/v2/models/oip-cls/infer"
    with server.client() as c:
        big = c.post(url, content=bomb, headers={"Content-Encoding": "gzip"})
        corrupt = c.post(url, content=b"\x1f\x8b garbage", headers={"Content-Encoding": "gzip"})
        small = gzip.compress(b'{"inputs": []}')
        cut = c.post(url, content=small[:-6], headers={"Content-Encoding": "gzip"})
        brotli = c.post(url, content=b"{}", headers={"Content-Encoding": "br"})
    assert big.status_code == 413
    assert "decompressed" in big.json()["error"]
    assert corrupt.status_code == 400, corrupt.text
    assert cut.status_code == 400, cut.text
    assert brotli.status_code == 415
    assert all(set(r.json()) == {"error"} for r in (big, corrupt, cut, brotli))


def test_every_v2_refusal_is_in_protocol_shape(server: LiveServer) -> None:
    """Unknown paths, wrong methods and the body limit: ``{"error"}``, which tritonclient
    decodes, never problem+json; /v1 keeps problem+json."""
    with server.client() as c:
        unknown = c.get("/v2/models/oip-cls/nothing/here/at/all")
        method = c.delete("/v2/models/oip-cls/infer")
        too_big = c.post("/v2/models/oip-cls/infer", content=b"x" * (3 * 1024 * 1024))
        v1 = c.get("/v1/nothing")
    for r, status in ((unknown, 404), (method, 405), (too_big, 413)):
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        assert set(r.json()) == {"error"}
    assert v1.headers["content-type"] == "application/problem+json"


def test_probes_stay_out_of_the_request_rate(
    server: LiveServer, triton_client: triton.InferenceServerClient
) -> None:
    assert triton_client.is_server_live()
    with server.client() as c:
        c.get("/healthz")
        assert c.get("/static/style.css").status_code == 200
        # A request is counted once its answer is sent: poll until the last one shows.
        for _ in range(50):
            text = c.get("/metrics").text
            if 'restune_probe_requests_total{route="/static/{path}"' in text:
                break
            time.sleep(0.1)
    requests = [ln for ln in text.splitlines() if ln.startswith("restune_requests_total{")]
    probes = [ln for ln in text.splitlines() if ln.startswith("restune_probe_requests_total{")]
    for route in ("/v2/health/live", "/healthz", "/static/{path}", "/metrics"):
        assert not any(f'route="{route}"' in ln for ln in requests), route
    for route in ("/v2/health/live", "/healthz", "/static/{path}"):
        assert any(f'route="{route}"' in ln for ln in probes), route
    assert any('route="/v2/models/{task}/infer"' in ln for ln in requests)

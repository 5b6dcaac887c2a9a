"""The SDK against a real ``restune serve`` process (tiny random backbone, file store)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest

from clients import (
    AsyncClient,
    BadImage,
    Client,
    ConnectionFailed,
    Forbidden,
    NotFound,
    Prediction,
    RetryPolicy,
    Unauthorized,
    UnknownTask,
    VersionInUse,
)
from restuning.backbone import TorchBackbone
from tests.fixtures.live_server import LiveServer
from tests.fixtures.models import tiny_image, tiny_images
from tests.fixtures.redis_server import free_port
from tests.fixtures.tuners import make_artifact, make_config
from tuners_store.config import TaskKind

TASKS: dict[str, TaskKind] = {
    "sdk-cls": "classification",
    "sdk-ml": "multilabel",
    "sdk-reg": "regression",
    "sdk-emb": "embedding",
}


def artifact(name: str, backbone: TorchBackbone, seed: int = 0) -> bytes:
    """Artifact bytes of a tiny random tuner trained on the live server's backbone."""
    config = make_config(name, backbone, task=TASKS.get(name, "classification"))
    return make_artifact(config, backbone.final_norm, seed=seed)


@pytest.fixture(scope="module")
def server(live_server: LiveServer, tiny_backbone: TorchBackbone) -> LiveServer:
    """The module's server with one tuner of every kind."""
    with Client(live_server.url, admin_token=live_server.admin_token) as c:
        for name in TASKS:
            c.push_tuner(name, artifact(name, tiny_backbone))
    return live_server


def _numbers(p: Prediction, image: int) -> tuple[list[str], list[float]]:
    """Every task's names and numbers for one image, flattened for comparisons."""
    names: list[str] = []
    numbers: list[float] = []
    for task, answer in sorted(p[image].tasks.items()):
        assert answer.ok, answer.error
        if answer.labels is not None:
            names += [f"{task}:{label}" for label, _ in answer.labels]
            numbers += [score for _, score in answer.labels]
        elif answer.values is not None:
            names += [f"{task}:{key}" for key in answer.values]
            numbers += list(answer.values.values())
        else:
            assert answer.embedding is not None
            numbers += answer.embedding
    return names, numbers


def _same(a: tuple[list[str], list[float]], b: tuple[list[str], list[float]]) -> None:
    assert a[0] == b[0]
    assert a[1] == pytest.approx(b[1], rel=1e-5, abs=1e-6)


def test_predict_every_input_form_and_kind(server: LiveServer, tmp_path: Path) -> None:
    picture = tiny_image(0)
    png = io.BytesIO()
    picture.save(png, format="PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(png.getvalue())
    jpeg = tmp_path / "other.jpg"
    tiny_image(3).save(jpeg, format="JPEG")
    inputs = [path, png.getvalue(), picture, np.asarray(picture), str(jpeg)]
    with Client(server.url) as c:
        p = c.predict(inputs, tasks=list(TASKS), top_k=2)
    assert [r.image for r in p] == [0, 1, 2, 3, 4]
    assert p.backbone["arch"] == "vit_test_tiny"
    first = p[0]
    assert first["sdk-cls"].kind == "classification"
    assert first["sdk-cls"].labels is not None
    assert len(first["sdk-cls"].labels) == 2
    assert first["sdk-ml"].kind == "multilabel"
    assert first["sdk-reg"].values is not None
    assert set(first["sdk-reg"].values) == {"age", "size"}
    emb = first["sdk-emb"].embedding
    assert emb is not None
    assert float(np.linalg.norm(emb)) == pytest.approx(1.0, rel=1e-4)
    for answer in first.tasks.values():
        assert answer.version == 1
        assert answer.sha256 is not None
    # The same pixels as a path, PNG bytes, a PIL image and a numpy array: the same answers.
    for i in (1, 2, 3):
        _same(_numbers(p, 0), _numbers(p, i))
    # A different photo really gets different numbers (the comparison above can fail).
    assert _numbers(p, 4)[1] != pytest.approx(_numbers(p, 0)[1], abs=1e-6)


def test_async_client_matches_sync(server: LiveServer) -> None:
    images = tiny_images(3, seed=5)
    with Client(server.url) as c:
        expected = c.predict(images, "sdk-cls,sdk-reg")

    async def run() -> list[Prediction]:
        async with AsyncClient(server.url) as ac:
            assert await ac.ready()
            # Several requests in flight at once on one client.
            return list(
                await asyncio.gather(
                    *(ac.predict(images, ["sdk-cls", "sdk-reg"]) for _ in range(3))
                )
            )

    for got in asyncio.run(run()):
        for i in range(3):
            _same(_numbers(got, i), _numbers(expected, i))


def test_push_list_get_delete(server: LiveServer, tiny_backbone: TorchBackbone) -> None:
    name = "sdk-lifecycle"
    v1 = artifact(name, tiny_backbone, seed=1)
    v2 = artifact(name, tiny_backbone, seed=2)
    with Client(server.url, admin_token=server.admin_token) as c:
        first = c.push_tuner(name, v1)
        assert first.created
        assert first.version == 1
        again = c.push_tuner(name, v1)  # identical bytes: the same version, not a new one
        assert not again.created
        assert (again.version, again.sha256) == (first.version, first.sha256)
        second = c.push_tuner(name, v2)
        assert second.created
        assert second.version == 2
        listed = {t.name: t for t in c.list_tuners()}
        assert listed[name].version == 2
        assert listed[name].kind == "classification"
        assert set(TASKS) <= set(listed)
        info = c.get_tuner(name)
        assert info.config is not None
        assert info.config["name"] == name
        assert info.versions is not None
        assert len(info.versions) == 2
        assert c.predict(tiny_images(1), f"{name}@1")[0][name].version == 1
        c.delete_tuner(name)
        with pytest.raises(NotFound):
            c.get_tuner(name)
        with pytest.raises(NotFound):
            c.delete_tuner(name)
        with pytest.raises(UnknownTask) as info_err:
            c.predict(tiny_images(1), name)
        assert info_err.value.task == name


def test_a_staged_rollout_with_the_sdk(server: LiveServer, tiny_backbone: TorchBackbone) -> None:
    """Stage, compare side by side, canary, keep the split on upload, delete, promote."""
    name = "sdk-rollout"
    v1, v2, v3 = (artifact(name, tiny_backbone, seed=s) for s in (1, 2, 3))
    images = tiny_images(2, seed=7)
    with Client(server.url, admin_token=server.admin_token) as c:
        assert c.push_tuner(name, v1, promote=False).current  # a first version is live
        staged = c.push_tuner(name, v2, promote=False)
        assert (staged.version, staged.created, staged.current) == (2, True, False)
        assert c.traffic(name).weights == {1: 100}
        assert c.predict(images, name)[0][name].version == 1
        both = c.predict(images, f"{name}@1,{name}@2")
        for result in both:
            assert list(result.tasks) == [f"{name}@1", f"{name}@2"]
            assert (result[f"{name}@1"].version, result[f"{name}@2"].version) == (1, 2)
        split = c.set_traffic(name, {1: 90, 2: 10})
        assert (split.current, split.weights, split.share(2)) == (1, {1: 90, 2: 10}, 0.1)
        kept = c.push_tuner(name, v3)  # the default keeps a split in progress
        assert (kept.version, kept.current) == (3, False)
        assert c.traffic(name).weights == {1: 90, 2: 10}
        with pytest.raises(VersionInUse) as in_use:
            c.delete_version(name, 2)
        assert (in_use.value.code, in_use.value.status) == ("version_in_use", 409)
        assert c.delete_version(name, 3).current == 1
        with pytest.raises(NotFound):
            c.delete_version(name, 3)
        promoted = c.promote(name, 2)
        assert (promoted.current, promoted.weights) == (2, {2: 100})
        assert c.predict(images, name)[0][name].version == 2

    async def in_async() -> None:
        async with AsyncClient(server.url, admin_token=server.admin_token) as ac:
            again = await ac.push_tuner(name, v3, promote=True)
            assert (again.version, again.current) == (4, True)  # numbers are never reused
            assert (await ac.set_traffic(name, {2: 50, 4: 50})).weights == {2: 50, 4: 50}
            assert (await ac.traffic(name)).current == 4
            with pytest.raises(VersionInUse):
                await ac.delete_version(name, 2)
            gone = await ac.delete_version(name, 2, force=True)
            assert (gone.version, gone.current) == (2, 4)
            assert (await ac.traffic(name)).weights == {4: 100}
            assert (await ac.promote(name, 1)).current == 1
            await ac.delete_tuner(name)

    asyncio.run(in_async())


def test_push_from_a_path(server: LiveServer, tiny_backbone: TorchBackbone, tmp_path: Path) -> None:
    path = tmp_path / "sdk-path.safetensors"
    path.write_bytes(artifact("sdk-path", tiny_backbone))
    with Client(server.url, admin_token=server.admin_token) as c:
        assert c.push_tuner("sdk-path", path).version == 1
        assert c.get_tuner("sdk-path").kind == "classification"


def test_error_mapping(server: LiveServer, tiny_backbone: TorchBackbone) -> None:
    good = tiny_images(1)[0]
    with Client(server.url) as c:
        with pytest.raises(UnknownTask) as unknown:
            c.predict(good, ["sdk-cls", "no-such-task"])
        assert unknown.value.task == "no-such-task"
        assert unknown.value.status == 404
        with pytest.raises(BadImage) as bad:
            c.predict([good, b"this is not an image", good], "sdk-cls")
        assert bad.value.image == 1
        with pytest.raises(Unauthorized):
            c.push_tuner("sdk-noauth", artifact("sdk-noauth", tiny_backbone))
    with Client(server.url, admin_token="wrong-token") as c, pytest.raises(Forbidden):
        c.delete_tuner("sdk-cls")
    with Client(server.url) as c:
        assert "sdk-cls" in {t.name for t in c.list_tuners()}


def test_health(server: LiveServer) -> None:
    with Client(server.url) as c:
        health = c.health()
        assert health.live
        assert health.ready
        assert c.ready()
    assert health.detail["backbone"]["arch"] == "vit_test_tiny"


def test_connection_refused_is_connection_failed() -> None:
    with (
        Client(f"127.0.0.1:{free_port()}", retry=RetryPolicy(max_attempts=2)) as c,
        pytest.raises(ConnectionFailed),
    ):
        c.list_tuners()

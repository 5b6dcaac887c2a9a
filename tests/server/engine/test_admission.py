"""Admission against the running backbone, and what a registration costs in hashes and
validations.

The unit part checks :mod:`server.engine.admission` on the tiny backbone; the registry part runs
a real :class:`~server.engine.registry.TunerRegistry` over a file store.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from typing import Any

import pytest
import torch

from server.engine import admission
from server.engine.registry import TunerRegistry
from server.errors import ApiError
from server.settings import Settings
from tests.fixtures.tuners import FakeBackboneRef
from tests.reliability import bad_artifacts as art
from tests.server.engine.engine_kit import RecordingRuntime
from tuners_store import artifact, open_store
from tuners_store.artifact import ArtifactError, validate_artifact

CPU = torch.device("cpu")


def liar(runtime: RecordingRuntime, **lie: int) -> FakeBackboneRef:
    """The running backbone's name and fingerprint with other shapes."""
    shapes = {"dim": runtime.dim, "depth": runtime.depth, **lie}
    return FakeBackboneRef(arch=runtime.arch, fingerprint=runtime.fingerprint, **shapes)


@pytest.mark.parametrize(
    ("lie", "says"),
    [({"depth": 20}, "backbone.depth is 20"), ({"dim": 8}, "backbone.dim is 8")],
)
def test_a_config_that_lies_about_the_backbone_is_incompatible(
    runtime: RecordingRuntime, lie: dict[str, int], says: str
) -> None:
    data = art.valid("liar", liar(runtime, **lie))
    header = validate_artifact(data, expect_fingerprint=runtime.fingerprint)  # the store's view
    with pytest.raises(ArtifactError) as err:
        admission.admit(data, runtime, CPU)
    assert err.value.code == "artifact_incompatible"
    assert says in err.value.message
    with pytest.raises(ArtifactError):
        admission.build_admitted(header, data, runtime, CPU)


def test_the_dry_run_catches_what_only_running_shows(runtime: RecordingRuntime) -> None:
    with pytest.raises(ArtifactError) as err:
        admission.admit(art.overflowing("hot", runtime.torch_backbone), runtime, CPU)
    assert err.value.code == "artifact_dry_run_failed"
    assert "non-finite" in err.value.message


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("tuner", ["res_adapter", "res_prefix", "res_prompt"])
def test_valid_artifacts_are_admitted_and_answer_like_a_direct_build(
    runtime: RecordingRuntime, pooling: str, tuner: str
) -> None:
    config = art.config_for("ok", runtime.torch_backbone, pooling=pooling, tuner=tuner)
    data = artifact.pack_artifact(config, artifact.random_arrays(config, seed=7))
    admitted = admission.admit(data, runtime, CPU)
    assert admitted.header.config == config
    assert not admitted.module.training
    assert all(p.dtype == torch.float32 for p in admitted.module.parameters())


def test_a_build_failure_is_an_artifact_error_not_a_crash(
    runtime: RecordingRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = art.valid("ok", runtime.torch_backbone)
    header = validate_artifact(data)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("size mismatch for head.weight")

    # A fault no valid header can produce: the build itself raising (torch's own checks).
    monkeypatch.setattr(admission, "build_validated", broken)
    with pytest.raises(ArtifactError) as err:
        admission.build_admitted(header, data, runtime, CPU)
    assert err.value.code == "artifact_dry_run_failed"
    assert "RuntimeError: size mismatch" in err.value.message


# -- the registry ----------------------------------------------------------------------------


def test_a_registration_hashes_once_and_validates_once(
    settings: Settings, runtime: RecordingRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = art.valid("counted", runtime.torch_backbone)
    counts: Counter[str] = Counter()
    real_sha256 = hashlib.sha256
    real_check = artifact._check_values

    def sha256(*args: Any, **kwargs: Any) -> Any:
        if args and args[0] == data:
            counts["sha256"] += 1
        return real_sha256(*args, **kwargs)

    def check_values(*args: Any, **kwargs: Any) -> None:
        counts["validate"] += 1
        real_check(*args, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", sha256)
    monkeypatch.setattr(artifact, "_check_values", check_values)

    async def main() -> None:
        store = open_store(settings.store)
        registry = TunerRegistry(store, runtime, settings)
        await registry.start()
        try:
            info, created = await registry.register("counted", data)
            assert created
            assert registry.is_loaded("counted", info.version)
            assert info.sha256 == real_sha256(data).hexdigest()
        finally:
            await registry.stop()
            await store.close()

    asyncio.run(main())
    assert counts == {"sha256": 1, "validate": 1}


def test_a_stored_version_that_fails_admission_is_reported_and_remembered(
    settings: Settings, runtime: RecordingRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = art.lying_depth("liar", runtime.torch_backbone)
    builds = Counter[str]()
    real_admit = admission.admit

    def counting_admit(*args: Any, **kwargs: Any) -> admission.Admitted:
        builds["admit"] += 1
        return real_admit(*args, **kwargs)

    monkeypatch.setattr("server.engine.registry.admit", counting_admit)

    async def main() -> None:
        store = open_store(settings.store)
        await store.put("liar", data)  # behind admission, as an older server could have
        registry = TunerRegistry(store, runtime, settings)
        await registry.start()
        try:
            await registry.settle()
            assert registry.known("liar")
            for _ in range(3):
                with pytest.raises(ApiError) as err:
                    await registry.resolve("liar")
                assert err.value.code == "tuner_unloadable"
                assert err.value.status == 409
                assert err.value.extra["artifact_code"] == "artifact_incompatible"
            assert not registry.is_loaded("liar", 1)
        finally:
            await registry.stop()
            await store.close()

    asyncio.run(main())
    assert builds["admit"] == 1

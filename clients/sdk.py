"""The restune Python SDK: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both build the same :class:`~clients.transport.Request` objects and parse the same typed
results; only the sending differs.

>>> from clients import Client
>>> with Client("http://127.0.0.1:8000") as c:
...     print(c.predict("cat.jpg", tasks=["species", "age"])[0]["species"].top)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from clients.images import ImageInput, encode_image, image_name
from clients.transport import AsyncTransport, Request, RetryPolicy, SyncTransport
from clients.types import Health, Prediction, PushResult, Traffic, TunerInfo, VersionDeleted

DEFAULT_URL = "http://127.0.0.1:8000"

Tasks = str | Sequence[str]
"""Task names as a list, or one comma-separated string; ``name@3`` pins version 3."""


def normalize_url(url: str) -> str:
    """``host:port`` -> ``http://host:port``; no trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def task_list(tasks: Tasks) -> list[str]:
    """Task names from a list or a comma-separated string, blanks dropped."""
    parts = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [t.strip() for t in parts if t.strip()]


def _image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    # Only a list or tuple means "several": bytes, str and arrays are sequences too.
    return list(images) if isinstance(images, list | tuple) else [images]


def _tuner_path(name: str) -> str:
    return "/v1/tuners/" + quote(name, safe="")


def predict_request(
    images: ImageInput | Sequence[ImageInput], tasks: Tasks, top_k: int = 5
) -> Request:
    """``POST /v1/predict`` as multipart: one ``image`` part per image, in order."""
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    for i, image in enumerate(_image_list(images)):
        data, media = encode_image(image)
        files.append(("image", (image_name(image, i), data, media)))
    return Request(
        "POST",
        "/v1/predict",
        data={"tasks": ",".join(task_list(tasks)), "top_k": str(int(top_k))},
        files=files,
    )


def read_artifact(artifact: str | os.PathLike[str] | bytes | bytearray) -> bytes:
    """Artifact bytes from a path or bytes."""
    if isinstance(artifact, bytes | bytearray):
        return bytes(artifact)
    return Path(artifact).read_bytes()


def push_request(name: str, artifact: bytes, promote: bool | None = None) -> Request:
    """``PUT /v1/tuners/{name}`` with the raw artifact; replay-safe thanks to content dedupe.

    ``promote``: True makes the version current and ends any canary split; False only stores
    and loads it; None (the server's default) promotes unless a split is set.
    """
    params = {} if promote is None else {"promote": "true" if promote else "false"}
    return Request(
        "PUT",
        _tuner_path(name),
        params=params,
        content=artifact,
        headers={"Content-Type": "application/octet-stream"},
        replay_safe=True,
    )


def traffic_request(name: str) -> Request:
    """``GET /v1/tuners/{name}/traffic``."""
    return Request("GET", _tuner_path(name) + "/traffic", replay_safe=True)


def set_traffic_request(name: str, weights: Mapping[int, int]) -> Request:
    """``PUT /v1/tuners/{name}/traffic``: setting the same weights twice is harmless."""
    body = {"traffic": {str(int(v)): int(w) for v, w in weights.items()}}
    return Request("PUT", _tuner_path(name) + "/traffic", json=body, replay_safe=True)


def delete_version_request(name: str, version: int, force: bool = False) -> Request:
    """``DELETE /v1/tuners/{name}/versions/{version}``: not replayed (a replay answers 404)."""
    params = {"force": "true"} if force else {}
    return Request("DELETE", f"{_tuner_path(name)}/versions/{int(version)}", params=params)


LIST_TUNERS = Request("GET", "/v1/tuners", replay_safe=True)
LIVENESS = Request("GET", "/healthz", replay_safe=True)
# A probe answers now: a 503 means "not ready", not "retry later".
READINESS = Request("GET", "/readyz", replay_safe=True, accept_statuses=frozenset({503}))


def get_tuner_request(name: str) -> Request:
    """``GET /v1/tuners/{name}``."""
    return Request("GET", _tuner_path(name), replay_safe=True)


def delete_tuner_request(name: str) -> Request:
    """``DELETE /v1/tuners/{name}``: not replayed, a replay would answer 404."""
    return Request("DELETE", _tuner_path(name))


def parse_tuners(resp: httpx.Response) -> list[TunerInfo]:
    """The list of ``GET /v1/tuners``."""
    return [TunerInfo.from_json(t) for t in resp.json().get("tuners", [])]


def parse_push(resp: httpx.Response) -> PushResult:
    """201 = a new version, 200 = these bytes already were a version."""
    return PushResult.from_json(resp.json(), created=resp.status_code == 201)


def _json_object(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _headers(admin_token: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": "restune-client", **(extra or {})}
    if admin_token:
        headers["Authorization"] = f"Bearer {admin_token}"
    return headers


class Client:
    """Blocking client of a restune server.

    ``admin_token`` is sent as a bearer token (needed by push and delete); ``timeout`` is in
    seconds per attempt; ``retry`` says which failures are retried (see clients.transport).
    ``transport`` lets tests or proxies plug in an ``httpx`` transport.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        admin_token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = normalize_url(base_url)
        self._t = SyncTransport(
            self.base_url,
            headers=_headers(admin_token, headers),
            timeout=timeout,
            retry=retry or RetryPolicy(),
            transport=transport,
        )

    def predict(
        self, images: ImageInput | Sequence[ImageInput], tasks: Tasks, top_k: int = 5
    ) -> Prediction:
        """Run ``tasks`` on one image or a list of images (paths, bytes, PIL, uint8 numpy)."""
        return Prediction.from_json(self._t.send(predict_request(images, tasks, top_k)).json())

    def list_tuners(self) -> list[TunerInfo]:
        """Every registered tuner, current version."""
        return parse_tuners(self._t.send(LIST_TUNERS))

    def get_tuner(self, name: str) -> TunerInfo:
        """One tuner with its full config and versions; raises NotFound."""
        return TunerInfo.from_json(self._t.send(get_tuner_request(name)).json())

    def push_tuner(
        self,
        name: str,
        artifact: str | os.PathLike[str] | bytes | bytearray,
        *,
        promote: bool | None = None,
    ) -> PushResult:
        """Register an artifact (a path or bytes) as the next version of ``name`` (admin).

        ``promote``: see :func:`push_request`; ``PushResult.current`` says what happened.
        """
        request = push_request(name, read_artifact(artifact), promote)
        return parse_push(self._t.send(request))

    def delete_tuner(self, name: str) -> None:
        """Delete a tuner and its versions (admin); raises NotFound."""
        self._t.send(delete_tuner_request(name))

    def delete_version(self, name: str, version: int, *, force: bool = False) -> VersionDeleted:
        """Delete one version (admin). The current version or one with canary weight raises
        VersionInUse unless ``force``; so does the only version."""
        resp = self._t.send(delete_version_request(name, version, force))
        return VersionDeleted.from_json(resp.json())

    def traffic(self, name: str) -> Traffic:
        """How plain requests for ``name`` are split between versions."""
        return Traffic.from_json(self._t.send(traffic_request(name)).json())

    def set_traffic(self, name: str, weights: Mapping[int, int]) -> Traffic:
        """Split traffic by integer weights per version, e.g. ``{3: 90, 4: 10}`` (admin);
        all the weight on one version makes it current."""
        return Traffic.from_json(self._t.send(set_traffic_request(name, weights)).json())

    def promote(self, name: str, version: int) -> Traffic:
        """Make ``version`` current with all the traffic: a roll-forward or rollback (admin)."""
        return self.set_traffic(name, {version: 100})

    def health(self) -> Health:
        """Liveness and readiness in one call; raises ConnectionFailed when nobody answers."""
        self._t.send(LIVENESS)
        resp = self._t.send(READINESS)
        return Health(live=True, ready=resp.is_success, detail=_json_object(resp))

    def ready(self) -> bool:
        """True when the server can serve predictions (``/readyz`` is 200)."""
        return self._t.send(READINESS).is_success

    def close(self) -> None:
        """Close pooled connections."""
        self._t.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """Asyncio client of a restune server; same arguments and methods as :class:`Client`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        admin_token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = normalize_url(base_url)
        self._t = AsyncTransport(
            self.base_url,
            headers=_headers(admin_token, headers),
            timeout=timeout,
            retry=retry or RetryPolicy(),
            transport=transport,
        )

    async def predict(
        self, images: ImageInput | Sequence[ImageInput], tasks: Tasks, top_k: int = 5
    ) -> Prediction:
        """Run ``tasks`` on one image or a list of images (paths, bytes, PIL, uint8 numpy)."""
        resp = await self._t.send(predict_request(images, tasks, top_k))
        return Prediction.from_json(resp.json())

    async def list_tuners(self) -> list[TunerInfo]:
        """Every registered tuner, current version."""
        return parse_tuners(await self._t.send(LIST_TUNERS))

    async def get_tuner(self, name: str) -> TunerInfo:
        """One tuner with its full config and versions; raises NotFound."""
        return TunerInfo.from_json((await self._t.send(get_tuner_request(name))).json())

    async def push_tuner(
        self,
        name: str,
        artifact: str | os.PathLike[str] | bytes | bytearray,
        *,
        promote: bool | None = None,
    ) -> PushResult:
        """Register an artifact (a path or bytes) as the next version of ``name`` (admin).

        ``promote``: see :func:`push_request`; ``PushResult.current`` says what happened.
        """
        request = push_request(name, read_artifact(artifact), promote)
        return parse_push(await self._t.send(request))

    async def delete_tuner(self, name: str) -> None:
        """Delete a tuner and its versions (admin); raises NotFound."""
        await self._t.send(delete_tuner_request(name))

    async def delete_version(
        self, name: str, version: int, *, force: bool = False
    ) -> VersionDeleted:
        """Delete one version (admin). The current version or one with canary weight raises
        VersionInUse unless ``force``; so does the only version."""
        resp = await self._t.send(delete_version_request(name, version, force))
        return VersionDeleted.from_json(resp.json())

    async def traffic(self, name: str) -> Traffic:
        """How plain requests for ``name`` are split between versions."""
        return Traffic.from_json((await self._t.send(traffic_request(name))).json())

    async def set_traffic(self, name: str, weights: Mapping[int, int]) -> Traffic:
        """Split traffic by integer weights per version, e.g. ``{3: 90, 4: 10}`` (admin);
        all the weight on one version makes it current."""
        resp = await self._t.send(set_traffic_request(name, weights))
        return Traffic.from_json(resp.json())

    async def promote(self, name: str, version: int) -> Traffic:
        """Make ``version`` current with all the traffic: a roll-forward or rollback (admin)."""
        return await self.set_traffic(name, {version: 100})

    async def health(self) -> Health:
        """Liveness and readiness in one call; raises ConnectionFailed when nobody answers."""
        await self._t.send(LIVENESS)
        resp = await self._t.send(READINESS)
        return Health(live=True, ready=resp.is_success, detail=_json_object(resp))

    async def ready(self) -> bool:
        """True when the server can serve predictions (``/readyz`` is 200)."""
        return (await self._t.send(READINESS)).is_success

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._t.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

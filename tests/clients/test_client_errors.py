"""The client's error taxonomy: one map from the server's codes to exceptions."""

from __future__ import annotations

import json
from email.utils import formatdate

import httpx
import pytest

from clients.errors import (
    ArtifactRejected,
    BadImage,
    Forbidden,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RestuneError,
    ServerError,
    StoreUnavailable,
    Unauthorized,
    UnknownTask,
    ValidationFailed,
    class_for,
    error_from_response,
    parse_retry_after,
)
from server.errors import STATUS_BY_CODE, ApiError


def _problem(code: str, status: int, **extra: object) -> httpx.Response:
    err = ApiError(code, f"detail of {code}", status=status, **extra)
    return httpx.Response(
        status,
        headers={"content-type": "application/problem+json"},
        content=json.dumps(err.problem()).encode(),
    )


@pytest.mark.parametrize(("code", "status"), sorted(STATUS_BY_CODE.items()))
def test_every_server_code_has_a_class_on_the_right_side(code: str, status: int) -> None:
    err = error_from_response(_problem(code, status))
    assert err.code == code
    assert err.status == status
    assert err.detail == f"detail of {code}"
    # A 5xx code is the server's fault, a 4xx one the request's: the CLI's exit codes rely on it.
    assert isinstance(err, ServerError) is (status >= 500)
    assert err.server_side is (status >= 500)
    assert type(err) is not RestuneError


@pytest.mark.parametrize(
    ("code", "status", "cls"),
    [
        ("unknown_task", 404, UnknownTask),
        ("tuner_not_found", 404, NotFound),
        ("bad_image", 422, BadImage),
        ("unauthorized", 401, Unauthorized),
        ("forbidden", 403, Forbidden),
        ("overloaded", 503, Overloaded),
        ("store_unavailable", 503, StoreUnavailable),
        ("rate_limited", 429, RateLimited),
        ("image_too_large", 413, PayloadTooLarge),
        ("backbone_mismatch", 409, ArtifactRejected),
        ("artifact_shape_mismatch", 422, ArtifactRejected),
        ("artifact_too_large", 413, PayloadTooLarge),
        ("something_new", 422, ValidationFailed),
        ("something_new", 503, Overloaded),
        ("something_new", 502, ServerError),
    ],
)
def test_code_to_class(code: str, status: int, cls: type[RestuneError]) -> None:
    assert class_for(code, status) is cls


def test_extra_fields_and_retry_after() -> None:
    task = error_from_response(_problem("unknown_task", 404, task="zebra"))
    assert isinstance(task, UnknownTask)
    assert task.task == "zebra"
    image = error_from_response(_problem("bad_image", 422, image=2))
    assert isinstance(image, BadImage)
    assert image.image == 2
    resp = _problem("overloaded", 503)
    resp.headers["Retry-After"] = "3"
    over = error_from_response(resp)
    assert isinstance(over, Overloaded)
    assert over.retry_after == 3.0


def test_non_json_and_oip_bodies() -> None:
    html = error_from_response(httpx.Response(502, content=b"<html>bad gateway</html>"))
    assert isinstance(html, ServerError)
    assert html.code == "http_502"
    assert "bad gateway" in html.detail
    oip = error_from_response(httpx.Response(400, json={"error": "no such input 'x'"}))
    assert isinstance(oip, ValidationFailed)
    assert oip.detail == "no such input 'x'"


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("garbage") is None
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 5, usegmt=True), now=now) == pytest.approx(5.0)
    assert parse_retry_after(formatdate(now - 5, usegmt=True), now=now) == 0.0

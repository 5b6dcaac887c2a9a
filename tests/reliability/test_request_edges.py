"""Unit checks of the request edge: task references and versions, and error rendering.

The live proof is tests/reliability/test_hostile.py; these pin the rules it relies on.
"""

from __future__ import annotations

import json

import pytest

from server.engine.service import MAX_TASK_REF_CHARS, TaskRef, parse_version
from server.errors import ApiError
from server.problems import MAX_DETAIL_CHARS, problem_response, safe_text


@pytest.mark.parametrize(
    "text",
    [
        "age@\u00b2",  # a superscript two: str.isdigit() says yes, int() says no
        "age@\u0663",  # an Arabic-Indic three: int() takes it
        "age@\uff11",  # a fullwidth one
        "age@" + "9" * 5000,  # past Python's int parsing limit
        "age@1234567890",  # ten digits
        "age@0",
        "age@-1",
        "age@+1",
        "age@1_0",
        "age@ 1",
        "@1",
        "age\ud800",  # a lone surrogate, as JSON can carry
        "a" * (MAX_TASK_REF_CHARS + 1),
    ],
)
def test_bad_task_references_are_validation_errors(text: str) -> None:
    with pytest.raises(ApiError) as err:
        TaskRef.parse(text)
    assert err.value.code == "validation_error"
    assert err.value.status == 422


def test_good_task_references() -> None:
    assert TaskRef.parse(" age ") == TaskRef("age")
    assert TaskRef.parse("age@3") == TaskRef("age", 3)
    assert TaskRef.parse("acme/age@123456789") == TaskRef("acme/age", 123456789)
    assert TaskRef.parse("age@007") == TaskRef("age", 7)
    assert parse_version("12") == 12
    assert parse_version("\u00b2") is None


def test_problem_bodies_render_any_input() -> None:
    """Lone surrogates and megabytes of client text in a problem: escaped and cut, never a
    failed encode (that was a 500)."""
    name = "task\ud800" + "x" * 100_000
    err = ApiError("validation_error", f"task {name!r} is odd", task=name, limit=10**400)
    response = problem_response(err, {"type": "http", "path": "/v1/predict"})
    body = json.loads(response.body)
    assert body["code"] == "validation_error"
    assert len(body["detail"]) < MAX_DETAIL_CHARS + 100
    assert "\\ud800" in body["task"]
    assert body["limit"] == "<integer too large>"


def test_safe_text() -> None:
    assert safe_text("ok") == "ok"
    assert safe_text("a\udfffb") == "a\\udfffb"
    assert safe_text("x" * 10, limit=4) == "xxxx... (10 characters)"

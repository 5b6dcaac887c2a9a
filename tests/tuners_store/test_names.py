"""Tuner names: what may become a directory or a Redis key part."""

from __future__ import annotations

import pytest

from tuners_store.errors import InvalidName
from tuners_store.names import split_qualified_name, validate_name, validate_qualified_name

GOOD = ["cats", "a", "0", "vit-b.cats_v2", "a" * 64]
BAD = [
    "",
    "../x",
    "..",
    ".",
    ".hidden",
    "-x",
    "_x",
    "Cats",
    "a b",
    "a/b",
    "/abs",
    "x/",
    "a\\b",
    "café",
    "ｃａｔｓ",
    "a" * 65,
    "a\n",
    "a\x00b",
    "a:b",
]


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name: str) -> None:
    assert validate_name(name) == name
    assert validate_qualified_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_bad_plain_names(name: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_name(name)
    assert info.value.code == "invalid_name"


@pytest.mark.parametrize("name", ["t/cats", "acme/vit-b.cats", f"{'t' * 64}/{'n' * 64}"])
def test_qualified_names(name: str) -> None:
    assert validate_qualified_name(name) == name
    with pytest.raises(InvalidName):
        validate_name(name)


@pytest.mark.parametrize(
    "name",
    ["a/b/c", "../x", "t/..", "t/../x", "/x", "x/", "T/x", "t/X", "ü/x", f"{'t' * 65}/x", "t//x"],
)
def test_bad_qualified_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_qualified_name(name)


def test_non_string() -> None:
    with pytest.raises(InvalidName):
        validate_name(b"cats")
    with pytest.raises(InvalidName):
        validate_qualified_name(None)


def test_split() -> None:
    assert split_qualified_name("t/cats") == ("t", "cats")
    assert split_qualified_name("cats") == (None, "cats")

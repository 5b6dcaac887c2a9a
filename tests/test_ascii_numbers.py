"""Numbers read from the command line and settings are ASCII digits: ``str.isdigit`` takes
superscripts and other scripts' digits, which ``int`` then refuses with a traceback."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from clients.cli import parse_weights
from restuning.backbone import BackboneLoadError, _parse_seed
from restuning.cli import _parse_layers
from server.settings import Settings

ODD = ["\u00b2", "\u0663", "\uff13"]  # superscript two, Arabic-Indic three, fullwidth three


@pytest.mark.parametrize("digit", ODD)
def test_odd_digits_are_refused_cleanly(digit: str) -> None:
    with pytest.raises(ValueError, match="VERSION=WEIGHT"):
        parse_weights([f"{digit}=90"])
    with pytest.raises(ValueError, match="FIRST-LAST"):
        _parse_layers(f"1-{digit}", 12)
    with pytest.raises(BackboneLoadError):
        _parse_seed(f"random:{digit}")
    with pytest.raises(ValidationError):
        Settings(device=f"cuda:{digit}")


def test_plain_digits_still_parse() -> None:
    assert parse_weights(["3=90", "4=10"]) == {3: 90, 4: 10}
    assert _parse_layers("7-12", 12) == (7, 12)
    assert _parse_seed("random:42") == 42
    assert Settings(device="cuda:1").device == "cuda:1"

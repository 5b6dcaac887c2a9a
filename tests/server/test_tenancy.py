"""Tenancy without a server: the tokens file, token matching, who may touch which name, the
request rates (in this process and shared by replicas through a real Redis) and the quota
merge; a bad tokens file stops ``restune serve`` with exit 2."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from server.app import create_app
from server.errors import ApiError
from server.rate_limits import Rate
from server.settings import Settings
from server.tenancy import (
    ADMIN,
    ANONYMOUS,
    Principal,
    Tenancy,
    read_tokens_file,
    token_sha256,
)
from tests.fixtures.live_server import REPO_ROOT
from tests.fixtures.redis_server import free_port

WRITER = Principal("writer", "acme", "ci")
READER = Principal("reader", "acme", "dash")
OTHER = Principal("writer", "bolt", "ci")


def tokens_doc() -> dict[str, Any]:
    return {
        "tokens": [
            {"sha256": token_sha256("root-token"), "scope": "admin", "label": "ops"},
            {"sha256": token_sha256("acme-w"), "scope": "writer", "tenant": "acme"},
            {"sha256": token_sha256("acme-r").upper(), "scope": "reader", "tenant": "acme"},
        ],
        # 2 back to back, then one per 10 s: the window (20 s) outlasts any test's calls.
        "tenants": {"acme": {"max_tuners": 3, "requests_per_s": 0.1, "burst": 2}},
    }


def tenancy(**settings: Any) -> Tenancy:
    from server.tenancy import TokensFile

    values: dict[str, Any] = {"tenants_enabled": True, "tenant_max_tuner_bytes": 1000}
    values.update(settings)
    return Tenancy(Settings(**values), TokensFile.model_validate(tokens_doc()))


def test_tokens_file_in_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "tokens.toml"
    toml.write_text(
        f'[[tokens]]\nsha256 = "{token_sha256("t")}"\nscope = "writer"\ntenant = "acme"\n\n'
        "[tenants.acme]\nmax_tuners = 5\n"
    )
    parsed = read_tokens_file(toml)
    assert parsed.tokens[0].tenant == "acme"
    assert parsed.tenants["acme"].max_tuners == 5
    as_json = tmp_path / "tokens.json"
    as_json.write_text(json.dumps(tokens_doc()))
    assert len(read_tokens_file(as_json).tokens) == 3
    # sha256sum's output and ours agree
    assert token_sha256("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"sha256": "ab" * 32, "scope": "writer"}, "needs the 'tenant'"),
        ({"sha256": "ab" * 32, "scope": "admin", "tenant": "acme"}, "covers every tenant"),
        ({"sha256": "not-a-hash", "scope": "admin"}, "sha256"),
        ({"sha256": "ab" * 32, "scope": "owner"}, "scope"),
        ({"sha256": "ab" * 32, "scope": "reader", "tenant": "Acme!"}, "tenant"),
        ({"sha256": "ab" * 32, "scope": "admin", "token": "plain"}, "token"),
    ],
)
def test_bad_tokens_files_are_refused(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [entry]}))
    with pytest.raises(ValueError, match=message):
        read_tokens_file(path)


def test_tenant_tokens_need_tenants_on() -> None:
    from server.tenancy import TokensFile

    with pytest.raises(ValueError, match="RESTUNE_TENANTS_ENABLED"):
        Tenancy(Settings(), TokensFile.model_validate(tokens_doc()))


def test_authenticate_matches_hashes_only() -> None:
    t = tenancy(admin_token="env-admin")
    assert t.authenticate("root-token") == Principal("admin", None, "ops")
    assert t.authenticate("env-admin") == ADMIN
    assert t.authenticate("acme-w") == Principal("writer", "acme", "")
    assert t.authenticate("acme-r") == Principal("reader", "acme", "")  # upper-case hash
    for wrong in ("", "acme-w ", "ACME-W", "acme-", token_sha256("acme-w"), "x" * 100_000):
        assert t.authenticate(wrong) is None


def test_who_may_touch_which_name() -> None:
    t = tenancy()
    t.check_read(READER, "acme/pets")
    t.check_write(WRITER, "acme/pets")
    t.check_write(ADMIN, "bolt/pets")
    refused = [
        (t.check_read, READER, "bolt/pets", "forbidden"),
        (t.check_read, OTHER, "acme/pets", "forbidden"),
        (t.check_write, OTHER, "acme/pets", "forbidden"),
        (t.check_write, READER, "acme/pets", "forbidden"),
        (t.check_read, WRITER, "pets", "invalid_name"),  # no tenant part
        (t.check_write, ADMIN, "pets", "invalid_name"),
        (t.check_read, WRITER, "acme/Pets", "invalid_name"),
        (t.check_read, WRITER, "acme/x/y", "invalid_name"),
    ]
    for check, who, name, code in refused:
        with pytest.raises(ApiError) as err:
            check(who, name)
        assert err.value.code == code, (who, name)
    assert t.visible(READER, "acme/a")
    assert not t.visible(READER, "bolt/a")
    assert t.visible(ADMIN, "bolt/a")
    off = Tenancy(Settings())
    off.check_read(ANONYMOUS, "pets")  # tenants off: reads are open
    with pytest.raises(ApiError):
        off.check_write(ANONYMOUS, "pets")


def test_rate_maps_onto_a_window() -> None:
    """Long-run rate ``per_s``; at most ``burst`` (default: the rate rounded up) at once."""
    cases = [(5.0, 0, (5, 1)), (5.0, 5, (5, 1)), (0.5, 0, (1, 2)), (2.0, 10, (10, 5))]
    for per_s, burst, (amount, window) in cases:
        item = Rate(per_s, burst).item()
        assert (item.amount, item.get_expiry()) == (amount, window), (per_s, burst)


LIMITED = "rate_limited 429 True"
"""A refusal as :func:`charge_all` reports it: code, status, a Retry-After of 1 s or more."""


async def charge_all(t: Tenancy, *who: Principal) -> list[str]:
    """Charge each principal in turn: ``ok`` or the refusal's code."""
    out = []
    for p in who:
        try:
            await t.charge(p)
            out.append("ok")
        except ApiError as exc:
            out.append(f"{exc.code} {exc.status} {int(exc.headers()['Retry-After']) >= 1}")
    return out


def test_rate_limit_per_tenant_with_retry_after() -> None:
    t = tenancy()
    assert not t.rates.shared  # a file store: one replica, counts in this process

    async def run() -> None:
        # acme's writer and reader share one rate (burst 2); bolt has none; admins are free.
        assert await charge_all(t, WRITER, READER, WRITER) == ["ok", "ok", LIMITED]
        assert set(await charge_all(t, *[OTHER, ADMIN] * 25)) == {"ok"}

    asyncio.run(run())


@pytest.mark.redis
def test_rate_limit_holds_across_replicas(redis_url: str) -> None:
    """Two replicas on one Redis grant a tenant its rate once, not twice."""
    store = f"{redis_url}?prefix=rates-{uuid.uuid4().hex[:8]}"
    a, b = tenancy(store=store), tenancy(store=store)
    assert a.rates.shared
    assert b.rates.shared

    async def run() -> None:
        assert await charge_all(a, WRITER) + await charge_all(b, READER) == ["ok", "ok"]
        assert await charge_all(a, WRITER) + await charge_all(b, READER) == [LIMITED] * 2

    asyncio.run(run())


def test_rate_limit_survives_a_store_outage() -> None:
    """Redis unreachable: requests are still charged (per replica), never failed or stalled
    for long, and each fallback is reported."""
    falls: list[int] = []
    t = tenancy(store=f"redis://127.0.0.1:{free_port()}/0")
    t.rates.on_fallback = lambda: falls.append(1)
    verdicts = asyncio.run(charge_all(t, WRITER, READER, WRITER))
    assert verdicts == ["ok", "ok", LIMITED]
    assert falls == [1]  # asked once, then local until the retry interval passes


def test_quotas_merge_overrides_over_settings() -> None:
    t = tenancy(tenant_max_tuners=10, tenant_requests_per_s=5.0)
    acme, bolt = t.quota("acme"), t.quota("bolt")
    assert (acme.max_tuners, acme.max_tuner_bytes, acme.requests_per_s) == (3, 1000, 0.1)
    assert (bolt.max_tuners, bolt.max_tuner_bytes, bolt.requests_per_s) == (10, 1000, 5.0)


def test_create_app_refuses_a_bad_tokens_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.json"
    bad.write_text('{"tokens": [{"sha256": "zz", "scope": "admin"}]}')
    with pytest.raises(ValueError, match="tokens file"):
        create_app(Settings(tokens_file=str(bad)))


def test_serve_exits_2_on_a_bad_tokens_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.toml"
    bad.write_text("[[tokens]]\nscope = 'writer'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0"],
        cwd=REPO_ROOT,
        env={"RESTUNE_TOKENS_FILE": str(bad), "RESTUNE_TENANTS_ENABLED": "true", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "tokens file" in proc.stderr

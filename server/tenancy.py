"""Tenants: tuner namespaces, scoped tokens, quotas and per-tenant request rates.

Off by default: every tuner then belongs to one default tenant, reads need no token and
writes need the admin token, as before. With ``tenants_enabled``, tuners are named
``tenant/name`` and every API route needs a bearer token whose scope allows it:

- ``admin``: everything, every tenant;
- ``writer`` of a tenant: read, invoke, register, delete and split traffic of that tenant's
  tuners;
- ``reader`` of a tenant: list, describe and invoke that tenant's tuners;
- ``metrics``: every series of ``/metrics`` (for Prometheus), nothing else. Without it (or
  an admin token) a scrape shows no tuner's series but the caller's own tenant's.

A token of one tenant is refused (403) for another tenant's names before anything is looked
up, so the answer does not say whether the name exists. Tokens are never stored: the tokens
file holds their sha256, and a presented token is hashed and compared in constant time with
every entry. Quotas (tuner count, stored bytes, request rate) apply per tenant; the request
rate is counted per tenant across replicas (:mod:`server.rate_limits`) and charged before
routing (:mod:`server.middleware.rate_limit`). See docs/VERSIONS_AND_TENANTS.md.

Nothing here knows HTTP: failures are :class:`~server.errors.ApiError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.errors import ApiError
from server.rate_limits import Rate, TenantRateLimiter
from server.settings import Settings
from tuners_store import InvalidName, VersionInfo
from tuners_store.names import split_qualified_name, validate_name, validate_qualified_name

DEFAULT_TENANT = "default"
"""The one tenant every tuner belongs to when tenants are off."""
QUOTA_RETRY_AFTER_S = 60.0
"""Retry-After of ``quota_exceeded``: stored tuners only shrink when someone deletes one."""
MAX_TOKEN_CHARS = 4096
"""Longest bearer token looked at (longer ones are refused without hashing megabytes)."""

Scope = Literal["admin", "writer", "reader", "metrics"]


class TokenEntry(BaseModel):
    """One issued token: its sha256 (hex), scope and, for writers and readers, the tenant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    scope: Scope
    tenant: str | None = None
    label: str = Field(default="", max_length=128)
    """Who holds it (shown in logs; never the token)."""

    @field_validator("sha256")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                validate_name(v)
            except InvalidName as exc:
                raise ValueError(f"tenant: {exc.message}") from None
        return v

    @model_validator(mode="after")
    def _scoped(self) -> TokenEntry:
        if self.scope in ("admin", "metrics") and self.tenant is not None:
            raise ValueError(f"a {self.scope} token covers every tenant: leave 'tenant' out")
        if self.scope in ("writer", "reader") and self.tenant is None:
            raise ValueError(f"a {self.scope} token needs the 'tenant' it is scoped to")
        return self


class QuotaOverride(BaseModel):
    """A tenant's own quotas; a field left out keeps the server-wide setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tuners: int | None = Field(default=None, ge=0)
    max_tuner_bytes: int | None = Field(default=None, ge=0)
    requests_per_s: float | None = Field(default=None, ge=0)
    burst: int | None = Field(default=None, ge=0)


class TokensFile(BaseModel):
    """The tokens file: ``tokens`` (hashes and scopes) and per-tenant quota ``tenants``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[TokenEntry] = Field(default_factory=list)
    tenants: dict[str, QuotaOverride] = Field(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, v: dict[str, QuotaOverride]) -> dict[str, QuotaOverride]:
        for name in v:
            try:
                validate_name(name)
            except InvalidName as exc:
                raise ValueError(f"tenants: {exc.message}") from None
        return v


def read_tokens_file(path: str | Path) -> TokensFile:
    """Parse and validate a tokens file (``.toml``, else JSON); ``ValueError`` says what is
    wrong."""
    p = Path(path)
    try:
        text = p.read_text()
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        return TokensFile.model_validate(data)
    except (OSError, ValueError, ValidationError) as exc:
        # ValidationError is a ValueError; the message names the bad field, never a token.
        raise ValueError(f"tokens file {p}: {exc}") from exc


def token_sha256(token: str) -> str:
    """What the tokens file stores for ``token`` (same as ``printf %s TOKEN | sha256sum``)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Quota:
    """A tenant's limits; 0 means no limit."""

    max_tuners: int
    max_tuner_bytes: int
    requests_per_s: float
    burst: int

    @property
    def limits_storage(self) -> bool:
        return bool(self.max_tuners or self.max_tuner_bytes)


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a token's scope and tenant (``None`` for admins)."""

    scope: Literal["admin", "writer", "reader", "metrics", "anonymous"]
    tenant: str | None
    label: str = ""

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


ADMIN = Principal("admin", None, "admin token")
ANONYMOUS = Principal("anonymous", DEFAULT_TENANT)
"""Every caller of a read route when tenants are off."""


class UsageLike(Protocol):
    """Names and stored bytes of a tenant."""

    @property
    def tuners(self) -> int: ...

    @property
    def bytes(self) -> int: ...


class UsageSource(Protocol):
    """What the quota check asks the registry."""

    def known(self, name: str) -> bool: ...

    async def usage(self, prefix: str = "", *, with_bytes: bool = False) -> UsageLike: ...

    async def stored_version(self, name: str, digest: str) -> VersionInfo | None: ...


class Tenancy:
    """Tokens, tenants and quotas of one server, from the settings and the tokens file."""

    def __init__(
        self,
        settings: Settings,
        tokens: TokensFile | None = None,
        *,
        rates: TenantRateLimiter | None = None,
    ) -> None:
        self.enabled = settings.tenants_enabled
        self.rates = rates or TenantRateLimiter(settings.store)
        """Where request rates are counted: the Redis store's, shared by every replica."""
        self._defaults = Quota(
            settings.tenant_max_tuners,
            settings.tenant_max_tuner_bytes,
            settings.tenant_requests_per_s,
            settings.tenant_burst,
        )
        tokens = tokens or TokensFile()
        if not self.enabled:
            scoped = sorted({e.scope for e in tokens.tokens if e.scope in ("writer", "reader")})
            if scoped:
                raise ValueError(
                    f"the tokens file has {'/'.join(scoped)} tokens, which only mean something "
                    "with tenants on: set RESTUNE_TENANTS_ENABLED=true"
                )
        entries = [(e.sha256, Principal(e.scope, e.tenant, e.label)) for e in tokens.tokens]
        admin_token = settings.admin_token.get_secret_value() if settings.admin_token else ""
        if admin_token:
            entries.append((token_sha256(admin_token), ADMIN))
        self._entries = tuple((bytes.fromhex(digest), who) for digest, who in entries)
        self._overrides = dict(tokens.tenants)
        self._upload_locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Tenancy:
        """Read ``settings.tokens_file`` (if any); ``ValueError`` for a bad file."""
        tokens = read_tokens_file(settings.tokens_file) if settings.tokens_file else None
        return cls(settings, tokens)

    # ------------------------------------------------------------------ tokens

    @property
    def issues_tokens(self) -> bool:
        """Whether any token can be accepted (else every mutating route is refused)."""
        return bool(self._entries)

    def authenticate(self, presented: str) -> Principal | None:
        """The principal of a bearer token, or ``None`` if no such token was issued.

        The token's sha256 is compared with every entry in constant time (no early exit),
        so the time taken says nothing about which entry, if any, is close.
        """
        if not presented or len(presented) > MAX_TOKEN_CHARS:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found: Principal | None = None
        for stored, who in self._entries:
            if hmac.compare_digest(stored, digest) and found is None:
                found = who
        return found

    # ------------------------------------------------------------------ names

    def tenant_of(self, name: str) -> str:
        """The tenant owning a (valid) tuner name."""
        if not self.enabled:
            return DEFAULT_TENANT
        tenant, _ = split_qualified_name(name)
        return tenant or DEFAULT_TENANT

    def prefix_of(self, tenant: str) -> str:
        """Registry prefix of a tenant's names (every name when tenants are off)."""
        return f"{tenant}/" if self.enabled else ""

    def _qualified(self, name: str) -> str:
        """``tenant`` of ``name``; refuses names outside the naming scheme."""
        try:
            validate_qualified_name(name)
        except InvalidName as exc:
            raise ApiError(exc.code, exc.message, task=name) from None
        tenant, _ = split_qualified_name(name)
        if tenant is None:
            raise ApiError(
                "invalid_name",
                f"tuner {name!r} has no tenant: with tenants on, name tuners tenant/name",
                task=name,
            )
        return tenant

    def check_read(self, principal: Principal, name: str) -> None:
        """Refuse (403) reading or invoking ``name`` with ``principal``'s token."""
        if not self.enabled:
            return
        tenant = self._qualified(name)
        if not principal.is_admin and tenant != principal.tenant:
            raise ApiError(
                "forbidden",
                f"a token of tenant {principal.tenant!r} cannot use tenant {tenant!r}'s tuners",
                task=name,
            )

    def check_write(self, principal: Principal, name: str) -> None:
        """Refuse (403) registering, deleting or re-routing ``name`` with ``principal``."""
        if principal.is_admin:
            self.check_read(principal, name)
            return
        if principal.scope != "writer":
            raise ApiError("forbidden", "this token may read, not change tuners", task=name)
        self.check_read(principal, name)

    def visible(self, principal: Principal, name: str) -> bool:
        """Whether a listing for ``principal`` shows ``name``."""
        if not self.enabled or principal.is_admin:
            return True
        tenant, _ = split_qualified_name(name)
        return tenant == principal.tenant

    # ------------------------------------------------------------------ quotas

    def quota(self, tenant: str) -> Quota:
        """A tenant's quotas: its overrides over the server-wide settings."""
        override = self._overrides.get(tenant)
        d = self._defaults
        if override is None:
            return d
        return Quota(
            d.max_tuners if override.max_tuners is None else override.max_tuners,
            d.max_tuner_bytes if override.max_tuner_bytes is None else override.max_tuner_bytes,
            d.requests_per_s if override.requests_per_s is None else override.requests_per_s,
            d.burst if override.burst is None else override.burst,
        )

    @property
    def limits_rates(self) -> bool:
        """Whether any tenant has a request rate (else nothing needs charging)."""
        return self._defaults.requests_per_s > 0 or any(
            o.requests_per_s for o in self._overrides.values()
        )

    def rate_principal(self, token: str | None) -> Principal | None:
        """Whose bucket a request with bearer ``token`` is charged to; ``None``: nobody's
        (an admin; or, tenants on, no valid token, which the route refuses anyway)."""
        principal = self.authenticate(token) if token else None
        if principal is not None and principal.is_admin:
            return None
        if not self.enabled:
            return ANONYMOUS
        return principal

    async def charge(self, principal: Principal) -> None:
        """Count one request against the principal's tenant rate (on every replica alike);
        429 ``rate_limited`` with Retry-After when it is spent. Admins are not limited."""
        if principal.tenant is None:
            return
        quota = self.quota(principal.tenant)
        if quota.requests_per_s <= 0:
            return
        verdict = await self.rates.charge(principal.tenant, Rate(quota.requests_per_s, quota.burst))
        if not verdict.allowed:
            raise ApiError(
                "rate_limited",
                f"tenant {principal.tenant!r} is over its rate of {quota.requests_per_s:g} "
                "requests/s",
                retry_after=verdict.retry_after_s,
                tenant=principal.tenant,
            )

    @contextlib.asynccontextmanager
    async def upload_slot(self, tenant: str) -> AsyncIterator[None]:
        """Serialise a tenant's uploads while it has storage quotas, so two concurrent ones
        cannot both pass the check (on this replica)."""
        if not self.quota(tenant).limits_storage:
            yield
            return
        lock = self._upload_locks.get(tenant)
        if lock is None:
            lock = self._upload_locks[tenant] = asyncio.Lock()
        async with lock:
            yield

    async def check_upload(
        self, tenant: str, name: str, data: bytes, digest: str, registry: UsageSource
    ) -> None:
        """429 ``quota_exceeded`` if storing ``data`` as ``name`` would take the tenant past
        its tuner count or stored bytes. Identical bytes already stored add nothing."""
        quota = self.quota(tenant)
        if not quota.limits_storage:
            return
        try:
            validate_qualified_name(name)
        except InvalidName as exc:
            raise ApiError(exc.code, exc.message, task=name) from None
        if await registry.stored_version(name, digest) is not None:
            return
        usage = await registry.usage(self.prefix_of(tenant), with_bytes=quota.max_tuner_bytes > 0)
        if quota.max_tuners and not registry.known(name) and usage.tuners >= quota.max_tuners:
            raise ApiError(
                "quota_exceeded",
                f"tenant {tenant!r} has {usage.tuners} tuners, its quota; delete one first",
                retry_after=QUOTA_RETRY_AFTER_S,
                tenant=tenant,
                limit=quota.max_tuners,
            )
        if quota.max_tuner_bytes and usage.bytes + len(data) > quota.max_tuner_bytes:
            raise ApiError(
                "quota_exceeded",
                f"tenant {tenant!r} stores {usage.bytes} bytes of tuners; {len(data)} more "
                f"would pass its quota of {quota.max_tuner_bytes}",
                retry_after=QUOTA_RETRY_AFTER_S,
                tenant=tenant,
                limit=quota.max_tuner_bytes,
            )

"""Who is calling the API: an admin key (`ESTAFETA_ADMIN_KEY`) or a tenant's API key.

Keys travel as `Authorization: Bearer <key>`; the store keeps only the SHA-256 of each key
(keys are 32 random bytes, so a plain hash is enough: there is nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from starlette.requests import Request

from estafeta.errors import HttpError
from estafeta.store.sqlstore import SqlStore

KEY_PREFIX = "est_"
_CACHE_TTL_S = 10.0  # a revoked key stops working within this long


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str | None  # None: the admin, who sees every tenant
    admin: bool

    @property
    def actor(self) -> str:
        return "admin" if self.admin else f"tenant:{self.tenant_id}"

    def scope(self, requested_tenant: str | None = None) -> str | None:
        """The tenant a query must be limited to; a tenant can never name another."""
        if self.admin:
            return requested_tenant
        if requested_tenant is not None and requested_tenant != self.tenant_id:
            raise HttpError(403, "forbidden", "this key cannot access another tenant's data")
        return self.tenant_id


class Authenticator:
    """Finds the caller of a request by its key; a tenant key's tenant is cached for
    `_CACHE_TTL_S` (one lookup per key and interval, not per request), so a revoked key is
    refused at the latest that long after `estafeta keys revoke`.

    A key counts only for a tenant of the running configuration (`tenants`): the store keeps
    a tenant taken out of the file, with its keys, but that business's key no longer works."""

    def __init__(
        self,
        store: SqlStore,
        admin_key: str | None,
        *,
        tenants: Collection[str] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._admin_key = admin_key.encode() if admin_key else None
        self._tenants = None if tenants is None else frozenset(tenants)
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._monotonic = monotonic

    async def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        if not header:
            raise HttpError(401, "missing_credentials", "send Authorization: Bearer <api key>")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise HttpError(401, "invalid_credentials", "use Authorization: Bearer <api key>")
        if self._admin_key is not None and hmac.compare_digest(key.encode(), self._admin_key):
            return Principal(tenant_id=None, admin=True)
        tenant_id = await self._tenant_for(hash_key(key))
        if tenant_id is None or (self._tenants is not None and tenant_id not in self._tenants):
            raise HttpError(
                401,
                "invalid_api_key",
                "the API key is unknown or revoked, or its tenant is no longer configured",
            )
        return Principal(tenant_id=tenant_id, admin=False)

    async def _tenant_for(self, key_hash: str) -> str | None:
        now = self._monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[1] > now:
            return cached[0]
        tenant_id = await self._store.tenant_for_key(key_hash)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key_hash] = (tenant_id, now + _CACHE_TTL_S)
        return tenant_id

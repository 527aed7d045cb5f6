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

from estafeta.bearer import CHALLENGE, INVALID_KEY_CHALLENGE, bearer_key
from estafeta.errors import HttpError, StoreError
from estafeta.store.sqlstore import SqlStore

KEY_PREFIX = "est_"
_CACHE_TTL_S = 10.0  # a revoked key stops working within this long


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def needs_key(path: str) -> bool:
    """Whether a path's every method takes a key (the API and the detailed health check)."""
    return path.startswith("/api/") or path == "/health/detailed"


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
    refused at the latest that long after `estafeta keys revoke`. An unknown key is
    remembered as long, apart from the good ones.

    A key counts only for a tenant of the running configuration (`tenants`): the store keeps
    a tenant taken out of the file, with its keys, but that business's key no longer works."""

    def __init__(
        self,
        store: SqlStore,
        admin_key: str | None,
        *,
        tenants: Collection[str] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        unknown_limit: int = 10_000,
    ) -> None:
        self._store = store
        self._admin_key = admin_key.encode() if admin_key else None
        self._tenants = None if tenants is None else frozenset(tenants)
        # Two caches, so that a flood of made-up keys cannot push out the good ones: known
        # keys are as few as the keys an admin made; unknown ones are bounded by emptying.
        self._known: dict[str, tuple[str, float]] = {}  # key hash -> (tenant, good until)
        self._unknown: dict[str, float] = {}  # key hash -> refused without a lookup until
        self._unknown_limit = unknown_limit
        self._monotonic = monotonic

    async def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        if not header:
            raise HttpError(
                401, "missing_credentials", "send Authorization: Bearer <api key>", CHALLENGE
            )
        key = bearer_key(header)
        if key is None:
            raise HttpError(
                401, "invalid_credentials", "use Authorization: Bearer <api key>", CHALLENGE
            )
        if self._admin_key is not None and hmac.compare_digest(key.encode(), self._admin_key):
            return Principal(tenant_id=None, admin=True)
        tenant_id = await self._tenant_for(hash_key(key))
        if tenant_id is None or (self._tenants is not None and tenant_id not in self._tenants):
            raise HttpError(
                401,
                "invalid_api_key",
                "the API key is unknown or revoked, or its tenant is no longer configured",
                INVALID_KEY_CHALLENGE,
            )
        return Principal(tenant_id=tenant_id, admin=False)

    async def refusal(self, request: Request) -> HttpError | None:
        """Why `request`'s caller is refused (no key, not a Bearer key, an unknown or revoked
        one), if it is: a request without a usable key is answered 401 whatever else is
        wrong with it (its body, its content type, its query). None when the key is usable,
        or cannot be checked now (the store unreachable, or refusing the read: the other
        refusal stands)."""
        if not needs_key(request.url.path):
            return None
        try:
            await self.principal(request)
        except HttpError as refused:
            return refused
        except StoreError:
            return None
        return None

    async def _tenant_for(self, key_hash: str) -> str | None:
        now = self._monotonic()
        known = self._known.get(key_hash)
        if known is not None and known[1] > now:
            return known[0]
        if self._unknown.get(key_hash, 0.0) > now:
            return None
        tenant_id = await self._store.tenant_for_key(key_hash)
        good_until = now + _CACHE_TTL_S
        if tenant_id is None:
            self._known.pop(key_hash, None)  # revoked: forgotten, so `_known` stays small
            if len(self._unknown) >= self._unknown_limit:
                self._unknown.clear()
            self._unknown[key_hash] = good_until
        else:
            self._known[key_hash] = (tenant_id, good_until)
        return tenant_id

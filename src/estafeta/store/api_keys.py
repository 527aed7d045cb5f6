"""Tenants' API keys: create, list, revoke, and find the tenant of a key.

The store keeps a key's SHA-256 (api/auth.py), never the key; nothing here returns the hash
either. Creating and revoking are written to the audit log (`keys.create`, `keys.revoke`)
in the same transaction. A revoked key stays listed, with when it was revoked.
"""

from __future__ import annotations

from sqlalchemy import and_, select, update

from estafeta.ids import new_id
from estafeta.store import schema as s
from estafeta.store.audit import audit
from estafeta.store.base import StoreBase
from estafeta.store.records import ApiKeyView

_VIEW_COLUMNS = (
    s.api_keys.c.id,
    s.api_keys.c.tenant_id,
    s.api_keys.c.label,
    s.api_keys.c.created_at,
    s.api_keys.c.revoked_at,
)


class ApiKeyOps(StoreBase):
    async def create_api_key(
        self,
        *,
        tenant_id: str,
        key_hash: str,
        label: str,
        actor: str,
        now_ms: int,
        key_id: str | None = None,
    ) -> str:
        """A new key of `tenant_id` (its hash is what is stored); its id, `key_id` when
        given (a caller that must find the key even when this call is interrupted after
        its commit, as `keys create` does, chooses the id first)."""
        key_id = key_id or new_id("key", now_ms)
        async with self._write() as conn:
            await conn.execute(
                s.api_keys.insert().values(
                    id=key_id,
                    tenant_id=tenant_id,
                    key_hash=key_hash,
                    label=label,
                    created_at=now_ms,
                )
            )
            await audit(
                conn,
                tenant_id=tenant_id,
                actor=actor,
                action="keys.create",
                detail={"key": key_id},
                now_ms=now_ms,
            )
        return key_id

    async def list_api_keys(self, tenant_id: str | None = None) -> list[ApiKeyView]:
        """Every key (of `tenant_id` when given), revoked ones too, oldest first."""
        k = s.api_keys
        query = select(*_VIEW_COLUMNS).order_by(k.c.created_at, k.c.id)
        if tenant_id is not None:
            query = query.where(k.c.tenant_id == tenant_id)
        async with self._read() as conn:
            return [ApiKeyView(*row) for row in await conn.execute(query)]

    async def revoke_api_key(
        self, key_id: str, *, actor: str, now_ms: int
    ) -> tuple[ApiKeyView, bool] | None:
        """Revoke a key: the key as it is now, and whether this call revoked it (False: it
        was revoked before, and keeps that time). None when no key has that id."""
        k = s.api_keys
        async with self._write() as conn:
            revoked = await conn.execute(
                update(k)
                .where(and_(k.c.id == key_id, k.c.revoked_at.is_(None)))
                .values(revoked_at=now_ms)
            )
            row = (await conn.execute(select(*_VIEW_COLUMNS).where(k.c.id == key_id))).first()
            if row is None:
                return None
            view = ApiKeyView(*row)
            if revoked.rowcount:
                await audit(
                    conn,
                    tenant_id=view.tenant_id,
                    actor=actor,
                    action="keys.revoke",
                    detail={"key": key_id},
                    now_ms=now_ms,
                )
        return view, bool(revoked.rowcount)

    async def tenant_for_key(self, key_hash: str) -> str | None:
        """The tenant owning an unrevoked key with this hash, or None."""
        k = s.api_keys
        query = select(k.c.tenant_id).where(
            and_(k.c.key_hash == key_hash, k.c.revoked_at.is_(None))
        )
        async with self._read() as conn:
            return (await conn.execute(query)).scalar()

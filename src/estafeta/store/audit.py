"""The audit log: who did what to the hub's data, written in the transaction that did it.

Actors are `admin`, `tenant:<id>` (the HTTP API) and `cli:<user>` (the command line); an
action is named `<what>.<verb>` (`dlq.replay`, `keys.revoke`); its detail is a small JSON
object of ids and counts, never a secret or a payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from estafeta.ids import new_id
from estafeta.store import schema as s


async def audit(
    conn: AsyncConnection,
    *,
    tenant_id: str | None,
    actor: str,
    action: str,
    detail: Mapping[str, Any],
    now_ms: int,
) -> None:
    """One audit row, in `conn`'s transaction (so it exists exactly when the action does)."""
    await conn.execute(
        s.audit_log.insert().values(
            id=new_id("aud", now_ms),
            tenant_id=tenant_id,
            at=now_ms,
            actor=actor,
            action=action,
            detail=orjson.dumps(detail).decode(),
        )
    )

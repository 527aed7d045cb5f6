"""The store's circuits: the circuit breakers' state shared by worker processes when no Redis
is configured (delivery/circuit_store.py names the three places circuits can live).

The store keeps each destination's circuit as the breaker's own JSON form and knows nothing of
what it means; an update is a read-modify-write under a row lock, so processes that update one
circuit at once take turns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from sqlalchemy import select, update

from estafeta.store import schema as s
from estafeta.store.base import StoreBase


class CircuitOps(StoreBase):
    async def circuit_states(self) -> dict[str, dict[str, Any]]:
        """Every stored circuit, by destination id (the breaker's own JSON form)."""
        async with self._read() as conn:
            rows = (
                await conn.execute(select(s.circuits.c.destination_id, s.circuits.c.data))
            ).all()
        return {destination_id: orjson.loads(data) for destination_id, data in rows}

    async def update_circuit(
        self,
        destination_id: str,
        change: Callable[[dict[str, Any] | None], dict[str, Any]],
        now_ms: int,
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Read-modify-write one circuit atomically across processes; (before, after).

        The row is locked for the transaction (FOR UPDATE on PostgreSQL; SQLite's write
        lock is already held since BEGIN IMMEDIATE), so concurrent updates serialise.
        """
        c = s.circuits
        async with self._write() as conn:
            # Make sure the row exists first: FOR UPDATE locks rows, and a missing row is no
            # lock at all, so two first updates would both read "nothing" and one be lost.
            placeholder = self._insert(c).values(
                destination_id=destination_id, data="null", updated_at=now_ms
            )
            await conn.execute(
                placeholder.on_conflict_do_nothing(index_elements=["destination_id"])
            )
            found = (
                await conn.execute(
                    select(c.c.data).where(c.c.destination_id == destination_id).with_for_update()
                )
            ).scalar_one()
            before = orjson.loads(found)
            after = change(before)
            await conn.execute(
                update(c)
                .where(c.c.destination_id == destination_id)
                .values(data=orjson.dumps(after).decode(), updated_at=now_ms)
            )
        return before, after

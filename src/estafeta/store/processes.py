"""The store's processes: which running process's configuration names which destinations.

Every process that holds a configuration records here, at start and every few seconds, the
destinations its configuration names (delivery/presence.py); a worker asks which
destinations some live process names before it dead-letters deliveries to one it does not
know itself (delivery/rescue.py). One row per process, a handful of rows in all: rows not
seen for a long while are forgotten as processes announce themselves.
"""

from __future__ import annotations

from collections.abc import Collection

import orjson
from sqlalchemy import delete, func, or_, select, update

from estafeta.store import schema as s
from estafeta.store.base import StoreBase
from estafeta.store.records import ProcessView


class ProcessOps(StoreBase):
    async def announce_process(
        self,
        process_id: str,
        destinations: Collection[str],
        *,
        delivers: bool,
        delivering: bool,
        started_ms: int,
        now_ms: int,
        forget_before_ms: int,
    ) -> None:
        """Record that the process runs now, its configuration naming `destinations`, whether
        it `delivers`, and, when it is `delivering` (its delivery task ran steadily since its
        last announcement), that it delivers now; forget the rows of processes not seen since
        `forget_before_ms` (they died long ago)."""
        p = s.processes
        row = {
            "id": process_id,
            "destinations": orjson.dumps(sorted(destinations)).decode(),
            "delivers": delivers,
            "started_at": started_ms,
            "seen_at": now_ms,
            "stopped_at": None,
            "delivering_at": now_ms if delivering else None,
        }
        stmt = self._insert(p).values(**row)
        stmt = stmt.on_conflict_do_update(
            index_elements=["id"],
            # stopped_at too: a process recorded as stopped that announces again runs after
            # all, and counts as running again.
            set_={
                "destinations": stmt.excluded.destinations,
                "delivers": stmt.excluded.delivers,
                "seen_at": stmt.excluded.seen_at,
                "stopped_at": None,
                # Kept while its delivery task is down: when it last delivered.
                "delivering_at": func.coalesce(stmt.excluded.delivering_at, p.c.delivering_at),
            },
        )
        async with self._write() as conn:
            await conn.execute(stmt)
            await conn.execute(delete(p).where(p.c.seen_at < forget_before_ms))

    async def retire_process(self, process_id: str, now_ms: int, *, delivering: bool) -> None:
        """The process stops: it names its destinations no more (see `live_destinations`);
        `delivering` when its delivery task ran steadily until now."""
        p = s.processes
        values: dict[str, int] = {"seen_at": now_ms, "stopped_at": now_ms}
        if delivering:
            values["delivering_at"] = now_ms
        async with self._write() as conn:
            await conn.execute(update(p).where(p.c.id == process_id).values(**values))

    async def live_processes(self, *, seen_since_ms: int) -> list[ProcessView]:
        """The processes seen since `seen_since_ms` and not stopped, oldest first: during a
        rolling change, those whose destinations differ run different files."""
        p = s.processes
        query = (
            select(
                p.c.id,
                p.c.started_at,
                p.c.seen_at,
                p.c.destinations,
                p.c.delivers,
                p.c.delivering_at,
            )
            .where(p.c.seen_at >= seen_since_ms, p.c.stopped_at.is_(None))
            .order_by(p.c.started_at, p.c.id)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            ProcessView(
                id=i,
                started_at=started,
                seen_at=seen,
                destinations=orjson.loads(names),
                delivers=bool(delivers),
                delivering_at=delivering,
            )
            for i, started, seen, names, delivers, delivering in rows
        ]

    async def seen_processes(self, ids: Collection[str], *, seen_since_ms: int) -> set[str]:
        """Those of `ids` that recorded themselves here since `seen_since_ms`, stopped or not:
        the processes of this store among those using its Redis key prefix (redis_prefix.py)."""
        if not ids:
            return set()
        p = s.processes
        query = select(p.c.id).where(p.c.id.in_(sorted(ids)), p.c.seen_at >= seen_since_ms)
        async with self._read() as conn:
            return set((await conn.execute(query)).scalars().all())

    async def last_delivering_at(self) -> int | None:
        """When a process was last known to deliver (Unix ms): the newest announcement, or
        graceful stop, of one whose delivery task had run steadily since its previous one;
        None when the store remembers none (rows are forgotten ten minutes after their last
        sign)."""
        p = s.processes
        query = select(func.max(p.c.delivering_at))
        async with self._read() as conn:
            last = (await conn.execute(query)).scalar()
        return None if last is None else int(last)

    async def live_destinations(self, *, seen_since_ms: int, started_ms: int) -> set[str]:
        """Every destination named by a process seen since `seen_since_ms`, unless it has
        stopped before `started_ms` (the asking process's start).

        A process that stopped gracefully still counts for processes started before it
        stopped, until it is older than `seen_since_ms`: they cannot tell it from the one
        process already on a newer file being restarted. A process started after it stopped
        was started on its successor's file, which is then the newest: a destination that
        file lacks was removed (a single process restarted without it dead-letters its
        deliveries at once, as before processes were recorded).
        """
        p = s.processes
        query = select(p.c.destinations).where(
            p.c.seen_at >= seen_since_ms,
            or_(p.c.stopped_at.is_(None), p.c.stopped_at > started_ms),
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).scalars().all()
        return {destination for names in rows for destination in orjson.loads(names)}

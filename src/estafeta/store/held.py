"""Connections kept checked out of the pool for the hot statements.

Checking a connection out of SQLAlchemy's pool and back costs a round trip (the pool resets
the connection on return) and ~120 µs of CPU: measured here, a checkout and `SELECT 1` took
165–196 µs of CPU against 44–54 µs on a connection kept out, more than the ingest statement
itself costs the server for a small batch. The hot statements run alone outside any
transaction and leave no session state behind, so a connection can go from one to the next
without a reset: these stay checked out, idle ones on a free list.

A connection found closed (the server restarted, the network was cut), or idle long enough
for the server to end it (store/idle_limit.py), is replaced before use. One whose statement
failed because the database cannot be reached is invalidated and never reused, and the
caller gets `StoreUnavailable`, as from any other store path.

A set may give its sessions planner settings of their own (`planner`), applied when a session
joins the set and undone when another set or the pool's other users take it back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from estafeta.errors import StoreDeadlocked, StoreUnavailable
from estafeta.store.base import deadlocked, store_errors, unavailable
from estafeta.store.idle_limit import nearly_ended, went_idle

# The planner settings a session was given by a set (the connection's `info`).
_PLANNER = "estafeta.planner"

Settings = tuple[tuple[str, str], ...]


class HeldConnections:
    def __init__(self, engine: AsyncEngine, *, keep: int, planner: Settings = ()) -> None:
        self._engine = engine
        self._keep = keep  # idle connections kept; more are made when needed, then returned
        self._planner = planner
        self._idle: list[AsyncConnection] = []
        self._closed = False

    @asynccontextmanager
    async def driver(self) -> AsyncIterator[Any]:
        """An asyncpg connection, outside any transaction: each statement commits alone."""
        with store_errors():
            conn = self._idle.pop() if self._idle else await self._engine.connect()
            reusable = False
            try:
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                if driver is None or driver.is_closed() or nearly_ended(raw.info):
                    await conn.invalidate()
                    raw = await conn.get_raw_connection()
                    driver = raw.driver_connection
                given: Settings = raw.info.get(_PLANNER, ())
                if given != self._planner:  # a session changing hands: seldom
                    await driver.execute(_planner_change(given, self._planner))
                    raw.info[_PLANNER] = self._planner
                try:
                    yield driver
                except Exception as exc:
                    if driver.is_closed() or unavailable(exc):
                        await conn.invalidate()
                        # Not chained: the driver's text may quote the data (store/base.py).
                        failed = StoreDeadlocked if deadlocked(exc) else StoreUnavailable
                        raise failed(f"the store cannot be reached: {type(exc).__name__}") from None
                    reusable = True  # the statement failed for its data; the line is fine
                    raise
                reusable = True
            finally:
                # Not reusable when cancelled mid-statement (or failed before the statement).
                if reusable:
                    went_idle(raw.info)
                await self._release(conn, reusable=reusable)

    async def _release(self, conn: AsyncConnection, *, reusable: bool) -> None:
        if not reusable and not conn.invalidated:
            await conn.invalidate()  # its state is unknown: never back into the pool either
        if conn.invalidated or self._closed or len(self._idle) >= self._keep:
            await conn.close()
        else:
            self._idle.append(conn)

    async def close(self) -> None:
        """Return every idle connection to the pool; those in use are returned as they end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


def _planner_change(given: Settings, wanted: Settings) -> str:
    """The statements that take a session from the settings `given` to those `wanted`."""
    wanted_names = {name for name, _ in wanted}
    resets = [f"RESET {name}" for name, _ in given if name not in wanted_names]
    sets = [f"SET {name} = {value}" for name, value in wanted]
    return "; ".join(resets + sets)

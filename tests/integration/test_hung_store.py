"""A store that hangs (a stopped database, a network that drops packets: connections stay
open and nothing answers) is, for ingest, a store that cannot be reached: webhooks are
spooled and answered within a bound that providers wait for, not after the driver's 30 s."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from estafeta.config import load_config_dict
from estafeta.errors import StoreUnavailable
from estafeta.hub import Hub
from estafeta.ingress.spool import Spool
from estafeta.store import open_store
from estafeta.store.sqlstore import SqlStore
from tests.chaos.conftest import TcpProxy
from tests.conftest import base_config


@pytest.mark.postgres
async def test_webhooks_are_spooled_within_a_bound_while_the_store_hangs(
    proxied_hub: tuple[Hub, TcpProxy],
) -> None:
    hub, proxy = proxied_hub
    assert hub.spool is not None
    bound = hub.config.storage.spool_after_s
    assert bound == 5  # the default
    assert await timed_accept(hub, 0) < bound  # stored: the store answers
    proxy.freeze()  # the database stops answering; its connections stay open
    # Three waves of concurrent webhooks, the last after the 1 s of spooling straight away
    # that follows a failure (hub.STORE_RETRY_S), so it tries the hung store again.
    waits: list[float] = []
    for wave in range(3):
        numbers = range(1 + wave * 20, 21 + wave * 20)
        waits += await asyncio.gather(*(timed_accept(hub, n, spooled=True) for n in numbers))
        await asyncio.sleep(0.6)
    # Before: each waited for the driver's 30 s statement timeout (32 s measured), past
    # the 15 s after which Twilio hangs up.
    assert max(waits) < bound + 1.5, sorted(waits)[-3:]

    # Back: the statements that hung may commit after all; the spool's copies of those are
    # duplicates by event id. Each webhook is one event, once.
    proxy.thaw()
    deadline = time.monotonic() + 30
    while hub.spool.stats().segments:
        assert time.monotonic() < deadline, "the spool never drained"
        with contextlib.suppress(StoreUnavailable):  # the pool may still hold hung lines
            await hub.spool.drain(hub.store)
        await asyncio.sleep(0.1)
    rows = await query(hub.store, "SELECT idempotency_key FROM events")
    assert sorted(str(key) for (key,) in rows) == sorted(f"k{n}" for n in range(61))


async def timed_accept(hub: Hub, n: int, *, spooled: bool = False) -> float:
    started = time.monotonic()
    result = await hub.accept(
        tenant_id="clinica-sol",
        source_id="crm-events",
        event_type="message.received",
        data={"n": n},
        idempotency_key=f"k{n}",
    )
    assert result.spooled is spooled
    return time.monotonic() - started


async def query(store: SqlStore, sql: str) -> list[tuple[object, ...]]:
    async with store.engine.connect() as conn:
        return [tuple(row) for row in (await conn.execute(text(sql))).all()]


async def test_webhooks_are_spooled_within_a_bound_while_sqlite_is_locked(
    tmp_path: Path,
) -> None:
    # The embedded default's way of hanging: another process holds the write lock (an
    # operator's `sqlite3` shell left in a transaction), and SQLite waits out its 30 s busy
    # timeout before it says "database is locked". This deployment waits 1 s, not 5.
    data = base_config(f"sqlite:///{tmp_path / 'estafeta.db'}")
    data["storage"]["spool_after_s"] = 1
    config = load_config_dict(data)
    store = open_store(config.storage.url)
    await store.migrate()
    await store.sync_config(config, 1_700_000_000_000)
    hub = Hub(config, store, spool=Spool(tmp_path / "spool", max_bytes=1 << 20))
    holder = sqlite3.connect(tmp_path / "estafeta.db", isolation_level=None)
    try:
        assert await timed_accept(hub, 0) < 1
        holder.execute("BEGIN IMMEDIATE")
        waits = await asyncio.gather(*(timed_accept(hub, n, spooled=True) for n in range(1, 11)))
        assert max(waits) < 1 + 1.5, sorted(waits)[-3:]
        holder.execute("ROLLBACK")
        assert hub.spool is not None
        await hub.spool.drain(store)  # the writer's late commit and the spool: once each
        rows = await query(store, "SELECT idempotency_key FROM events")
        assert sorted(str(key) for (key,) in rows) == sorted(f"k{n}" for n in range(11))
    finally:
        holder.close()
        await hub.close()
        await store.close()


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_webhooks_are_spooled_once_the_sqlite_file_is_removed_or_replaced(
    tmp_path: Path, how: str
) -> None:
    # SQLite goes on writing to a file that lost its name (deleted, or a restored copy moved
    # over it while the hub runs): every event acknowledged after that would be gone at the
    # next start. The store must refuse such writes as unreachable, so that ingest spools.
    path = tmp_path / "estafeta.db"
    config = load_config_dict(base_config(f"sqlite:///{path}"))
    store = open_store(config.storage.url)
    await store.migrate()
    await store.sync_config(config, 1_700_000_000_000)
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    hub = Hub(config, store, spool=spool)
    try:
        assert await timed_accept(hub, 0) >= 0  # stored in the file as it was opened
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"estafeta.db{suffix}").unlink(missing_ok=True)
        if how == "replaced":
            restored = open_store(f"sqlite:///{tmp_path / 'restored.db'}")
            await restored.migrate()
            await restored.sync_config(config, 1_700_000_000_000)
            await restored.close()
            (tmp_path / "restored.db").rename(path)
        await timed_accept(hub, 1, spooled=True)
        with pytest.raises(StoreUnavailable):
            await store.ping()  # /health/detailed says the store is down
        with pytest.raises(StoreUnavailable):
            await store.pending_destinations()
    finally:
        await hub.close()
        await store.close()

    # Started again on the file the path names now, the spool hands it what it accepted.
    restarted = open_store(config.storage.url)
    try:
        await restarted.migrate()
        await restarted.sync_config(config, 1_700_000_000_000)
        await spool.drain(restarted)
        rows = await query(restarted, "SELECT idempotency_key FROM events")
        assert [str(key) for (key,) in rows] == ["k1"]
    finally:
        await restarted.close()

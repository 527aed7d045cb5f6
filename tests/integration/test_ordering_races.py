"""One delivery of an ordering key in flight at a time, even when two leases race.

The lease statement sees the store as it was when the statement began (PostgreSQL, READ
COMMITTED), so two workers leasing at once could each take a different delivery of one key
as its head: one took the head it saw while another process stored (or a DLQ replay put
back) an earlier delivery of the key that the other worker then took too. A unique index on
the key's in-flight deliveries makes the second lease wait for the first and then take
nothing; these tests hold the first lease's transaction open to make the race certain.

On SQLite one writer leases at a time, so the race cannot happen there; the migration that
creates the index runs on both engines.

Within one `serve` the same race starts earlier, at ingest: PostgreSQL commits several group
commit batches at once, and a batch holding a key's later event must not commit while the
one holding its earlier event is still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy import column, select, table, text
from sqlalchemy.exc import IntegrityError
from structlog.testing import capture_logs

from estafeta.config import load_config_dict
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.state import DeliveryState
from estafeta.delivery.worker import Worker
from estafeta.errors import LeaseRaced
from estafeta.hub import Hub
from estafeta.observability.metrics import REGISTRY, render_this_process
from estafeta.store import open_store
from estafeta.store.migrate import upgrade
from estafeta.store.postgres import Statement
from estafeta.store.records import DeadLetterFilter
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.sink import Sink
from tests.conftest import base_config, empty_database
from tests.integration.store_support import NOW, attempt, keyed
from tests.integration.test_worker import config_for

ON_POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)

T = TypeVar("T")


async def lease(store: SqlStore, worker: str) -> list[LeasedDelivery]:
    return await store.lease(
        now_ms=NOW, rooms={"crm": 10}, lease_ms=30_000, worker_id=worker, limit=10
    )


class HeldLease:
    """Worker A's lease statement, run inside a transaction that stays open until `commit`:
    the moment between a lease choosing its rows and committing them, made as long as the
    test needs."""

    def __init__(self, store: SqlStore, database_url: str) -> None:
        self.store, self.database_url = store, database_url
        self.conn: Any = None
        self.pid = 0

    async def take(self, now: int = NOW) -> list[str]:
        self.conn = await asyncpg.connect(self.database_url)
        self.pid = await self.conn.fetchval("SELECT pg_backend_pid()")
        await self.conn.execute("BEGIN")
        statement = Statement(self.store.lease_sql)
        params = {
            "now": now,
            "token": "held-lease",
            "deadline": now + 30_000,
            "worker": "worker-a",
            "limit": 10,
            "destinations": ["crm"],
            "rooms": [10],
            "sending": [0],
        }
        rows = await self.conn.fetch(statement.positional, *statement.args(params))
        return [row["id"] for row in rows]

    async def commit(self) -> None:
        await self.conn.execute("COMMIT")
        await self.conn.close()


async def lease_while_held(store: SqlStore, held: HeldLease) -> list[LeasedDelivery]:
    """Worker B leases while A's lease is open. What B's lease returned or raised."""
    return await while_held(held, lease(store, "worker-b"))


async def while_held(held: HeldLease, work: Awaitable[T]) -> T:
    """Runs `work` while A's lease is open; A commits once `work` is waiting for it (or is
    done: before the index, nothing made a second lease wait). What `work` returned or
    raised."""
    other = asyncio.ensure_future(work)
    deadline = time.monotonic() + 10
    while not other.done() and not await waits_for_a_lock(held):
        assert time.monotonic() < deadline, "worker B neither leased nor waited"
        await asyncio.sleep(0.01)
    await held.commit()
    return await asyncio.wait_for(other, timeout=10)


async def waits_for_a_lock(held: HeldLease) -> bool:
    waiting: int = await held.conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> $1 AND wait_event_type = 'Lock'",
        held.pid,
    )
    return waiting > 0


async def in_flight_by_key(store: SqlStore) -> dict[str, list[str]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT ordering_key, id FROM deliveries"
                " WHERE state = 'in_flight' ORDER BY ordering_key, id"
            )
        )
        found: dict[str, list[str]] = {}
        for key, delivery_id in rows:
            found.setdefault(key, []).append(delivery_id)
        return found


@ON_POSTGRESQL
async def test_an_earlier_delivery_stored_during_a_lease_is_not_sent_beside_the_later_one(
    store: SqlStore, database_url: str
) -> None:
    """Two ingest processes store maria's messages; the earlier id commits last, while
    worker A is leasing the later one as her head. Worker B must not send the earlier one
    alongside it: it waits for A's lease and takes nothing (the worker logs that and leases
    again, test_worker.py), and the next lease after A's delivery is done takes it."""
    earlier, later = keyed("maria", NOW - 20), keyed("maria", NOW - 10)
    await store.insert_events([later])
    held = HeldLease(store, database_url)
    assert await held.take() == [later.deliveries[0].id]
    await store.insert_events([earlier])

    with pytest.raises(LeaseRaced):
        await lease_while_held(store, held)
    assert await in_flight_by_key(store) == {"maria": [later.deliveries[0].id]}

    # The worker goes on: the next lease after A's delivery is done takes the earlier one.
    [a_lease] = await store.claim_expired(now_ms=NOW + 60_000, lease_ms=30_000, worker_id="r")
    await store.complete([attempt(a_lease, DeliveryState.SUCCEEDED)], NOW)
    [next_one] = await lease(store, "worker-b")
    assert next_one.id == earlier.deliveries[0].id


@ON_POSTGRESQL
async def test_a_replayed_dead_delivery_is_not_sent_beside_its_successor(
    store: SqlStore, database_url: str
) -> None:
    """maria's first message died; her second is her head now. An operator replays the
    first while worker A leases the second: worker B must not send the first alongside."""
    first, second = keyed("maria", NOW - 20), keyed("maria", NOW - 10)
    await store.insert_events([first, second])
    [head] = await lease(store, "worker-0")
    assert head.id == first.deliveries[0].id
    await store.complete([attempt(head, DeliveryState.DEAD)], NOW)

    held = HeldLease(store, database_url)
    assert await held.take() == [second.deliveries[0].id]
    replayed = await store.replay(
        DeadLetterFilter(tenant_id="clinica-sol"), actor="ops", now_ms=NOW
    )
    assert replayed == [first.deliveries[0].id]

    with pytest.raises(LeaseRaced):
        await lease_while_held(store, held)
    assert await in_flight_by_key(store) == {"maria": [second.deliveries[0].id]}


@ON_POSTGRESQL
async def test_a_worker_whose_lease_lost_the_race_goes_on_and_sends_the_key_in_turn(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """The first race with a real worker as B: its step takes nothing and does not raise,
    it logs `lease_raced`, maria still has one delivery in flight, and once A's delivery is
    done the worker's next step sends her other one."""
    now = int(time.time() * 1000)  # the worker leases with the real clock
    earlier, later = keyed("maria", now - 20), keyed("maria", now - 10)
    await store.insert_events([later])
    held = HeldLease(store, database_url)
    assert await held.take(now) == [later.deliveries[0].id]
    await store.insert_events([earlier])
    worker = Worker(store, config_for(database_url, sink))
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    try:
        raced = REGISTRY.get_sample_value("estafeta_lease_races_total") or 0
        with capture_logs() as logs:
            assert await while_held(held, worker._step()) == 0
        assert "lease_raced" in [entry["event"] for entry in logs]
        # Counted, so that an operator sees workers contending for keys (its /metrics).
        assert REGISTRY.get_sample_value("estafeta_lease_races_total") == raced + 1
        assert b"estafeta_lease_races_total" in (await render_this_process())[0]
        assert await in_flight_by_key(store) == {"maria": [later.deliveries[0].id]}

        # A's delivery is done (A died; a rescue records its attempt as a success).
        [a_lease] = await store.claim_expired(now_ms=now + 60_000, lease_ms=30_000, worker_id="r")
        await store.complete([attempt(a_lease, DeliveryState.SUCCEEDED)], now)
        assert await worker._step() == 1
        assert await sink.wait_for(lambda s: earlier.id in s.delivered_ids, 5)
        assert sink.delivered_ids == {earlier.id}
    finally:
        await worker._shutdown()


# -- the migration ------------------------------------------------------------------------------

DELIVERIES = table(
    "deliveries",
    *(
        column(c)
        for c in (
            "id", "tenant_id", "event_id", "destination_id", "state", "priority", "ordering_key",
            "attempts", "max_attempts", "next_attempt_at", "lease_token", "lease_expires_at",
            "leased_by", "last_error", "replays", "created_at", "updated_at",
        )
    ),
)  # fmt: skip
EVENTS = table(
    "events",
    *(
        column(c)
        for c in (
            "id", "tenant_id", "source_id", "type", "idempotency_key", "occurred_at",
            "received_at", "payload", "raw",
        )
    ),
)  # fmt: skip


def in_flight(delivery_id: str, key: str | None, destination: str = "crm") -> dict[str, Any]:
    return {
        "id": delivery_id, "tenant_id": "clinica-sol", "event_id": f"evt_{delivery_id}",
        "destination_id": destination, "state": "in_flight", "priority": 2,
        "ordering_key": key, "attempts": 1, "max_attempts": 5, "next_attempt_at": NOW,
        "lease_token": f"tok_{delivery_id}", "lease_expires_at": NOW + 30_000,
        "leased_by": "w-old", "last_error": None, "replays": 0, "created_at": NOW,
        "updated_at": NOW,
    }  # fmt: skip


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_the_migration_puts_all_but_a_keys_first_in_flight_delivery_back(
    engine: str, tmp_path: Path
) -> None:
    """A database where a race left maria's three deliveries in flight at once upgrades:
    her first stays in flight, the others go back pending unleased (no attempt counted),
    other keys and unkeyed deliveries are untouched, and from then on the database refuses
    a second one of a key in flight."""
    rows = [
        in_flight("dlv_m1", "maria"),
        in_flight("dlv_m2", "maria"),
        in_flight("dlv_m3", "maria"),
        in_flight("dlv_m4", "maria", destination="billing"),  # another destination's key
        in_flight("dlv_j1", "joao"),
        in_flight("dlv_u1", None),
        in_flight("dlv_u2", None),
    ]
    with empty_database(engine, tmp_path, "ordering") as url:
        store = open_store(url)
        try:
            await upgrade(store.engine, "0009")
            async with store.engine.begin() as conn:
                for row in rows:
                    await conn.execute(
                        EVENTS.insert().values(
                            id=row["event_id"], tenant_id="clinica-sol", source_id="crm-events",
                            type="message.received", idempotency_key=None, occurred_at=NOW,
                            received_at=NOW, payload="{}", raw=None,
                        )
                    )  # fmt: skip
                    await conn.execute(DELIVERIES.insert().values(**row))
            await store.migrate()
            async with store.engine.connect() as conn:
                found = {
                    r.id: (r.state, r.lease_token, r.leased_by, r.attempts)
                    for r in await conn.execute(
                        select(
                            DELIVERIES.c.id,
                            DELIVERIES.c.state,
                            DELIVERIES.c.lease_token,
                            DELIVERIES.c.leased_by,
                            DELIVERIES.c.attempts,
                        )
                    )
                }
            kept, given_back = ("in_flight", True, "w-old", 1), ("pending", False, None, 1)
            assert {i: (s, t is not None, w, a) for i, (s, t, w, a) in found.items()} == {
                "dlv_m1": kept,
                "dlv_m2": given_back,
                "dlv_m3": given_back,
                "dlv_m4": kept,
                "dlv_j1": kept,
                "dlv_u1": kept,
                "dlv_u2": kept,
            }
            with pytest.raises(IntegrityError, match=r"(?i)unique"):
                async with store.engine.begin() as conn:
                    await conn.execute(
                        text(
                            "UPDATE deliveries SET state = 'in_flight', lease_token = 't',"
                            " lease_expires_at = 1 WHERE id = 'dlv_m2'"
                        )
                    )
        finally:
            await store.close()


class HeldFirstInsert:
    """The store's first insert held open until `release`: a group commit batch that takes
    long to commit, while later requests' batches go on beside it."""

    def __init__(self, store: SqlStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.insert = store.insert_events
        self.entered, self.gate = asyncio.Event(), asyncio.Event()
        self.calls = 0
        monkeypatch.setattr(store, "insert_events", self)

    async def __call__(self, events: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            await self.gate.wait()
        return await self.insert(events)


@ON_POSTGRESQL
async def test_a_keys_later_event_never_commits_before_its_earlier_one_in_a_parallel_batch(
    store: SqlStore, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maria's first message is in a batch that takes long to commit; her second arrives
    with a burst of other conversations' messages, enough for a second batch beside it.
    The second batch must not carry her second message: committed first, a worker leasing
    then would find no earlier message of hers and send the second one first."""
    data = base_config(database_url)
    data["routes"][0]["ordering_key"] = "data.conversation_id"
    hub = Hub(load_config_dict(data), store)
    held = HeldFirstInsert(store, monkeypatch)

    def publish(conversation: str) -> asyncio.Task[Any]:
        return asyncio.create_task(
            hub.accept(
                tenant_id="clinica-sol",
                source_id="api",
                event_type="message.received",
                data={"conversation_id": conversation},
                idempotency_key=None,
            )
        )

    first = publish("maria")
    await asyncio.wait_for(held.entered.wait(), timeout=10)
    second = publish("maria")
    others = [publish(f"other-{n}") for n in range(20)]
    await asyncio.wait_for(asyncio.gather(*others), timeout=10)  # a batch beside the held one

    now = int(time.time() * 1000) + 1_000
    leased = await store.lease(now_ms=now, rooms={"crm": 50}, lease_ms=30_000, worker_id="w")
    assert len(leased) == 20, "the others' messages were committed and leased"
    assert not second.done(), "maria's second message must wait for her first"

    held.gate.set()
    first_id, second_id = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
    [head] = await store.lease(now_ms=now, rooms={"crm": 50}, lease_ms=30_000, worker_id="w")
    assert head.event_id == first_id.event_id, "her first message goes first"
    await store.complete([attempt(head, DeliveryState.SUCCEEDED)], now)
    [then] = await store.lease(now_ms=now, rooms={"crm": 50}, lease_ms=30_000, worker_id="w")
    assert then.event_id == second_id.event_id
    await hub.close()

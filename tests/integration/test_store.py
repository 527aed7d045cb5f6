"""The store's behaviour, one suite run against SQLite and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from msgspec.structs import replace
from sqlalchemy import Connection, Insert, func, insert, select, text
from sqlalchemy import event as sa_event
from structlog.testing import capture_logs

from estafeta.config import Config, load_config_dict
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import OutcomeKind
from estafeta.delivery.state import DeliveryState
from estafeta.errors import StoreError, StoreRejected, StoreUnavailable
from estafeta.store import open_store
from estafeta.store import schema as s
from estafeta.store.records import (
    DeadLetterFilter,
    InsertResult,
    NewEvent,
    NewMessage,
)
from estafeta.store.schema import metadata
from estafeta.store.sqlite import WAL_SIZE_LIMIT
from estafeta.store.sqlstore import SqlStore
from estafeta.store.views import latest_attempts
from tests.conftest import (
    base_config,
    empty_database,
    lease_any,
    out_of_descriptors,
    until_waiting_for_locks,
)
from tests.integration.plans import (
    assert_walks_only,
    explain,
    explain_ran,
    explain_sql,
    rows_read,
    statements_ran,
)
from tests.integration.store_support import (
    NOW,
    attempt,
    dead_deliveries,
    event,
    keyed,
    message,
    mode,
    only_delivery,
    umask,
)

T = TypeVar("T")


async def lease(store: SqlStore, *, now: int = NOW, limit: int = 100) -> list[LeasedDelivery]:
    return await lease_any(store, now_ms=now, limit=limit, worker_id="w1")


async def kill_all(store: SqlStore, to: DeliveryState = DeliveryState.DEAD) -> list[str]:
    leased = await lease(store)
    await store.complete([attempt(d, to, kind=OutcomeKind.PERMANENT) for d in leased], NOW)
    return [d.id for d in leased]


def held_key_insert(key: str) -> Insert:
    """Another process's insert of an event with `key`, for a test to hold uncommitted."""
    return insert(s.events).values(
        id="evt_held",
        tenant_id="clinica-sol",
        source_id="crm-events",
        type="t",
        idempotency_key=key,
        occurred_at=NOW,
        received_at=NOW,
        payload="{}",
    )


async def test_an_event_is_stored_with_its_deliveries(store: SqlStore) -> None:
    e = event("k1", destinations=("crm", "billing"))
    [result] = await store.insert_events([e])
    assert result.event_id == e.id and not result.duplicate
    view = await store.get_event(e.id, "clinica-sol")
    assert view is not None
    assert sorted(d.destination_id for d in view.deliveries) == ["billing", "crm"]
    assert {d.state for d in view.deliveries} == {"pending"}


async def test_a_repeated_idempotency_key_answers_the_original_and_stores_nothing(
    store: SqlStore,
) -> None:
    first = event("wamid.1")
    await store.insert_events([first])
    again = event("wamid.1")
    [result] = await store.insert_events([again])
    assert result.duplicate and result.event_id == first.id
    assert await store.get_event(again.id, None) is None
    assert (await store.queue_stats(history=True)).by_state == {"pending": 1}


async def test_a_batch_of_repeats_and_new_events_is_answered_without_a_second_query(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider resending what was answered: each repeat names its original, found by the
    statement that stores the batch (a read afterwards cost PostgreSQL more than the
    insert: a query planned anew for each batch size)."""
    originals = [event(f"wamid.{n}") for n in range(3)]
    await store.insert_events(originals)

    def no_second_query() -> None:
        raise AssertionError("the batch's fates took a second query")

    monkeypatch.setattr(store, "_read", no_second_query)
    repeats = [event(f"wamid.{n}") for n in range(3)]
    fresh = event("wamid.new")
    results = await store.insert_events([repeats[0], fresh, repeats[2], repeats[1]])
    assert [(r.event_id, r.duplicate) for r in results] == [
        (originals[0].id, True),
        (fresh.id, False),
        (originals[2].id, True),
        (originals[1].id, True),
    ]
    monkeypatch.undo()
    assert (await store.queue_stats(history=True)).by_state == {"pending": 4}


async def test_duplicates_inside_one_batch_are_stored_once(store: SqlStore) -> None:
    a, b, c = event("same"), event("same"), event(None)
    results = await store.insert_events([a, b, c])
    assert [r.duplicate for r in results] == [False, True, False]
    assert results[1].event_id == a.id
    assert (await store.queue_stats(history=True)).by_state == {"pending": 2}


async def test_the_same_key_from_another_source_or_tenant_is_a_new_event(store: SqlStore) -> None:
    results = await store.insert_events(
        [
            event("k"),
            event("k", source="keyed"),
            event("k", tenant="outra", source="outra-in", destinations=("outra-sink",)),
        ]
    )
    assert [r.duplicate for r in results] == [False, False, False]


async def test_concurrent_duplicates_never_both_succeed(store: SqlStore) -> None:
    results = await asyncio.gather(*(store.insert_events([event("race")]) for _ in range(8)))
    originals = [r for [r] in results if not r.duplicate]
    assert len(originals) == 1
    assert {r.event_id for [r] in results} == {originals[0].event_id}


@pytest.fixture
async def other_store(config: Config) -> AsyncIterator[SqlStore]:
    """The same database as another process opens it: its own connections (on SQLite, its
    own connections to the WAL file and its own ingest writer)."""
    other = open_store(config.storage.url)
    try:
        yield other
    finally:
        await other.close()


async def test_the_same_key_at_two_processes_at_once_is_stored_once(
    store: SqlStore, other_store: SqlStore
) -> None:
    """A provider sends one webhook to two `serve` processes at the same instant: one event
    is stored, and both are answered with its id."""
    for n in range(10):
        results = await asyncio.gather(
            *(s.insert_events([event(f"twice-{n}")]) for s in (store, other_store, store))
        )
        originals = [r for [r] in results if not r.duplicate]
        assert len(originals) == 1
        assert {r.event_id for [r] in results} == {originals[0].event_id}
    assert (await store.queue_stats(history=True)).by_state == {"pending": 10}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_processes_storing_the_same_keys_in_another_order_both_succeed(
    store: SqlStore, other_store: SqlStore, database_url: str
) -> None:
    """A provider resends a burst of webhooks to two `serve` processes at once (a balancer
    in front): their batches hold the same keys in another order. On PostgreSQL a key being
    stored waits for whoever is storing it to commit: each batch held a key the other
    waited for, a deadlock, and the batch PostgreSQL chose to fail was taken for an outage
    (every request of it spooled, or answered 503 without a spool)."""
    # A third request is storing "c", not committed yet: the first batch waits for it, the
    # second then for the first (before: holding "a", which the first would store next).
    async with store.engine.connect() as holder:
        await holder.execute(held_key_insert("c"))
        first = asyncio.ensure_future(store.insert_events([event("b"), event("c"), event("a")]))
        await until_waiting_for_locks(database_url, 1)
        second = asyncio.ensure_future(other_store.insert_events([event("a"), event("b")]))
        await until_waiting_for_locks(database_url, 2)
        await holder.rollback()  # the third request failed: "c" is the first batch's
    results = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
    stored = {r.event_id for batch in results for r in batch if not r.duplicate}
    assert len(stored) == 3
    assert {r.event_id for batch in results for r in batch} == stored
    assert (await store.queue_stats(history=True)).by_state == {"pending": 3}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_processes_starting_on_files_listing_tenants_in_another_order_both_start(
    store: SqlStore, other_store: SqlStore, database_url: str
) -> None:
    """A rolling change that reorders the tenants: a process on the old file and one on the
    new start at once, each recording its configuration in the store. Rows written in the
    file's order each held a tenant the other waited for, a deadlock, and the process
    PostgreSQL chose to fail did not start ("the store cannot be reached", exit 3)."""
    data = base_config(database_url)
    old = load_config_dict(data)
    new = load_config_dict({**data, "tenants": list(reversed(data["tenants"]))})
    await store.sync_config(old, NOW)
    async with store.engine.connect() as holder:
        # A third process, its configuration half recorded: "outra" is held.
        await holder.execute(text("SELECT 1 FROM tenants WHERE id = 'outra' FOR UPDATE"))
        # The new file's process waits first, then the old one's.
        starting: list[asyncio.Future[None]] = []
        for waiting, (process, config) in enumerate(((other_store, new), (store, old)), 1):
            starting.append(asyncio.ensure_future(process.sync_config(config, NOW + 1)))
            await until_waiting_for_locks(database_url, waiting)
        await holder.commit()
    await asyncio.wait_for(asyncio.gather(*starting), timeout=10)


async def test_a_batch_whose_fates_cannot_be_told_commits_nothing(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the general transaction (here a spool import's) an event's fate is told before the
    commit: should it be unknown (its key conflicted, its original is gone), nothing is
    stored, so storing the batch again event by event cannot store one twice."""

    def unknown(*args: Any) -> list[InsertResult]:
        raise StoreError("an event conflicted on its key but was not found")

    monkeypatch.setattr("estafeta.store.ingest.fates", unknown)
    stored = event()
    with pytest.raises(StoreError):
        await store.insert_events([stored], by_id=True)
    assert await store.get_event(stored.id, None) is None


async def test_lease_takes_the_highest_priority_first_then_fifo(store: SqlStore) -> None:
    low = event(priority=4, at=NOW - 3000)
    urgent_later = event(priority=0, at=NOW - 1000)
    urgent_first = event(priority=0, at=NOW - 2000)
    middle = event(priority=2, at=NOW - 5000)
    await store.insert_events([low, urgent_later, urgent_first, middle])
    leased = await lease(store)
    assert [d.event_id for d in leased] == [urgent_first.id, urgent_later.id, middle.id, low.id]
    assert leased[0].payload.startswith(b'{"id":"' + urgent_first.id.encode())


async def test_lease_respects_limit_and_due_time(store: SqlStore) -> None:
    await store.insert_events([event(at=NOW - i) for i in range(5)] + [event(at=NOW + 60_000)])
    assert len(await lease(store, limit=3)) == 3
    assert len(await lease(store)) == 2  # the future one is not due, the leased are taken
    assert await lease(store) == []


async def test_concurrent_leases_never_share_a_delivery(store: SqlStore) -> None:
    """Twelve workers leasing at the same moment (on twelve connections on PostgreSQL) each
    get deliveries of their own, and none comes back short for rows another is taking:
    together they take all 180, of three destinations, at once."""
    await store.insert_events(
        [event(at=NOW - i, destinations=("crm", "billing", "erp")) for i in range(60)]
    )
    batches = await asyncio.gather(*(lease(store, limit=15) for _ in range(12)))
    ids = [d.id for batch in batches for d in batch]
    assert len(ids) == 180 and len(set(ids)) == 180


async def test_a_late_result_never_overwrites_a_rescued_delivery(store: SqlStore) -> None:
    await store.insert_events([event()])
    [first] = await lease(store)
    # The worker holding it dies; once the lease passes, another worker claims it.
    claimed = await store.claim_expired(
        now_ms=first.lease_expires_at + 1, lease_ms=30_000, worker_id="w2"
    )
    assert [d.id for d in claimed] == [first.id]
    assert claimed[0].lease_token != first.lease_token
    applied = await store.complete([attempt(first, DeliveryState.SUCCEEDED)], NOW)
    assert applied == 0
    view = await store.get_event(first.event_id, None)
    assert view is not None and view.deliveries[0].state == "in_flight"
    assert (
        await store.complete(
            [attempt(claimed[0], DeliveryState.PENDING, kind=OutcomeKind.RETRYABLE)], NOW
        )
        == 1
    )
    delivery = await only_delivery(store, first.event_id)
    assert delivery.state == "pending" and delivery.attempts == 1
    # Both attempts happened, so both are in the log.
    assert len(delivery.attempt_log) == 2


async def test_an_event_lists_each_deliverys_latest_attempts_not_every_one(
    store: SqlStore,
) -> None:
    """A dead delivery replayed again and again (a script replaying a long-dead
    destination's deliveries every hour) gathers attempts without end; its event's read
    listed every one, so one `GET /api/v1/events/{id}` grew with them without bound (each
    with up to 1 KiB of the answer), built whole in memory. It lists the latest 100, oldest
    first, as docs/http-api.md says."""
    await store.insert_events([event()])
    lives = 130
    for n in range(lives):
        at = NOW + n * 10
        [leased] = await lease(store, now=at)
        died = attempt(leased, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT, at=at)
        assert await store.complete([died], at) == 1
        replayed = DeadLetterFilter(delivery_ids=(leased.id,))
        assert await store.replay(replayed, actor="tester", now_ms=at + 1) == [leased.id]
    delivery = await only_delivery(store, leased.event_id)
    assert delivery.replays == lives
    started = [a.started_at for a in delivery.attempt_log]
    # The latest ones, in the order they were made: the 30 oldest are left out.
    assert started == [NOW + n * 10 for n in range(lives - 100, lives)]


async def test_an_events_read_takes_a_long_replayed_deliverys_latest_attempts_by_index(
    store: SqlStore,
) -> None:
    """A delivery with 500 attempts (a dead one replayed every hour for weeks): its event's
    read ranked and sorted all 500 to answer the latest 100, a read that grew with every
    replay. It reads those 100 by the delivery's index of attempts, latest first."""
    await store.insert_events([event()])
    [leased] = await lease(store)
    rows = [
        {
            "id": f"att_{n:05d}",
            "tenant_id": leased.tenant_id,
            "delivery_id": leased.id,
            "number": 1 + n % 5,  # counted again from 1 after each replay
            "started_at": NOW + n * 1000,
            "duration_ms": 1.0,
            "outcome": "retryable",
            "response_excerpt": "",
        }
        for n in range(500)
    ]
    async with store.engine.begin() as conn:
        await conn.execute(insert(s.attempts), rows)
        await conn.execute(text("ANALYZE"))
    delivery = await only_delivery(store, leased.event_id)
    assert [a.id for a in delivery.attempt_log] == [r["id"] for r in rows[-100:]]

    plan = await explain(store, latest_attempts([leased.id]))
    # The 100 read are put in order (delivery, then oldest first): nothing more is sorted.
    assert_walks_only(store, plan, "attempts", {"attempts_delivery"}, 100, sorts=True)


async def test_a_providers_code_holding_a_nul_reads_the_same_on_both_engines(
    store: SqlStore,
) -> None:
    """A provider's error code is its own text (SendPulse's `"error"`), and it names the
    attempt's `error_class`: a NUL in it read U+FFFD on PostgreSQL but stayed a NUL on
    SQLite, unlike the same attempt's excerpt and the delivery's `last_error`."""
    await store.insert_events([event()])
    [leased] = await lease(store)
    died = attempt(leased, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT)
    died = replace(died, outcome=replace(died.outcome, error_class="sendpulse_bad\x00code"))
    assert await store.complete([died], NOW) == 1
    delivery = await only_delivery(store, leased.event_id)
    assert [a.error_class for a in delivery.attempt_log] == ["sendpulse_bad\ufffdcode"]


async def test_a_late_release_or_result_never_revives_what_another_worker_finished(
    store: SqlStore, other_store: SqlStore
) -> None:
    """The first worker's lease expired and another process rescued the delivery, sent it
    and recorded its success. The first worker then stops and gives its lease back, or
    records its own failure: neither brings the delivery back to pending (to be sent a
    third time) nor changes what the log says of the success."""
    await store.insert_events([event()])
    [late] = await lease(store)
    [rescued] = await other_store.claim_expired(
        now_ms=late.lease_expires_at + 1, lease_ms=30_000, worker_id="w2"
    )
    assert await other_store.complete([attempt(rescued, DeliveryState.SUCCEEDED)], NOW) == 1
    assert await store.release([late], NOW) == 0
    failed = attempt(late, DeliveryState.PENDING, kind=OutcomeKind.RETRYABLE)
    assert await store.complete([failed], NOW) == 0
    delivery = await only_delivery(store, late.event_id)
    assert (delivery.state, delivery.attempts, delivery.last_error) == ("succeeded", 1, None)
    assert await lease(store, now=NOW + 60_000) == []


async def test_a_rescue_takes_over_no_more_leases_than_its_limit(store: SqlStore) -> None:
    """A worker rescuing after a crash takes at most `limit` leases a round, so a large
    rescue is spread over rounds (and workers) instead of one worker holding them all."""
    await store.insert_events([event(f"k{i}", at=NOW + i) for i in range(300)])
    leased = await lease(store, now=NOW + 300, limit=300)
    assert len(leased) == 300
    after = max(d.lease_expires_at for d in leased) + 1
    first = await store.claim_expired(now_ms=after, lease_ms=30_000, worker_id="w2", limit=10)
    assert len(first) == 10
    # The oldest deadlines go first, and the rest are still there for the next round.
    rest = await store.claim_expired(now_ms=after, lease_ms=30_000, worker_id="w3", limit=1000)
    assert len(rest) == 290
    assert not {d.id for d in first} & {d.id for d in rest}


async def test_live_leases_are_not_claimed(store: SqlStore) -> None:
    await store.insert_events([event()])
    [leased] = await lease(store)
    assert (
        await store.claim_expired(now_ms=leased.lease_expires_at - 1, lease_ms=1000, worker_id="w2")
        == []
    )


async def test_complete_records_the_attempt_and_moves_the_state(store: SqlStore) -> None:
    await store.insert_events([event()])
    [leased] = await lease(store)
    assert await store.complete([attempt(leased, DeliveryState.SUCCEEDED)], NOW) == 1
    delivery = await only_delivery(store, leased.event_id, "clinica-sol")
    assert delivery.state == "succeeded" and delivery.attempts == 1
    [logged] = delivery.attempt_log
    assert logged.status_code == 200 and logged.number == 1 and logged.duration_ms == 3.5


async def test_a_failure_named_by_a_long_provider_code_is_recorded_cut_to_its_column(
    store: SqlStore,
) -> None:
    """A connector names a failure by the provider's own code (SendPulse's `error` is a
    phrase). Longer than the column, PostgreSQL refused the whole completion: the delivery
    was sent again until it died as `lease_expired`, its real reason never recorded."""
    await store.insert_events([event()])
    [leased] = await lease(store)
    done = attempt(leased, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT)
    long_class = "sendpulse_" + "the_phone_number_is_not_registered_on_whatsapp" * 3
    done = replace(done, outcome=replace(done.outcome, error_class=long_class))
    assert await store.complete([done], NOW) == 1
    delivery = await only_delivery(store, leased.event_id, "clinica-sol")
    assert delivery.state == "dead"
    [logged] = delivery.attempt_log
    assert logged.error_class == long_class[:64]


async def test_release_gives_leases_back_without_counting_an_attempt(store: SqlStore) -> None:
    await store.insert_events([event(), event()])
    leased = await lease(store)
    assert await store.release(leased, NOW) == 2
    again = await lease(store)
    assert {d.id for d in again} == {d.id for d in leased}
    assert all(d.attempts == 0 for d in again)


@pytest.mark.timeout(120)
async def test_a_replay_of_more_dead_deliveries_than_a_statement_takes_moves_them_all(
    store: SqlStore,
) -> None:
    """`--limit` goes up to 1,000,000 (docs/cli.md), and each id went to the driver as a
    parameter of one statement: past asyncpg's 32,767 (SQLite's default build: 32,766) the
    whole replay failed with `the store failed` and moved nothing."""
    await store.insert_events([event()])
    async with store.engine.begin() as conn:
        template = dict((await conn.execute(select(s.deliveries))).mappings().one())
        many = 33_000
        await conn.execute(
            insert(s.deliveries),
            [
                template | {"id": f"dlv_many{n:07d}", "state": "dead", "ordering_key": None}
                for n in range(many)
            ],
        )
    moved = await store.replay(DeadLetterFilter(limit=many + 1), actor="tester", now_ms=NOW)
    assert len(moved) == many
    assert (await store.queue_stats()).by_state.get("dead", 0) == 0


async def test_a_large_replay_lets_ingest_and_workers_through_while_it_goes_on(
    store: SqlStore,
) -> None:
    """After an outage tens of thousands of deliveries are dead, and `dlq replay --all
    --limit 1000000` replays them. In one transaction it held SQLite's one write lock for
    all of them (2 s a 100,000): every webhook waited for it, spooled past 5 s, and on both
    engines no worker could take the first before the last was replayed. A batch at a time,
    the first replayed are pending while the rest wait, and an event is stored meanwhile."""
    many = 20_000
    await dead_deliveries(store, many)
    replay = asyncio.create_task(
        store.replay(DeadLetterFilter(limit=1_000_000), actor="tester", now_ms=NOW + 1)
    )
    try:
        async with asyncio.timeout(60):
            while not (first_seen := (await store.queue_stats()).by_state.get("pending", 0)):
                await asyncio.sleep(0.002)
        assert first_seen < many
        await store.insert_events([event(at=NOW + 2)])
        # Some of the first replayed die again at once: not replayed a second time.
        redead = await lease(store, now=NOW + 1, limit=10)
        await store.complete(
            [attempt(d, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT) for d in redead], NOW + 3
        )
        assert not replay.done()
    finally:
        replayed = await replay
    assert len(replayed) == many
    assert (await store.queue_stats()).by_state == {"pending": many + 1 - 10, "dead": 10}
    async with store.engine.connect() as conn:
        audited = (await conn.execute(text("SELECT detail FROM audit_log"))).scalars().all()
    assert sum(orjson.loads(detail)["count"] for detail in audited) == many


async def test_dead_letters_are_listed_replayed_and_audited(store: SqlStore) -> None:
    await store.insert_events(
        [event(destinations=("crm", "billing")), event(event_type="appointment.booked")]
    )
    dead = await kill_all(store)
    listed = await store.list_dead(DeadLetterFilter(tenant_id="clinica-sol"))
    assert sorted(d.id for d in listed) == sorted(dead)
    only_billing = await store.list_dead(DeadLetterFilter(destination_id="billing"))
    assert [d.destination_id for d in only_billing] == ["billing"]
    by_type = await store.list_dead(DeadLetterFilter(event_type="appointment.booked"))
    assert [d.event_type for d in by_type] == ["appointment.booked"]

    replayed = await store.replay(
        DeadLetterFilter(destination_id="crm"), actor="tester", now_ms=NOW + 5
    )
    assert len(replayed) == 2
    leased = await lease(store, now=NOW + 10)
    assert sorted(d.id for d in leased) == sorted(replayed)
    assert all(d.attempts == 0 for d in leased)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT actor, action, detail FROM audit_log"))).all()
    assert [(r.actor, r.action) for r in rows] == [("tester", "dlq.replay")]
    assert '"count":2' in rows[0].detail


@pytest.mark.parametrize("action", ["replay", "discard"])
@pytest.mark.parametrize(
    "selection", [{}, {"destination_id": "crm"}], ids=["everything", "by-destination"]
)
async def test_a_limited_move_takes_the_dead_deliveries_the_list_shows(
    store: SqlStore, action: str, selection: dict[str, Any]
) -> None:
    """`dlq list --limit 1` shows the oldest death; `dlq replay --limit 1` (or discard) with
    the same selection must move that delivery, not another one."""
    stored_first, stored_second = event(at=NOW - 2), event(at=NOW - 1)
    await store.insert_events([stored_first, stored_second])
    leased = {d.event_id: d for d in await lease(store)}
    # The delivery stored last dies first.
    for died_at, stored in ((NOW + 1, stored_second), (NOW + 2, stored_first)):
        dies = attempt(leased[stored.id], DeliveryState.DEAD, kind=OutcomeKind.PERMANENT)
        await store.complete([dies], died_at)
    selected = DeadLetterFilter(limit=1, **selection)
    [oldest] = [d.id for d in await store.list_dead(selected)]
    assert oldest == leased[stored_second.id].id
    move = store.replay if action == "replay" else store.discard
    assert await move(selected, actor="t", now_ms=NOW + 3) == [oldest]


@pytest.mark.parametrize("action", ["replay", "discard"])
async def test_two_operators_moving_the_same_dead_deliveries_move_each_once(
    store: SqlStore, other_store: SqlStore, action: str
) -> None:
    """Two operators replay everything at once (or one replays while the other discards):
    each dead delivery is moved by one of them only, and each is told, and audited, the
    count it moved."""
    await store.insert_events([event(at=NOW - n) for n in range(40)])
    dead = set(await kill_all(store))
    other_move = other_store.replay if action == "replay" else other_store.discard
    replayed, moved = await asyncio.gather(
        store.replay(DeadLetterFilter(), actor="first", now_ms=NOW + 1),
        other_move(DeadLetterFilter(), actor="second", now_ms=NOW + 1),
    )
    assert set(replayed).isdisjoint(moved) and set(replayed) | set(moved) == dead
    expected = {"pending": len(replayed), "discarded": 0}
    expected["pending" if action == "replay" else "discarded"] += len(moved)
    assert (await store.queue_stats(history=True)).by_state == {
        k: v for k, v in expected.items() if v
    }
    async with store.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT actor, detail FROM audit_log"))).all()
    audited = {r.actor: orjson.loads(r.detail)["count"] for r in rows}
    assert audited == {
        actor: n for actor, n in (("first", len(replayed)), ("second", len(moved))) if n
    }


async def test_discard_is_final_and_replay_of_nothing_changes_nothing(store: SqlStore) -> None:
    await store.insert_events([event()])
    [dead] = await kill_all(store)
    assert await store.discard(DeadLetterFilter(delivery_ids=(dead,)), actor="t", now_ms=NOW) == [
        dead
    ]
    assert await store.replay(DeadLetterFilter(delivery_ids=(dead,)), actor="t", now_ms=NOW) == []
    assert (await store.queue_stats(history=True)).by_state == {"discarded": 1}


async def test_a_tenant_never_sees_or_replays_another_tenants_data(store: SqlStore) -> None:
    outra = event(tenant="outra", source="outra-in", destinations=("outra-sink",))
    await store.insert_events([outra])
    await kill_all(store)
    assert await store.get_event(outra.id, "clinica-sol") is None
    assert await store.list_dead(DeadLetterFilter(tenant_id="clinica-sol")) == []
    assert (
        await store.replay(DeadLetterFilter(tenant_id="clinica-sol"), actor="t", now_ms=NOW) == []
    )
    assert len(await store.list_dead(DeadLetterFilter(tenant_id="outra"))) == 1


async def test_the_schema_refuses_an_impossible_priority(store: SqlStore) -> None:
    with pytest.raises(StoreRejected, match="priority"):
        await store.insert_events([event(priority=7)])
    assert (await store.queue_stats(history=True)).by_state == {}


async def test_an_empty_key_is_a_key_like_any_other(store: SqlStore) -> None:
    """The store keys by exactly what it is given: "" is not "no key" (the edges refuse an
    empty key or read it as none; the store must still answer a repeat, not fail)."""
    [first] = await store.insert_events([event("")])
    [again] = await store.insert_events([event("")])
    assert not first.duplicate
    assert (again.event_id, again.duplicate) == (first.event_id, True)


async def test_a_refused_batch_stores_none_of_its_events(store: SqlStore) -> None:
    good, bad = event("good"), event("bad", priority=7)
    with pytest.raises(StoreRejected):
        await store.insert_events([good, bad])
    assert await store.get_event(good.id, None) is None
    assert (await store.insert_events([event("good")]))[0].duplicate is False


async def test_one_batch_of_messages_adds_up_in_each_conversation(store: SqlStore) -> None:
    maria, joao = "5511987654321", "5521912345678"
    await store.insert_events([message("w0", maria, NOW, name="Maria")])
    await store.insert_events(
        [
            message("w1", maria, NOW + 3_000, name=None),
            message("w2", joao, NOW + 1_000, name="João"),
            message("w3", maria, NOW - 5_000, name="Maria Silva"),
            message("w1", maria, NOW + 9_000, name="repeat"),  # a repeat within the batch
            message("w0", maria, NOW + 9_000, name="redelivery"),  # stored before
            message("w4", joao, NOW + 2_000, name=None, direction="outbound"),
        ]
    )
    c = await store.get_conversation("clinica-sol", maria)
    assert c is not None
    # The newest message's name: w3's is older than w0's, and w1 gives none.
    assert (c.inbound_count, c.outbound_count, c.contact_name) == (3, 0, "Maria")
    assert (c.first_message_at, c.last_message_at) == (NOW - 5_000, NOW + 3_000)
    c = await store.get_conversation("clinica-sol", joao)
    assert c is not None
    assert (c.inbound_count, c.outbound_count, c.contact_name) == (1, 1, "João")
    assert (c.first_message_at, c.last_message_at) == (NOW + 1_000, NOW + 2_000)


# Text that a provider may send and that must come back byte for byte: quotes, backslashes
# and escapes that look like JSON's own, control characters, other scripts, emoji, SQL.
AWKWARD_TEXTS = (
    'say "hi" \\ and \\u0000 and \\n',
    "tab\tnewline\ncarriage\r bell\x07 escape\x1b",
    "Conceição — 予約 — مرحبا — 👩🏽‍⚕️📅",
    "'; DROP TABLE events; --",
    '{"looks": ["like", "json"]}',
    "x" * 20_000,
)


@pytest.mark.parametrize("awkward", AWKWARD_TEXTS, ids=range(len(AWKWARD_TEXTS)))
async def test_awkward_text_is_stored_exactly(store: SqlStore, awkward: str) -> None:
    base = message("w-awkward", awkward[:64], NOW, name=awkward)
    payload = orjson.dumps({"id": base.id, "data": {"text": awkward}}).decode()
    stored = replace(base, payload=payload, raw=awkward, message_ref=awkward[:200])
    [result] = await store.insert_events([stored])
    assert not result.duplicate
    view = await store.get_event(stored.id, None)
    assert view is not None
    assert view.payload["data"]["text"] == awkward
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT raw, conversation_id, message_ref FROM events WHERE id = :id"),
                {"id": stored.id},
            )
        ).one()
    assert tuple(row) == (awkward, awkward[:64], awkward[:200])
    found = await store.get_conversation("clinica-sol", awkward[:64])
    assert found is not None
    assert found.contact_name == awkward


async def test_a_new_sqlite_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The database holds message text and phone numbers; SQLite made it, and its -wal and
    -shm files, with the umask's mode, under the usual 022 readable by every user."""
    path = tmp_path / "estafeta.db"
    with umask(0o022):
        store = open_store(f"sqlite:///{path}")
        try:
            assert not path.exists()  # made as it opens: a store never opened writes nothing
            await store.migrate()
            await store.insert_events([event()])
            files = [path, path.with_name("estafeta.db-wal"), path.with_name("estafeta.db-shm")]
            assert [mode(file) for file in files] == [0o600] * 3
        finally:
            await store.close()


async def test_a_sqlite_store_out_of_descriptors_says_so_not_that_it_cannot_create_its_file(
    tmp_path: Path,
) -> None:
    """A connection opened while client connections took every descriptor failed "cannot
    create the database file PATH": the file is there, and the operator went to its
    directory's permissions. It is the same outage (ingest spools), named for its cause."""
    path = tmp_path / "estafeta.db"
    made = open_store(f"sqlite:///{path}")
    try:
        await made.migrate()
    finally:
        await made.close()
    store = open_store(f"sqlite:///{path}")  # no connection open yet
    try:
        with out_of_descriptors(), pytest.raises(StoreUnavailable) as raised:
            await store.insert_events([event()])
        assert str(raised.value) == f"cannot open the database file {path}: Too many open files"
        await store.insert_events([event()])  # once descriptors are free
    finally:
        await store.close()


async def test_a_destination_url_is_stored_without_its_credentials(
    database_url: str, store: SqlStore
) -> None:
    """Its user, password, path and query may be the credentials (a Make or Zapier hook's
    token is its path): they were copied into the database, and every dump and backup of
    it, where nothing reads them. Only where it points is kept, as errors show it."""
    data = base_config(database_url)
    data["destinations"][0]["url"] = "https://hook:pa55word@crm.example:8443/T0K3N?sig=S1G"
    await store.sync_config(load_config_dict(data, {}), NOW)
    async with store.engine.connect() as conn:
        stored = (await conn.execute(text("SELECT url FROM destinations WHERE id = 'crm'"))).one()
    assert stored.url == "https://crm.example:8443/…"


async def test_a_destination_url_stored_whole_before_is_outlined_even_once_removed(
    database_url: str, store: SqlStore
) -> None:
    """Rows written by an earlier version hold the whole URL; a start rewrites every one,
    those of destinations since removed from the file too (sync never deletes a row, so
    they would keep a hook's token in every dump for good)."""
    data = base_config(database_url)
    await store.sync_config(load_config_dict(data, {}), NOW)
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE destinations SET url = 'https://u:p@old.example/T0K3N'"))
    data["destinations"] = [d for d in data["destinations"] if d["id"] != "billing"]
    data["routes"] = [
        {**r, "destinations": [x for x in r["destinations"] if x != "billing"]}
        for r in data["routes"]
    ]
    await store.sync_config(load_config_dict(data, {}), NOW + 1)
    async with store.engine.connect() as conn:
        stored: dict[str, str | None] = dict(
            (await conn.execute(text("SELECT id, url FROM destinations"))).all()
        )
    assert stored["billing"] == "https://old.example/…", stored
    assert all("T0K3N" not in (url or "") for url in stored.values()), stored


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_sqlite_wal_shrinks_back_once_a_long_read_has_ended(
    database_url: str, store: SqlStore
) -> None:
    """A read kept open (a `sqlite3` shell after BEGIN) lets no checkpoint pass it, so the
    WAL grows with every commit. Before: it kept that size (here some 20 MB, hours of traffic
    gigabytes) until the last process closed the database; now the first checkpoints after
    the read ends bring it back to `WAL_SIZE_LIMIT`."""
    wal = Path(database_url.removeprefix("sqlite:///") + "-wal")
    webhook = '{"data":"' + "x" * 2000 + '"}'  # a provider's webhook is about 2 KB

    async def ingest(count: int) -> None:
        for _ in range(count // 500):
            await store.insert_events([replace(event(), payload=webhook) for _ in range(500)])

    reader = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()  # the read's snapshot
        await ingest(10_000)
        assert wal.stat().st_size > 2 * WAL_SIZE_LIMIT  # no checkpoint could pass the read
    finally:
        reader.close()
    await ingest(1_000)
    assert wal.stat().st_size <= WAL_SIZE_LIMIT


async def test_migrations_build_exactly_the_declared_schema(store: SqlStore) -> None:
    def differences(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection)
        return list(compare_metadata(context, metadata))

    async with store.engine.connect() as conn:
        assert await conn.run_sync(differences) == []


async def test_migrate_twice_is_harmless(store: SqlStore) -> None:
    await store.migrate()
    await store.insert_events([event()])
    await store.migrate()
    assert (await store.queue_stats(history=True)).by_state == {"pending": 1}


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_a_migration_is_logged_before_it_runs_and_once_committed(
    engine: str, tmp_path: Path
) -> None:
    """`serve` migrates at start, and an index built over millions of deliveries may take
    minutes: the log says why it is not serving yet, then which revisions it went between.
    A store already at the newest migration logs nothing."""
    from estafeta.store.migrate import head_revision, upgrade

    with empty_database(engine, tmp_path, "migration_logged") as url:
        store = open_store(url)
        try:
            await upgrade(store.engine, "0004")
            with capture_logs() as logs:
                await store.migrate()
                await store.migrate()
        finally:
            await store.close()
    schema = [e for e in logs if e["event"].startswith("schema_")]
    assert [(e["event"], e["from_revision"], e["to_revision"]) for e in schema] == [
        ("schema_migrating", "0004", head_revision()),
        ("schema_migrated", "0004", head_revision()),
    ]
    assert schema[1]["duration_ms"] >= 0


async def test_api_keys_resolve_to_their_tenant_only_by_hash(store: SqlStore) -> None:
    await store.create_api_key(
        tenant_id="outra", key_hash="a" * 64, label="x", actor="test", now_ms=NOW
    )
    assert await store.tenant_for_key("a" * 64) == "outra"
    assert await store.tenant_for_key("b" * 64) is None


async def test_a_destination_not_named_keeps_its_deliveries_and_spends_nothing(
    store: SqlStore,
) -> None:
    """The worker leaves out a destination whose circuit is open or whose rate limit is
    spent: its deliveries stay pending, with no attempt counted, until a lease names it."""
    await store.insert_events([event(destinations=("crm", "billing"))])
    leased = await lease_rooms(store, billing=10)
    assert [d.destination_id for d in leased] == ["billing"]
    probe = await lease_rooms(store, crm=1)
    assert [d.destination_id for d in probe] == ["crm"] and probe[0].attempts == 0


async def lease_rooms(
    store: SqlStore,
    now: int = NOW,
    *,
    limit: int | None = None,
    sending: dict[str, int] | None = None,
    **rooms: int,
) -> list[LeasedDelivery]:
    return await store.lease(
        now_ms=now,
        rooms=rooms,
        limit=limit,
        sending=sending,
        lease_ms=30_000,
        worker_id="w1",
    )


async def test_each_destination_is_leased_up_to_its_own_room(store: SqlStore) -> None:
    """A destination with a `max_in_flight` gets no more than the room its cap leaves, oldest
    first, all under one lease; a destination not named (or with no room) keeps its own."""
    await store.insert_events(
        [event(at=NOW - 30 + n, destinations=("crm", "billing", "erp")) for n in range(3)]
    )
    first = await lease_rooms(store, crm=2, billing=1, erp=0)
    assert sorted(d.destination_id for d in first) == ["billing", "crm", "crm"]
    assert len({d.lease_token for d in first}) == 1  # one lease, one statement's worth
    crm = [d for d in first if d.destination_id == "crm"]
    assert [d.event_id for d in crm] == sorted(d.event_id for d in crm)  # the oldest two
    rest = await lease_rooms(store, crm=5, billing=5)
    assert sorted(d.destination_id for d in rest) == ["billing", "billing", "crm"]
    assert {d.id for d in rest}.isdisjoint(d.id for d in first)
    assert [d.destination_id for d in await lease(store)] == ["erp"] * 3
    assert await lease_rooms(store) == []


async def test_slots_go_first_to_the_destinations_with_the_fewest_in_flight(
    store: SqlStore,
) -> None:
    """Five older deliveries to crm, two newer to billing. With nothing in flight the slots
    alternate between them, oldest first at each turn; with crm already sending three,
    billing's go before crm's older ones; a delivery of higher priority goes before either."""
    crm = [event(at=NOW - 100 + n, destinations=("crm",)) for n in range(5)]
    billing = [event(at=NOW - 50 + n, destinations=("billing",)) for n in range(2)]
    await store.insert_events([*crm, *billing])

    idle = await lease_rooms(store, limit=3, crm=4, billing=4)
    assert sorted(d.event_id for d in idle) == sorted([crm[0].id, billing[0].id, crm[1].id])

    busy = await lease_rooms(store, limit=2, sending={"crm": 3}, crm=4, billing=4)
    assert sorted(d.event_id for d in busy) == sorted([billing[1].id, crm[2].id])

    urgent = event(at=NOW - 10, destinations=("crm",), priority=0)
    late = event(at=NOW - 5, destinations=("billing",))
    await store.insert_events([urgent, late])
    [first] = await lease_rooms(store, limit=1, sending={"crm": 50}, crm=4, billing=4)
    assert first.event_id == urgent.id


async def test_each_freed_slot_goes_first_to_a_destination_waiting_behind_a_backlog(
    store: SqlStore,
) -> None:
    """Leases taken one after another by a worker whose slot frees one at a time, while a
    slow destination has a backlog: every other destination's delivery is taken at the next
    free slot, not after the backlog."""
    backlog = [event(at=NOW - 1000 + n, destinations=("crm",)) for n in range(50)]
    fresh = [event(at=NOW - 10 + n, destinations=(d,)) for n, d in enumerate(["billing", "erp"])]
    await store.insert_events([*backlog, *fresh])
    sending = {"crm": 8}  # every slot of an eight-slot worker is waiting on crm
    taken = [
        (await lease_rooms(store, limit=1, sending=sending, crm=1, billing=1, erp=1))[0]
        for _ in range(3)
    ]
    assert [d.destination_id for d in taken] == ["billing", "erp", "crm"]


async def test_pending_destinations_are_those_with_a_delivery_waiting(store: SqlStore) -> None:
    await store.insert_events(
        [event(destinations=("crm", "billing")), event(at=NOW + 60_000, destinations=("erp",))]
    )
    assert await store.pending_destinations() == {"crm", "billing", "erp"}
    await store.complete(
        [attempt(d, DeliveryState.SUCCEEDED) for d in await lease_rooms(store, billing=5)], NOW
    )
    assert await store.pending_destinations() == {"crm", "erp"}
    await lease_rooms(store, crm=5)  # in flight is not pending
    assert await store.pending_destinations() == {"erp"}


async def test_lease_keeps_an_ordering_key_in_order_and_waits_for_what_is_due(
    store: SqlStore,
) -> None:
    await store.insert_events([keyed("maria", NOW - 20), keyed("maria", NOW - 10)])
    later = event(at=NOW + 5_000, destinations=("crm",))
    await store.insert_events([later])
    [head] = await lease_rooms(store, crm=10)  # maria's second waits for her first
    assert head.ordering_key == "maria"
    await store.complete([attempt(head, DeliveryState.SUCCEEDED)], NOW)
    [second] = await lease_rooms(store, crm=10)
    assert second.ordering_key == "maria" and second.event_id != head.event_id
    assert await lease_rooms(store, crm=10) == []  # the third is due in 5 s
    [due] = await lease_rooms(store, NOW + 5_000, crm=10)
    assert due.event_id == later.id


async def test_one_ordering_key_goes_strictly_one_after_another(store: SqlStore) -> None:
    await store.insert_events(
        [keyed("maria", NOW - 30), keyed("maria", NOW - 20), keyed("joao", NOW - 10)]
    )
    first = await lease(store)
    assert [d.ordering_key for d in first] == ["maria", "joao"]  # maria's second waits
    maria_head = first[0]
    # The head fails and is retried later: it still blocks its key, and only its key.
    await store.complete(
        [attempt(maria_head, DeliveryState.PENDING, kind=OutcomeKind.RETRYABLE)], NOW
    )
    assert await lease(store) == []
    retried = await lease(store, now=NOW + 1000)
    assert [d.id for d in retried] == [maria_head.id]
    await store.complete([attempt(retried[0], DeliveryState.SUCCEEDED)], NOW + 1000)
    [second] = await lease(store, now=NOW + 1000)
    assert second.ordering_key == "maria" and second.event_id != maria_head.event_id


async def test_a_keys_head_holds_it_through_release_snooze_and_rescue_until_it_dies(
    store: SqlStore, other_store: SqlStore
) -> None:
    """Given back at shutdown, snoozed by the rate limit, or rescued by another process
    after its worker died, the head still goes before the rest of its key; once it dies,
    the next one goes."""
    head_event, next_event = keyed("maria", NOW - 20), keyed("maria", NOW - 10)
    await store.insert_events([head_event, next_event])
    [head] = await lease(store)
    assert await store.release([head], NOW) == 1  # a graceful stop
    [head] = await lease(other_store)
    assert await other_store.release([head], NOW, due_at=NOW + 500) == 1  # a snooze
    assert await lease(store) == []
    [head] = await lease(store, now=NOW + 500)
    assert head.event_id == head_event.id
    # Its worker dies; another process rescues it once the lease has passed.
    [rescued] = await other_store.claim_expired(
        now_ms=head.lease_expires_at + 1, lease_ms=30_000, worker_id="w2"
    )
    after = head.lease_expires_at + 1
    assert await lease(store, now=after) == []
    lost = attempt(rescued, DeliveryState.PENDING, kind=OutcomeKind.RETRYABLE)
    assert await other_store.complete([lost], after) == 1
    [head] = await lease(store, now=after)
    assert head.event_id == head_event.id and head.attempts == 1
    await store.complete([attempt(head, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT)], NOW)
    assert [d.event_id for d in await lease(other_store)] == [next_event.id]


async def test_the_same_key_to_another_destination_is_independent(store: SqlStore) -> None:
    await store.insert_events([keyed("maria", NOW - 2, "crm"), keyed("maria", NOW - 1, "billing")])
    assert sorted(d.destination_id for d in await lease(store)) == ["billing", "crm"]


async def test_a_keys_urgent_delivery_waits_for_its_earlier_less_urgent_one(
    store: SqlStore,
) -> None:
    """Priority never reorders a key: Maria's urgent message waits for her earlier routine
    one, which takes its own priority's turn behind the destination's more urgent work."""
    routine = event(at=NOW - 30, ordering_key="maria", priority=4)
    urgent = event(at=NOW - 20, ordering_key="maria", priority=0)
    other = event(at=NOW - 10, priority=1)
    await store.insert_events([routine, urgent, other])
    [first] = await lease_rooms(store, crm=1)
    assert first.event_id == other.id
    [second] = await lease_rooms(store, crm=1)
    assert second.event_id == routine.id
    assert await lease_rooms(store, crm=1) == []  # the urgent one waits for it
    await store.complete([attempt(second, DeliveryState.SUCCEEDED)], NOW)
    assert [d.event_id for d in await lease_rooms(store, crm=1)] == [urgent.id]


async def test_a_replayed_head_waits_for_the_later_delivery_of_its_key_in_flight(
    store: SqlStore,
) -> None:
    """Maria's first message died, so her second went out; replayed while the second is in
    flight, the first must not go out beside it (two of one key at once, answered in any
    order), only once the second is done, and still before her third."""
    first, second, third = (keyed("maria", NOW - 30 + n) for n in range(3))
    await store.insert_events([first, second, third])
    [head] = await lease(store)
    await store.complete([attempt(head, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT)], NOW)
    [sending] = await lease(store)
    assert sending.event_id == second.id
    replayed = DeadLetterFilter(delivery_ids=(head.id,))
    assert await store.replay(replayed, actor="t", now_ms=NOW) == [head.id]
    assert await lease(store) == []
    await store.complete([attempt(sending, DeliveryState.SUCCEEDED)], NOW)
    assert [d.event_id for d in await lease(store)] == [first.id]


async def test_a_key_stored_out_of_id_order_never_has_two_in_flight(store: SqlStore) -> None:
    """Two `serve` processes on machines whose clocks differ a little: one stores a
    delivery of the key with an id earlier than the other's, already in flight. It waits
    for that one instead of going out beside it."""
    later = keyed("maria", NOW)
    await store.insert_events([later])
    [sending] = await lease(store)
    earlier = keyed("maria", NOW - 50)  # the other machine's clock is 50 ms behind
    await store.insert_events([earlier])
    assert await lease(store) == []
    await store.complete([attempt(sending, DeliveryState.SUCCEEDED)], NOW)
    assert [d.event_id for d in await lease(store)] == [earlier.id]


async def test_a_snoozed_delivery_is_due_later_without_an_attempt(store: SqlStore) -> None:
    await store.insert_events([event()])
    [leased] = await lease(store)
    assert await store.release([leased], NOW, due_at=NOW + 5000) == 1
    assert await lease(store, now=NOW + 4999) == []
    [again] = await lease(store, now=NOW + 5000)
    assert again.attempts == 0


async def test_circuit_state_is_read_modify_written_atomically(store: SqlStore) -> None:
    def bump(before: dict[str, object] | None) -> dict[str, object]:
        count = before["failures"] if before else 0
        assert isinstance(count, int)
        return {"failures": count + 1}

    await asyncio.gather(*(store.update_circuit("crm", bump, NOW) for _ in range(20)))
    assert await store.circuit_states() == {"crm": {"failures": 20}}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgresql_sessions_never_jit_compile(store: SqlStore) -> None:
    """The lease's per-destination LIMIT is a guess to the planner; costed on it, the lease
    was JIT-compiled on every run (0.4 s a lease at 1,000,000 waiting). Every session the
    store opens, kept or pooled, has JIT off."""
    await store.insert_events([event()])
    await lease_rooms(store, crm=1)  # opens a kept connection
    async with store.engine.connect() as conn:
        assert (await conn.execute(text("SHOW jit"))).scalar_one() == "off"
    from estafeta.store.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    async with store._held.driver() as driver:  # the hot path's own connection
        assert await driver.fetchval("SHOW jit") == "off"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_connections_the_server_closed_are_replaced_not_reported_as_bugs(
    store: SqlStore, database_url: str
) -> None:
    """The hot paths bypass SQLAlchemy's disconnect handling (postgres.py): a pooled
    connection the server terminated must give StoreUnavailable at worst, then be replaced."""
    await store.insert_events([event("before")])
    [leased] = await lease_rooms(store, crm=10)  # on the kept connection alone
    admin = await asyncpg.connect(database_url)
    try:
        terminated = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    assert terminated >= 1

    failures = 0

    async def replaced(operation: Callable[[], Awaitable[T]]) -> T:
        # Each terminated connection fails one statement at most, as StoreUnavailable, and
        # is gone from the pool after it: as many tries as connections were ended.
        nonlocal failures
        while True:
            try:
                return await operation()
            except StoreUnavailable:
                failures += 1
                assert failures <= terminated, f"{failures} failures, {terminated} ended"

    [stored] = await replaced(lambda: store.insert_events([event("after")]))
    assert not stored.duplicate
    assert (
        await replaced(lambda: store.complete([attempt(leased, DeliveryState.SUCCEEDED)], NOW)) == 1
    )
    assert len(await replaced(lambda: lease_rooms(store, crm=10))) == 1  # stored after the cut


async def test_a_lease_never_walks_another_destinations_backlog(store: SqlStore) -> None:
    """crm is down with 20,000 deliveries waiting (its circuit open, so the worker leaves it
    out): a lease of billing reads billing's rows, not crm's. (Given an index of all pending
    deliveries by priority, PostgreSQL chose it for such a lease with 200,000 waiting and
    read them all: migration 0005 dropped it.)"""
    [stuck] = await store.insert_events([event(destinations=("crm",))])
    await store.insert_events([event(destinations=("billing",))])
    async with store.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO deliveries (id, tenant_id, event_id, destination_id, state,"
                " priority, max_attempts, next_attempt_at, created_at, updated_at)"
                " WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)"
                " SELECT 'dlv_backlog_' || i, 'clinica-sol', :event, 'crm', 'pending', 2, 3,"
                " CAST(:at AS BIGINT) + i, :at, :at FROM n"
            ),
            {"event": stuck.event_id, "at": NOW - 50_000},
        )
        await conn.execute(
            text("ANALYZE deliveries" if store.dialect == "postgresql" else "ANALYZE")
        )
    params = {
        "now": NOW,
        "token": "t",
        "deadline": NOW + 60_000,
        "worker": "w",
        "limit": 10,
        "destinations": ["billing"],
        "rooms": [10],
        "sending": [0],
    }
    if store.dialect == "sqlite":
        params["rooms"] = '[["billing", 10, 0]]'
        plan = "\n".join(await explain_sql(store, store.lease_sql, params))
        assert "USING INDEX deliveries_destination_due (destination_id=?" in plan, plan
        assert "SCAN d\n" not in plan + "\n" and "SCAN c\n" not in plan + "\n", plan
        return
    read = rows_read(await explain_sql(store, store.lease_sql, params))["deliveries"]
    assert 1 <= read <= 10, read


async def test_a_migration_may_take_longer_than_any_statement_may(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Statements are cut off after `COMMAND_TIMEOUT_S` (a request must not hang on a stuck
    database), but a migration may rightly take longer: an index built over millions of
    deliveries, or a wait for another process's migration. Here a second process holds the
    migration lock for longer than the (shortened) statement limit."""
    from estafeta.store import migrate as migrations
    from estafeta.store import postgres

    monkeypatch.setattr(postgres, "COMMAND_TIMEOUT_S", 0.5)
    slow = open_store(postgres_url)  # statements are time-limited on PostgreSQL only
    other = await asyncpg.connect(postgres_url)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", migrations._MIGRATION_LOCK)

        async def release_later() -> None:  # three statement limits after the wait began
            await asyncio.sleep(1.5)
            await other.execute("SELECT pg_advisory_unlock($1)", migrations._MIGRATION_LOCK)

        releasing = asyncio.create_task(release_later())
        await slow.migrate()  # waits for the lock, then finds nothing to do
        await releasing
    finally:
        await other.close()
        await slow.close()


async def stored_and_repeated_beside_a_send(
    store: SqlStore, many: int
) -> tuple[list[NewEvent], NewEvent, list[NewEvent]]:
    """`many` webhooks stored, a message queued through the API, and a provider's resend of
    every one of the webhooks: the send puts the repeats' batch on the general path."""
    originals = [event(f"wamid.{n}", destinations=()) for n in range(many)]
    for start in range(0, many, 1000):
        await store.insert_events(originals[start : start + 1000])
    send = replace(
        event(None),
        conversation_id="5511999999999",
        message=NewMessage(
            id="msg_repeats", source_id="crm-events", recipient="+5511999999999", content="{}"
        ),
    )
    return originals, send, [event(f"wamid.{n}", destinations=()) for n in range(many)]


@pytest.mark.timeout(120)
async def test_a_queued_message_among_thousands_of_repeated_keys_is_answered_in_one_batch(
    store: SqlStore,
) -> None:
    """A message queued through the API shares a batch with providers' retries of large
    webhooks (eleven Meta retries of 1,000 statuses each): the batch goes through the general
    transaction, whose read of the repeats' originals was one `(tenant, source, key) IN` of
    every key. PostgreSQL failed it past ~10,000 keys (54001 "stack depth limit exceeded"),
    and SQLite past its 32,766 variables: the whole batch failed instead of being answered."""
    originals, send, repeats = await stored_and_repeated_beside_a_send(store, 11_000)
    results = await store.insert_events([send, *repeats])
    assert results[0] == InsertResult(send.id, duplicate=False)
    assert [r.event_id for r in results[1:]] == [o.id for o in originals]
    assert all(r.duplicate for r in results[1:])


async def test_a_batch_of_repeats_reads_their_originals_once(store: SqlStore) -> None:
    """The general path (here for a queued message) answers a provider's resent burst:
    PostgreSQL's batch statement names each repeat's original, SQLite's insert reads them
    before inserting. Each then read every one of them again, a second lookup of thousands
    of keys already answered (seconds a batch on stale statistics)."""
    originals, send, repeats = await stored_and_repeated_beside_a_send(store, 2_000)
    with statements_ran(store.engine) as ran:
        results = await store.insert_events([send, *repeats])
    assert [r.event_id for r in results[1:]] == [o.id for o in originals]
    reads = [sql for sql, _ in ran if "idempotency_key" in sql and "INSERT" not in sql]
    # PostgreSQL: none beside the batch statement; SQLite: one read, 1,000 keys a statement.
    assert len(reads) == (0 if store.dialect == "postgresql" else 2), reads


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_originals_of_thousands_of_keys_are_read_by_their_index_on_stale_statistics(
    store: SqlStore,
) -> None:
    """The originals of keys a batch statement could not name, and of keys the spool holds
    behind theirs (hub.py), are read by key. On statistics taken while the table was small,
    a `(tenant, source, key) IN (…)` list of 1,000 keys was planned as a scan of the table
    (262 ms a list at 11,000 events, against 3 ms once analysed): seconds for a batch of a
    provider's resent burst."""
    many = 3_000
    async with store.engine.begin() as conn:  # no analysis but the test's own
        await conn.execute(text("ALTER TABLE events SET (autovacuum_enabled = false)"))
    try:
        await store.insert_events([event(f"early.{n}", destinations=()) for n in range(20)])
        async with store.engine.connect() as conn:
            await conn.execute(text("ANALYZE events"))
            await conn.commit()
        originals = [event(f"wamid.{n}", destinations=()) for n in range(many)]
        for start in range(0, many, 1000):
            await store.insert_events(originals[start : start + 1000])
        with statements_ran(store.read_engine) as ran:
            found = await store.stored_ids_by_key(originals)
        assert found == {(o.tenant_id, o.source_id, o.idempotency_key): o.id for o in originals}
        plans = [await explain_ran(store, sql, parameters) for sql, parameters in ran]
    finally:
        async with store.engine.begin() as conn:
            await conn.execute(text("ALTER TABLE events RESET (autovacuum_enabled)"))
    assert plans
    for plan in plans:  # each key's row, found by the key's index
        assert_walks_only(store, plan, "events", {"events_idempotency_key"}, many)
    assert sum(rows_read(plan)["events"] for plan in plans) == many


async def test_a_repeated_send_finds_its_message_by_an_index(store: SqlStore) -> None:
    """A repeated `POST /api/v1/messages` is answered with its original message, and a
    repeated keyed `POST /api/v1/events` is checked against a send that used its key: each
    asks which message an event is the send of, and read every message ever sent to know."""
    sends = [
        replace(
            event(f"send-{n}", destinations=("send:crm-events",)),
            conversation_id=f"55119{n:08d}",
            message=NewMessage(
                id=f"msg_{n}", source_id="crm-events", recipient=f"+55119{n:08d}", content="{}"
            ),
        )
        for n in range(2_000)
    ]
    for start in range(0, len(sends), 500):
        await store.insert_events(sends[start : start + 500])
    async with store.engine.begin() as conn:
        await conn.execute(text("ANALYZE messages" if store.dialect == "postgresql" else "ANALYZE"))
    with statements_ran(store.read_engine) as ran:
        assert await store.message_id_for_event(sends[1234].id) == "msg_1234"
    [(sql, parameters)] = [(sql, p) for sql, p in ran if "messages" in sql]
    plan = await explain_ran(store, sql, parameters)
    assert_walks_only(store, plan, "messages", {"messages_event"}, 1)


@pytest.mark.timeout(120)
async def test_a_worker_at_its_largest_concurrency_gives_every_lease_back(
    store: SqlStore,
) -> None:
    """A worker stopping with `concurrency = 10000` sends unfinished gives back up to 10,000
    leases in one call: as one `(id, lease_token) IN` list PostgreSQL failed it (54001
    "stack depth limit exceeded"), and every one of them then waited for its lease to
    expire and was charged an attempt never made."""
    many = 10_000
    for _ in range(0, many, 1000):
        await store.insert_events([event() for _ in range(1000)])
    leased: list[LeasedDelivery] = []
    while len(leased) < many:
        leased += await lease(store, limit=1000)
    assert await store.release(leased, NOW) == many
    assert (await store.queue_stats()).by_state == {"pending": many}


def hosting_config(database_url: str, tenants: int) -> Config:
    """A hosting provider's configuration: `tenants` clinics, each with two sources, two
    destinations and two routes."""
    data = base_config(database_url, tenants=[], sources=[], destinations=[], routes=[])
    for t in range(tenants):
        tenant = f"clinic-{t}"
        data["tenants"].append({"id": tenant, "name": f"Clinic {t}"})
        data["sources"] += [
            {"id": f"{tenant}-crm", "tenant": tenant, "kind": "generic", "api_key": f"k-{t}"},
            {"id": f"{tenant}-wa", "tenant": tenant, "kind": "whatsapp_cloud", "app_secret": "s"},
        ]
        data["destinations"] += [
            {"id": f"{tenant}-{d}", "tenant": tenant, "url": f"http://127.0.0.1:9/{t}/{d}"}
            for d in ("crm", "billing")
        ]
        data["routes"] += [
            {
                "id": f"{tenant}-{d}",
                "tenant": tenant,
                "events": ["*"],
                "filter": "data.status != 'draft'",
                "destinations": [f"{tenant}-{d}"],
            }
            for d in ("crm", "billing")
        ]
    return load_config_dict(data)


async def test_the_configuration_is_synced_in_a_few_statements_however_large(
    store: SqlStore, database_url: str
) -> None:
    """A hub serving hundreds of clinics syncs thousands of rows at every start: one
    statement each took 6 s for 300 clinics (1,500 destinations, 3,000 routes) on either
    engine before the hub served. One statement per table, whatever the row count."""
    config = hosting_config(database_url, 200)
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    sa_event.listen(store.engine.sync_engine, "before_cursor_execute", count)
    try:
        await store.sync_config(config, NOW)
        moved = config.model_copy(
            update={
                "destinations": [
                    d.model_copy(update={"url": d.url.replace(":9/", ":8080/")})
                    for d in config.destinations
                    if d.url is not None
                ]
            }
        )
        await store.sync_config(moved, NOW + 1)  # a restart on a changed file updates them
    finally:
        sa_event.remove(store.engine.sync_engine, "before_cursor_execute", count)
    # Per sync: one per table, SQLite's BEGIN IMMEDIATE, and the read of the stored URLs
    # (any stored whole by an earlier version are outlined: none here).
    assert len(statements) <= 2 * 6, statements[:12]
    async with store.engine.connect() as conn:
        counted = {
            table.name: (await conn.execute(select(func.count()).select_from(table))).scalar()
            for table in (s.tenants, s.sources, s.destinations, s.routes)
        }
        urls = (await conn.execute(select(s.destinations.c.url))).scalars().all()
    # The base configuration's rows are kept (sync upserts, it never deletes).
    assert counted == {"tenants": 202, "sources": 403, "destinations": 403, "routes": 403}
    assert sum(url == "http://127.0.0.1:8080/…" for url in urls) == 400


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("by_id", [False, True], ids=["webhooks", "general"])
async def test_a_key_another_process_commits_while_the_batch_waits_is_answered_with_it(
    store: SqlStore, database_url: str, by_id: bool
) -> None:
    """Another process stores a key while this batch waits for it: the batch statement's
    snapshot predates that commit, so its original is read afterwards (on the general path,
    inside the same transaction: a statement of its own sees it)."""
    async with store.engine.connect() as holder:
        await holder.execute(held_key_insert("c"))
        batch = [event("a"), event("c"), event("a"), event("c")]
        storing = asyncio.ensure_future(store.insert_events(batch, by_id=by_id))
        await until_waiting_for_locks(database_url, 1)
        await holder.commit()
    results = await asyncio.wait_for(storing, timeout=10)
    assert [r.duplicate for r in results] == [False, True, True, True]
    assert results[1].event_id == results[3].event_id == "evt_held"
    assert results[2].event_id == results[0].event_id

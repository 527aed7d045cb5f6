"""What /metrics, /health/detailed and the dead-letter queue read on every scrape or listing
walks the queue (pending, in flight, dead), never the history the store keeps growing: the
store's own queries, explained by the engine on a store where nearly every delivery ever
made has succeeded."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import insert, text

from estafeta.delivery.state import QUEUE_STATES, DeliveryState
from estafeta.store import schema as s
from estafeta.store.dead_letters import dead_list_query
from estafeta.store.records import DeadLetterFilter
from estafeta.store.sqlstore import SqlStore
from estafeta.store.views import (
    QUEUE_COUNT_LIMIT,
    earliest_due_query,
    queue_depths_query,
    queue_stats_query,
)
from tests.integration.plans import assert_walks_only, explain, explain_sql, rows_read

DELIVERIES = 6_000
T0 = 1_751_371_200_000
# The indexes that hold one state of the queue each (schema.py).
QUEUE_INDEXES = {"deliveries_destination_due", "deliveries_lease_expiry", "deliveries_dead"}


def _state(n: int) -> str:
    """Nearly all succeeded; a few of each other state, dead among them."""
    if n % 100 == 1:
        return "dead"
    if n % 100 == 2:
        return "pending"
    if n % 500 == 3:
        return "in_flight"
    if n % 700 == 4:
        return "discarded"
    return "succeeded"


@pytest.fixture
async def history(store: SqlStore) -> list[dict[str, Any]]:
    return await _stored(store, _state, lambda n: "appointment.booked" if n % 3 == 0 else None)


async def _stored(
    store: SqlStore,
    state_of: Callable[[int], str],
    type_of: Callable[[int], str | None],
    destination_of: Callable[[int], str] = lambda n: "crm" if n % 2 else "billing",
) -> list[dict[str, Any]]:
    """DELIVERIES events of two tenants (`type_of` each, else lead.created), one delivery
    each, in `state_of`; statistics then gathered as a hub's store has them: PostgreSQL's
    (autovacuum analyzes a table as it grows), none on SQLite (nothing runs ANALYZE there,
    and its planner, taking every index for as large as the table, preferred walking every
    delivery by deliveries_tenant_state to a partial index of the queue)."""
    events = [
        {
            "id": f"evt_{n:06d}",
            "tenant_id": "outra" if n % 4 == 0 else "clinica-sol",
            "source_id": "crm-events",
            "type": type_of(n) or "lead.created",
            "idempotency_key": None,
            "occurred_at": T0 + n,
            "received_at": T0 + n,
            "payload": "{}",
            "raw": None,
        }
        for n in range(DELIVERIES)
    ]
    deliveries = [
        {
            "id": f"dlv_{n:06d}",
            "tenant_id": events[n]["tenant_id"],
            "event_id": events[n]["id"],
            "destination_id": destination_of(n),
            "state": state_of(n),
            "priority": 2,
            "attempts": 1,
            "max_attempts": 5,
            "next_attempt_at": T0 + n,
            "lease_token": "tok" if state_of(n) == "in_flight" else None,
            "lease_expires_at": T0 + n + 30_000 if state_of(n) == "in_flight" else None,
            "created_at": T0 + n,
            "updated_at": T0 + n,
        }
        for n in range(DELIVERIES)
    ]
    async with store.engine.begin() as conn:
        await conn.execute(insert(s.events), events)
        await conn.execute(insert(s.deliveries), deliveries)
        if store.dialect == "postgresql":
            await conn.execute(text("ANALYZE"))
    return deliveries


async def test_the_queues_counts_read_the_queue_not_the_history(
    store: SqlStore, history: list[dict[str, Any]]
) -> None:
    everything = Counter(d["state"] for d in history)
    queue = {state.value: everything[state.value] for state in QUEUE_STATES}
    assert (await store.queue_stats()).by_state == queue
    assert (await store.queue_stats(history=True)).by_state == dict(everything)
    sol = Counter(d["state"] for d in history if d["tenant_id"] == "clinica-sol")
    assert (await store.queue_stats("clinica-sol")).by_state == {
        state.value: sol[state.value] for state in QUEUE_STATES
    }
    assert (await store.queue_stats()).oldest_pending_at == min(
        d["next_attempt_at"] for d in history if d["state"] == "pending"
    )

    in_the_queue = sum(queue.values())
    assert in_the_queue < DELIVERIES // 20  # the history is what there is most of
    plan = await explain(
        store, queue_stats_query(None, QUEUE_STATES, QUEUE_COUNT_LIMIT, store.dialect)
    )
    assert_walks_only(store, plan, "deliveries", QUEUE_INDEXES, in_the_queue)
    plan = await explain(
        store, queue_stats_query("clinica-sol", QUEUE_STATES, QUEUE_COUNT_LIMIT, store.dialect)
    )
    assert_walks_only(
        store, plan, "deliveries", QUEUE_INDEXES | {"deliveries_tenant_state"}, in_the_queue
    )


async def test_the_alerts_counts_read_the_queue_only(
    store: SqlStore, history: list[dict[str, Any]]
) -> None:
    # Asked every 5 s by each serve's alert monitor, however long the history grows.
    everything = Counter(d["state"] for d in history)
    depths = await store.queue_depths()
    assert (depths.pending, depths.in_flight, depths.dead) == (
        everything["pending"],
        everything["in_flight"],
        everything["dead"],
    )
    plan = await explain(store, queue_depths_query(store.dialect, QUEUE_COUNT_LIMIT))
    assert_walks_only(
        store,
        plan,
        "deliveries",
        QUEUE_INDEXES,
        everything["pending"] + everything["in_flight"] + everything["dead"],
    )


async def test_an_outages_backlog_is_counted_to_a_bound_and_estimated_past_it(
    store: SqlStore,
) -> None:
    """A destination down for hours leaves a million pending deliveries: /metrics and
    /health/detailed counted every one on each scrape (0.35 s at a million, growing with the
    backlog, past the reads' 3 s bound near ten million, the gauge then missing). Each state
    is counted to a bound; past it PostgreSQL's estimate, and the state is said `estimated`;
    the earliest due time is found by a few probes of the lease's index."""
    stored = await _stored(
        store, lambda n: "pending" if n % 10 else "dead", lambda n: None
    )  # 5,400 pending of two destinations, 600 dead
    pending = [d for d in stored if d["state"] == "pending"]
    stats = await store.queue_stats(counted_to=1000)
    assert stats.estimated == {"pending"}
    assert stats.oldest_pending_at == min(d["next_attempt_at"] for d in pending)
    assert stats.by_state["dead"] == 600  # under the bound: exact
    if store.dialect == "postgresql":  # the engine's estimate, from its ANALYZE
        assert stats.by_state["pending"] == pytest.approx(len(pending), rel=0.1)
    else:  # a floor
        assert stats.by_state["pending"] == 1000
    # The alerts ask no more than their thresholds need.
    depths = await store.queue_depths(1000)
    assert (depths.pending, depths.dead) == (1000, 600)

    for query in (
        queue_stats_query(None, QUEUE_STATES, 1000, store.dialect),
        queue_depths_query(store.dialect, 1000),
    ):
        plan = await explain(store, query)
        if store.dialect == "postgresql":
            # Where nearly every row is pending, the first 1,000 of a scan are as good as
            # an index's: bounded either way.
            assert rows_read(plan)["deliveries"] <= 2 * (1000 + 600), plan
        else:
            assert_walks_only(store, plan, "deliveries", QUEUE_INDEXES, 1000 + 600)
    plan = await explain_sql(store, str(earliest_due_query(None)))
    # Each of the two destinations found, then its first due of each priority.
    assert_walks_only(store, plan, "deliveries", {"deliveries_destination_due"}, 2 * 2 + 2 * 5)


@pytest.mark.parametrize(
    "selection",
    [
        DeadLetterFilter(limit=1000),
        DeadLetterFilter(destination_id="crm", limit=1000),
        DeadLetterFilter(event_type="appointment.booked", limit=1000),
        DeadLetterFilter(since=T0 + DELIVERIES // 2, limit=1000),
        DeadLetterFilter(tenant_id="clinica-sol", limit=1000),
    ],
    ids=["all", "destination", "type", "since", "tenant"],
)
async def test_a_dead_letter_listing_reads_the_dead_ones_only(
    store: SqlStore, history: list[dict[str, Any]], selection: DeadLetterFilter
) -> None:
    dead = [d for d in history if d["state"] == DeliveryState.DEAD.value]
    listed = await store.list_dead(selection)
    assert listed and {v.state for v in listed} == {"dead"}
    assert [v.updated_at for v in listed] == sorted(v.updated_at for v in listed)
    plan = await explain(store, dead_list_query(selection))
    assert_walks_only(
        store,
        plan,
        "deliveries",
        {"deliveries_dead", "deliveries_dead_destination", "deliveries_tenant_state"},
        len(dead),
        sorts=True,
    )


async def test_a_page_of_dead_deliveries_after_a_cursor_reads_only_that_page(
    store: SqlStore, history: list[dict[str, Any]]
) -> None:
    # The HTTP list's `next` names the last row's (updated_at, id); deep in a long DLQ the
    # next page must start there, not walk every dead delivery before it.
    dead = sorted((d["updated_at"], d["id"]) for d in history if d["state"] == "dead")
    middle = dead[len(dead) // 2]
    page = DeadLetterFilter(limit=5, after=middle)
    listed = await store.list_dead(page)
    assert [(v.updated_at, v.id) for v in listed] == dead[len(dead) // 2 + 1 :][:5]
    plan = await explain(store, dead_list_query(page))
    assert_walks_only(store, plan, "deliveries", {"deliveries_dead"}, 5)


async def test_a_page_of_dead_deliveries_of_one_type_never_reads_every_event(
    store: SqlStore,
) -> None:
    """After an outage a tenth of the deliveries are dead, and the operator lists those of
    one type (`dlq list --event-type`, GET /api/v1/dlq?event_type=): SQLite read the ids of
    every event of the type, a scan of all the events the store keeps, for each page (and
    each batch of a replay by type). A page reads the dead ones, each event by its key."""
    stored = await _stored(
        store,
        lambda n: "dead" if n % 10 == 1 else "succeeded",
        lambda n: "appointment.booked" if n % 7 == 1 else None,
    )
    page = DeadLetterFilter(event_type="appointment.booked", limit=20)
    listed = await store.list_dead(page)
    booked = [d for d in stored if d["state"] == "dead" and int(d["id"][4:]) % 7 == 1]
    assert [v.id for v in listed] == [d["id"] for d in booked][:20]
    plan = await explain(store, dead_list_query(page))
    assert_walks_only(store, plan, "deliveries", {"deliveries_dead"}, len(booked) * 7)
    assert_walks_only(store, plan, "events", {"events_pkey", "sqlite_autoindex_events_1"}, 200)


async def test_a_page_of_one_destinations_dead_deliveries_reads_only_those(
    store: SqlStore,
) -> None:
    """After crm's outage its dead deliveries fill the queue, and the operator lists billing's
    few (`dlq list --destination billing`, GET /api/v1/dlq?destination=, each batch of a
    replay): that walked every dead delivery for billing's, or on PostgreSQL, billing being
    small, every delivery the store keeps. A destination's dead ones are a range."""
    stored = await _stored(
        store,
        lambda n: "dead" if n % 10 == 1 or n % 300 == 7 else "succeeded",
        lambda n: None,
        lambda n: "billing" if n % 100 == 7 else "crm",
    )
    billing = [d for d in stored if d["destination_id"] == "billing" and d["state"] == "dead"]
    assert 0 < len(billing) * 20 < sum(d["state"] == "dead" for d in stored)
    page = DeadLetterFilter(destination_id="billing", limit=1000)
    assert [v.id for v in await store.list_dead(page)] == [d["id"] for d in billing]
    plan = await explain(store, dead_list_query(page))
    assert_walks_only(store, plan, "deliveries", {"deliveries_dead_destination"}, len(billing))
    # A page after a cursor, as the next batch of a replay reads it, starts there.
    after = DeadLetterFilter(
        destination_id="billing", limit=5, after=(billing[9]["updated_at"], billing[9]["id"])
    )
    assert [v.id for v in await store.list_dead(after)] == [d["id"] for d in billing[10:15]]
    plan = await explain(store, dead_list_query(after))
    assert_walks_only(store, plan, "deliveries", {"deliveries_dead_destination"}, 5)

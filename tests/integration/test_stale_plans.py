"""The plans PostgreSQL keeps for the rescue's and the queue's reads still read indexes once a
fresh database's tables are large.

PostgreSQL plans a prepared statement (asyncpg prepares every one) for the tables as they
are, and keeps the plan: one without parameters for good, one with parameters once a generic
plan costs less than the plans it made per run, which on a nearly empty table it does at the
sixth run. Until an ANALYZE replaces it, a plan made while a new database was empty is the
plan of every run as the backlog grows. With the table never analysed (autovacuum off, as it
is between its rounds), these tests make the statements' plans on a nearly empty table, fill
it, and read the plan the store's own connection keeps for each (plans.py: `kept_plan`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import text

from estafeta.store.sqlstore import SqlStore
from tests.conftest import lease_any
from tests.integration.plans import kept_plan, plan_nodes, rows_read
from tests.integration.store_support import NOW, event

NAMES = ("crm", "billing", "outra-sink")
PENDING = 30_000  # events, three deliveries each
TABLES = ("events", "deliveries", "attempts")


@asynccontextmanager
async def never_analysed(store: SqlStore) -> AsyncIterator[None]:
    """Autovacuum kept off the tables meanwhile: its ANALYZE would replace the kept plans.
    Set before any plan is made (the ALTER itself replaces them)."""
    async with store.engine.begin() as conn:
        for table in TABLES:
            await conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    try:
        yield
    finally:
        async with store.engine.begin() as conn:
            for table in TABLES:
                await conn.execute(text(f"ALTER TABLE {table} RESET (autovacuum_enabled)"))


async def fill(store: SqlStore, at: int) -> None:
    """PENDING events with a pending delivery to each of NAMES, due from `at`: one
    statement each, as a burst of webhooks would leave them (in a few seconds, not minutes)."""
    async with store.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO events (id, tenant_id, source_id, type, occurred_at, received_at,"
                " payload) SELECT 'evt_fill_' || n, 'clinica-sol', 'crm-events',"
                " 'message.received', CAST(:at AS bigint) + n, CAST(:at AS bigint) + n, '{}'"
                " FROM generate_series(1, :count) AS n"
            ),
            {"at": at, "count": PENDING},
        )
        await conn.execute(
            text(
                "INSERT INTO deliveries (id, tenant_id, event_id, destination_id, state,"
                " priority, max_attempts, next_attempt_at, created_at, updated_at)"
                " SELECT 'dlv_fill_' || n || '_' || d, 'clinica-sol', 'evt_fill_' || n, d,"
                " 'pending', 2, 3, CAST(:at AS bigint) + n, CAST(:at AS bigint) + n,"
                " CAST(:at AS bigint) + n"
                " FROM generate_series(1, :count) AS n, unnest(CAST(:names AS text[])) AS d"
            ),
            {"at": at, "count": PENDING, "names": list(NAMES)},
        )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_rescue_reads_the_expired_leases_not_every_delivery_once_the_table_is_large(
    store: SqlStore,
) -> None:
    """The claim of expired leases named the in-flight state as a parameter, which a plan
    made for any value cannot match to the partial index of in-flight rows: the generic plan
    made on a nearly empty table read the whole table, at every rescue round (each 5 s, each
    worker): 24 ms at 300,000 deliveries against 1, growing with the history kept."""
    async with never_analysed(store):
        await store.insert_events([event(at=NOW + n, destinations=NAMES) for n in range(10)])
        leased = await lease_any(store, now_ms=NOW, limit=3, lease_ms=1)
        for n in range(8):  # custom plans for five runs, then the generic one, kept
            claimed = await store.claim_expired(now_ms=NOW + 10 + n, lease_ms=1, worker_id="r")
            assert sorted(d.id for d in claimed) == sorted(d.id for d in leased)
        await fill(store, NOW + 1_000)

        plan = await kept_plan(store, "WITH expired AS")

        # By the index of in-flight deliveries (a plan run with NULLs reads nothing, so
        # what it would read is told by the plan's nodes).
        nodes = plan_nodes(plan)
        assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], _summary(nodes)
        assert "deliveries_lease_expiry" in {n.get("Index Name") for n in nodes}, _summary(nodes)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_destinations_waiting_are_found_by_probes_not_a_walk_of_the_backlog(
    store: SqlStore,
) -> None:
    """The destinations with a pending delivery (each rescue round, and each poll of a worker
    with Redis-shared rate limits) and the queue's earliest due time (each /metrics scrape)
    are found one index probe per destination. The statements have no parameters, so their
    plan is the one made at their first run: made on a nearly empty table, the first step
    was a `min()` over a walk of the whole pending index, every pending delivery at each call
    (17 ms at 100,000 waiting, against 0.5)."""
    async with never_analysed(store):
        await store.insert_events([event(at=NOW + n, destinations=NAMES) for n in range(10)])
        assert await store.pending_destinations() == set(NAMES)
        assert (await store.queue_stats()).oldest_pending_at == NOW
        await fill(store, NOW + 1_000)

        # pending_destinations, then queue_stats' earliest due time
        for start in ("WITH RECURSIVE", "\n    WITH RECURSIVE"):
            plan = await kept_plan(store, start)
            # A probe or two per destination (and priority), not the 90,000 pending.
            assert rows_read(plan)["deliveries"] <= 100, _summary(plan_nodes(plan))


def _summary(nodes: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (n["Node Type"], n.get("Index Name"), n.get("Actual Rows"), n.get("Actual Loops"))
        for n in nodes
    ]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_making_an_orphans_retries_due_reads_its_pending_deliveries_only(
    store: SqlStore,
) -> None:
    """Each rescue round makes the retries of destinations no process names due now
    (`due_now`); it named the pending state as a parameter, and so, planned for any state
    once the statement had run five times on a nearly empty table, read every delivery."""
    async with never_analysed(store):
        await store.insert_events([event(at=NOW + n, destinations=NAMES) for n in range(10)])
        for n in range(8):  # custom plans for five runs, then the generic one, kept
            assert await store.due_now({"gone"}, NOW + n) == 0
        await fill(store, NOW + 1_000)

        plan = await kept_plan(store, "UPDATE deliveries SET next_attempt_at")

        nodes = plan_nodes(plan)
        assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], _summary(nodes)
        assert "deliveries_destination_due" in {n.get("Index Name") for n in nodes}, _summary(nodes)

"""A key's backlog behind its head in flight costs a lease a walk, not a probe per row.

A lease reads a destination's due deliveries in order and keeps, of those with an ordering key,
only the first of each key. Asked per row, that question cost PostgreSQL a probe of
deliveries_ordering for every waiting delivery it walked past: with one key of 20,000 waiting
behind a delivery in flight, a lease took 700 ms, for each delivery of the key in turn. The
lease now joins each row to its key's first, which PostgreSQL memoizes by key. The store's own
statement, run and explained by PostgreSQL (then rolled back: tests/integration/plans.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from estafeta.store.sqlstore import SqlStore
from tests.conftest import lease_any
from tests.integration.plans import explain_sql, plan_nodes, read
from tests.integration.store_support import NOW, event, keyed

WAITING = 3_000


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_lease_probes_a_keys_first_once_not_once_per_waiting_delivery(
    store: SqlStore,
) -> None:
    await store.insert_events([keyed("maria", NOW + n) for n in range(WAITING)])
    others = [event(at=NOW + WAITING + n) for n in range(5)]  # unkeyed, due after the key's
    await store.insert_events(others)
    [head] = await lease_any(store, now_ms=NOW, limit=1)  # maria's first, now in flight
    assert head.ordering_key == "maria"

    async with store.engine.begin() as conn:
        await conn.execute(text("ANALYZE deliveries"))
    params = {
        "now": NOW + 10 * WAITING,
        "token": "t",
        "deadline": NOW + 10 * WAITING + 30_000,
        "worker": "w",
        "limit": 100,
        "destinations": ["crm"],
        "rooms": [100],
        "sending": [1],
    }
    plan = await explain_sql(store, store.lease_sql, params)

    # What it takes: the others, and none of maria's while her first is in flight.
    leased = await store.lease(
        now_ms=NOW + 10 * WAITING, rooms={"crm": 100}, lease_ms=30_000, worker_id="w"
    )
    assert sorted(d.id for d in leased) == sorted(e.deliveries[0].id for e in others)
    nodes = plan_nodes(plan)

    def probes() -> int:
        """How many times the statement read deliveries other than by the walk itself."""
        return sum(
            n["Actual Loops"]
            for n in nodes
            if n.get("Relation Name") == "deliveries"
            and n.get("Index Name") != "deliveries_destination_due"
        )

    def walked(index: str) -> int:
        return sum(read(n) for n in nodes if n.get("Index Name") == index)

    # Both scans walked maria's waiting deliveries...
    assert walked("deliveries_destination_due") >= 2 * (WAITING - 1), _summary(nodes)
    # ...asking for her first a few times, not once per delivery walked.
    assert probes() <= 20, _summary(nodes)


def _summary(nodes: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (n["Node Type"], n.get("Index Name"), n.get("Actual Rows"), n.get("Actual Loops"))
        for n in nodes
    ]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_lease_first_run_on_a_small_table_still_reads_indexes_once_it_is_large(
    store: SqlStore,
) -> None:
    """A prepared statement's plan is made for the table as it was. After five runs
    PostgreSQL keeps a generic plan once it costs less than the average of the plans it made
    per run: one made while the table was nearly empty costs little, and once the runs on a
    large backlog had raised that average it was kept for good (until an ANALYZE): each lease
    then read every delivery and hashed every event, 80–230 ms instead of ~3. A fresh
    database meeting its first burst drained at a third of its speed (bench/, fan-out 3)."""
    names = ("crm", "billing", "sheets")
    rooms = dict.fromkeys(names, 100)
    await store.insert_events([event(at=NOW + n, destinations=names) for n in range(10)])
    for n in range(8):
        await store.lease(now_ms=NOW + n, rooms=rooms, limit=100, lease_ms=30_000, worker_id="w")
    for chunk in range(20):
        first = NOW + 1_000 + chunk * 1_000
        await store.insert_events([event(at=first + n, destinations=names) for n in range(1_000)])
    for _ in range(50):  # enough for the per-run plans' average to pass the generic one's cost
        assert await store.lease(
            now_ms=NOW + 10**7, rooms=rooms, limit=100, lease_ms=30_000, worker_id="w"
        )
    scans = await _table_scans(store)

    for _ in range(10):
        assert await store.lease(
            now_ms=NOW + 10**7, rooms=rooms, limit=100, lease_ms=30_000, worker_id="w"
        )

    # The server counts a session's scans when it goes idle, at most once a second, else
    # ~10 s later: wait until the ten leases' index scans are counted, then compare.
    after = await _table_scans(store)
    deadline = asyncio.get_running_loop().time() + 15
    while after["deliveries"][1] < scans["deliveries"][1] + 10:
        assert asyncio.get_running_loop().time() < deadline, (scans, after)
        await asyncio.sleep(0.2)
        after = await _table_scans(store)
    assert after["deliveries"][0] == scans["deliveries"][0], (scans, after)  # no whole-table read
    assert after["events"][0] == scans["events"][0], (scans, after)


async def _table_scans(store: SqlStore) -> dict[str, tuple[int, int]]:
    """Each table's (sequential scans, index scans) as the server has counted them."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT relname, seq_scan, idx_scan FROM pg_stat_user_tables")
        )
        return {r.relname: (int(r.seq_scan), int(r.idx_scan or 0)) for r in rows}

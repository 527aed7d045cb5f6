"""A key's backlog behind its head in flight costs a lease a walk, not a probe per row.

A lease reads a destination's due deliveries in order and keeps, of those with an ordering key,
only the first of each key. Asked per row, that question cost PostgreSQL a probe of
deliveries_ordering for every waiting delivery it walked past: with one key of 20,000 waiting
behind a delivery in flight, a lease took 700 ms, for each delivery of the key in turn. The
lease now joins each row to its key's first, which PostgreSQL memoizes by key. The store's own
statement, run and explained by PostgreSQL (then rolled back: tests/integration/plans.py).
"""

from __future__ import annotations

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

"""A destination that throttles with `429 Retry-After: 2`: each throttled delivery is tried
again no sooner than 2 s after it was answered, everything is delivered, and 429s do not
open the circuit (a destination asking us to slow down is not a failing destination)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest

from estafeta.testing.sink import Received, Sink
from tests.acceptance.conftest import (
    Estafeta,
    hub_client,
    leads_to_crm_config,
    report,
    wait_until,
)
from tests.chaos.conftest import (
    Load,
    acknowledged_and_delivered,
    deliveries_by_state,
    lead,
    logged,
)

EVENTS = 60
THROTTLED = 30  # the first requests answered 429
RETRY_AFTER_S = 2


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_retry_after_is_honoured_per_delivery_and_everything_arrives(
    chaos_database: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    started = time.monotonic()
    sink.fail_first(THROTTLED, 429, headers={"Retry-After": str(RETRY_AFTER_S)})
    # The fast circuit (5 failures) would open at once if a 429 counted.
    config = leads_to_crm_config(chaos_database, tmp_path, sink.url, max_attempts=5)
    serve = await estafeta.serve(config)
    async with hub_client(serve) as hub:
        load = Load(hub)
        await load.burst([lead(n) for n in range(EVENTS)], concurrency=20)
        acknowledged, missing = await acknowledged_and_delivered(
            load, sink, sent=EVENTS, timeout_s=20
        )

        async def settled() -> bool:
            return await deliveries_by_state(chaos_database) == {"succeeded": EVENTS}

        await wait_until(settled, timeout_s=10, what="every delivery succeeded")

    by_id: defaultdict[str, list[Received]] = defaultdict(list)
    for r in sink.received:
        by_id[r.webhook_id or ""].append(r)
    throttled = {i: rs for i, rs in by_id.items() if rs[0].status == 429}
    assert len(throttled) == THROTTLED
    for event_id, tries in throttled.items():
        assert [r.status for r in tries] == [429, 200], (event_id, tries)
        waited = tries[1].at - tries[0].at
        assert waited >= RETRY_AFTER_S, f"{event_id} was tried again after {waited:.3f} s"
    assert all(len(rs) == 1 for i, rs in by_id.items() if i not in throttled)
    assert logged(serve, "circuit_open") == []
    report(
        "chaos destination_throttling",
        sink,
        acknowledged,
        sent=load.sent,
        lost=len(missing),
        started=started,
    )

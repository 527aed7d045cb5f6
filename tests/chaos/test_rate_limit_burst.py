"""A backlog drained at a destination's rate limit: no second, wherever it starts, holds more
than the limit (plus a small slack for clocks).

This is the storm check of test_destination_outage.py made deterministic. It found that
limits' sliding window *counter* (which weighs the previous whole-second window as if its
sends were spread evenly) let a backlog released at half past a second through at about 1.5
times the limit within one second; the outbound limiter is now limits' exact moving window.
The backlog is made due at exactly half past a wall-clock second, the worst case for the
counter. Sends are timed by the hub itself (each attempt's `started_at`, taken right after
the limiter admitted it): arrival times at the sink add the network and a loaded machine's
scheduling, which bunched them past any fixed slack when the whole suite ran on two cores.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    Estafeta,
    hub_client,
    leads_to_crm_config,
    query,
    report,
)
from tests.chaos.conftest import (
    Load,
    all_delivered,
    busiest_second,
    execute,
    lead,
    per_second,
    settled_deliveries,
)

EVENTS = 150
LIMIT_PER_S = 50
SLACK = 2  # ms rounding of started_at at the window's edges


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_a_backlog_never_exceeds_the_rate_limit_in_any_second(
    chaos_database: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    started = time.monotonic()
    config = leads_to_crm_config(
        chaos_database, tmp_path, sink.url, rate_limit=f"{LIMIT_PER_S}/second"
    )
    serve = await estafeta.serve(config, no_workers=True)
    async with hub_client(serve) as hub:
        load = Load(hub)
        await load.burst([lead(n) for n in range(EVENTS)], concurrency=50)
    acknowledged = load.acknowledged()
    assert len(acknowledged) == EVENTS

    # The backlog waits while the worker starts, then falls due at half past a second.
    park = "UPDATE deliveries SET next_attempt_at = :due WHERE state = 'pending'"
    assert await execute(chaos_database, park, {"due": int(time.time() * 1000) + 60_000})
    worker = estafeta.worker(config)
    await worker.wait_log("worker_started")
    due_s = math.floor(time.time()) + 1.5
    assert await execute(chaos_database, park, {"due": int(due_s * 1000)}) == EVENTS
    missing = await all_delivered(sink, acknowledged, timeout_s=20)
    assert not missing

    assert await settled_deliveries(chaos_database, timeout_s=20) == {"succeeded": EVENTS}
    rows = await query(chaos_database, "SELECT started_at FROM attempts ORDER BY started_at")
    sent_at = [int(ms) / 1000 for (ms,) in rows]
    assert len(sent_at) == EVENTS, f"{len(sent_at)} attempts for {EVENTS} events"
    whole = per_second(sent_at, due_s - 0.5, sent_at[-1] + 1)
    busiest, busiest_at = busiest_second(sent_at)
    report(
        "chaos rate_limit_burst",
        sink,
        acknowledged,
        sent=EVENTS,
        lost=len(missing),
        started=started,
    )
    assert busiest <= LIMIT_PER_S + SLACK, (
        f"{busiest} sends in the second from {busiest_at - due_s:+.2f} s after the "
        f"backlog fell due; per wall-clock second (the limiter's windows): {whole}"
    )

"""A destination's `rate_limit` across several processes, as the real CLI runs them: a
`serve` that delivers and two `estafeta worker` on one PostgreSQL.

With Redis, the three draw from one budget: no second, wherever it starts, holds more than
the limit, and more than one of them sends. Without Redis, each process has a budget of its
own (documented: N processes may send N times the limit): no second holds more than the
limit of one process's sends, nor more than three limits in all.

Sends are timed by the hub itself (each attempt's `started_at`), as in
test_rate_limit_burst.py; each process says how many it made when it stops.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    Estafeta,
    Proc,
    hub_client,
    leads_to_crm_config,
    query,
    report,
)
from tests.chaos.conftest import (
    Load,
    RedisProcess,
    all_delivered,
    busiest_second,
    execute,
    lead,
    settled_deliveries,
)

EVENTS = 90
LIMIT_PER_S = 15
WORKERS = 2  # `estafeta worker` processes, besides the `serve` that delivers
SLACK = 2  # ms rounding of started_at at the window's edges


async def drain_with_three_processes(
    database: str, tmp_path: Path, estafeta: Estafeta, sink: Sink, redis_url: str | None
) -> tuple[list[float], list[int]]:
    """A backlog of EVENTS to the rate-limited `crm`, released once every process runs;
    returns the send times (s), and how many sends each process made."""
    started = time.monotonic()
    # Five sends at a time per process, each answered in 0.2 s: no one process can take a
    # second's budget alone before the others lease (one lease took the whole backlog).
    sink.respond(200, delay_s=0.2)
    config = leads_to_crm_config(
        database,
        tmp_path,
        sink.url,
        worker={"concurrency": 5, "batch_size": 5},
        redis_url=redis_url,
        rate_limit=f"{LIMIT_PER_S}/second",
    )
    # The backlog is accepted, and waits, before any process delivers: none takes it all.
    ingest = await estafeta.serve(config, no_workers=True, name="ingest")
    async with hub_client(ingest) as client:
        load = Load(client)
        await load.burst([lead(n) for n in range(EVENTS)], concurrency=30)
    acknowledged = load.acknowledged()
    assert len(acknowledged) == EVENTS
    assert await ingest.stop() == 0
    park = "UPDATE deliveries SET next_attempt_at = :due WHERE state = 'pending'"
    assert await execute(database, park, {"due": int(time.time() * 1000) + 60_000}) == EVENTS
    processes: list[Proc] = [await estafeta.serve(config)]
    processes += [estafeta.worker(config, name=f"worker-{n}") for n in range(WORKERS)]
    for process in processes:
        await process.wait_log("worker_started")
    assert await execute(database, park, {"due": int(time.time() * 1000)}) == EVENTS
    missing = await all_delivered(sink, acknowledged, timeout_s=30)
    assert not missing
    assert await settled_deliveries(database, timeout_s=20) == {"succeeded": EVENTS}
    rows = await query(database, "SELECT started_at FROM attempts")
    sent_at = [int(started_ms) / 1000 for (started_ms,) in rows]
    shares = []
    for process in processes:
        assert await process.stop() == 0, process.tail()
        stopped = [e for e in process.log_events() if e.get("event") == "worker_stopped"]
        assert len(stopped) == 1, process.tail()
        shares.append(int(stopped[0]["attempts"]))
    report("chaos shared_rate_limit", sink, acknowledged, sent=EVENTS, lost=0, started=started)
    return sent_at, shares


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_processes_sharing_redis_never_exceed_the_rate_limit_together(
    chaos_database: str, tmp_path: Path, estafeta: Estafeta, sink: Sink, own_redis: RedisProcess
) -> None:
    sent_at, shares = await drain_with_three_processes(
        chaos_database, tmp_path, estafeta, sink, own_redis.url
    )
    assert len(sent_at) == EVENTS, f"{len(sent_at)} attempts for {EVENTS} events"
    busiest, _ = busiest_second(sent_at)
    assert busiest <= LIMIT_PER_S + SLACK, f"{busiest} sends in one second; by process {shares}"
    assert sum(1 for n in shares if n > 0) >= 2, f"one process sent everything: {shares}"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_without_redis_each_process_keeps_the_rate_limit_on_its_own(
    chaos_database: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    sent_at, shares = await drain_with_three_processes(
        chaos_database, tmp_path, estafeta, sink, None
    )
    assert len(sent_at) == EVENTS, f"{len(sent_at)} attempts for {EVENTS} events"
    busiest, _ = busiest_second(sent_at)
    processes = sum(1 for n in shares if n > 0)
    # Documented: N processes may together send N times the limit, never more.
    assert busiest <= processes * (LIMIT_PER_S + SLACK), f"{busiest} in one second: {shares}"

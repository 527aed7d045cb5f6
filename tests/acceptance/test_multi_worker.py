"""Four `estafeta worker` processes on one PostgreSQL share the queue without overlap: each
delivery is sent exactly once, and the work is spread over more than one worker."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    Estafeta,
    hub_client,
    leads_to_crm_config,
    report,
    settled,
)

EVENTS = 2000
WORKERS = 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_four_workers_deliver_each_event_exactly_once(
    database_url: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    started = time.monotonic()
    # A little latency per send, so one worker alone cannot drain the queue before the others
    # have started: 32 sends at a time x 0.1 s is at most ~320 deliveries a second per worker.
    sink.respond(200, delay_s=0.1)
    config = leads_to_crm_config(
        database_url,
        tmp_path,
        sink.url,
        worker={"concurrency": 32, "batch_size": 32},
    )
    serve = await estafeta.serve(config, no_workers=True)
    async with hub_client(serve) as hub:
        sent = await hub.send_leads(EVENTS)
        assert sent.errors == []
        assert sent.statuses == [202] * EVENTS
        acknowledged = sent.acknowledged
        assert await hub.queue() == {"pending": EVENTS}
        assert sink.received == []  # nothing is sent before the workers start

        workers = [estafeta.worker(config, name=f"worker-{n}") for n in range(WORKERS)]
        assert await sink.wait_for(lambda s: acknowledged <= s.delivered_ids, 60), (
            f"{len(acknowledged - sink.delivered_ids)} events not delivered"
        )
        assert await settled(hub, database_url, timeout_s=20) == {"succeeded": EVENTS}

    exits = await asyncio.gather(*(w.stop() for w in workers))
    assert exits == [0] * WORKERS, [w.tail() for w in workers]
    attempts: list[int] = []
    for w in workers:
        stopped = [e for e in w.log_events() if e.get("event") == "worker_stopped"]
        assert len(stopped) == 1, w.tail()
        attempts.append(stopped[0]["attempts"])

    sends = Counter(r.webhook_id for r in sink.received)
    assert sink.delivered_ids == acknowledged
    assert sink.duplicates == 0
    assert max(sends.values()) == 1, [i for i, n in sends.items() if n > 1][:10]
    assert sum(attempts) == EVENTS, attempts
    assert sum(1 for n in attempts if n > 0) >= 2, f"one worker did all the work: {attempts}"
    report(
        "multi_worker[postgresql]",
        sink,
        acknowledged,
        sent=EVENTS,
        lost=len(acknowledged - sink.delivered_ids),
        started=started,
    )
    print(f"  attempts per worker: {attempts}")

"""Kill everything at random moments: nothing acknowledged is lost, and the only duplicates
are deliveries that were in flight when their worker died.

5,000 signed webhooks stream into `estafeta serve --no-workers` (50 at a time) while two
`estafeta worker` processes deliver them to a sink. The ingest server and the workers are
each SIGKILLed three times, at moments drawn from a seeded `random.Random` (as a fraction of
the run's progress, so the moments fall inside the run however fast this machine is today),
and started again. The sender retries a request that failed with a connection error with
the same `webhook-id`, as a real provider does.

Why a duplicate is legitimate only when both hold:

* its delivery has a `lease_expired` attempt: a worker took it over because the lease's
  owner never recorded a result. That is the only way a delivery is sent again after a
  2xx; without a recorded 2xx it could not have been marked succeeded and then re-sent;
* it was in flight at a kill: it is among the deliveries that were `in_flight` and leased
  by the killed worker (`leased_by` names the worker's pid) right after the SIGKILL. A
  worker that dies cannot send anything later, and a lease lasts 4 s here while the
  snapshot is taken within milliseconds, so the snapshot is complete.

Killing the ingest server must not duplicate anything: a webhook committed but not answered
is sent again with the same `webhook-id`, which the store deduplicates, so each webhook
becomes exactly one event (checked by the webhook's number in the delivered payload).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import Estafeta, hub_client
from tests.chaos.conftest import Load, assert_kills_lost_nothing, kill_config, lead, leased_by

EVENTS = 5000
CONCURRENCY = 50
KILLS = 3  # of the ingest server, and of the workers
SEED = 20261122
WORKERS = 2


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(150)
async def test_random_kills_lose_nothing_and_duplicate_only_sends_in_flight(
    chaos_database: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    started = time.monotonic()
    config = kill_config(chaos_database, tmp_path, sink)
    serve = await estafeta.serve(config, no_workers=True)
    workers = [estafeta.worker(config, name=f"worker-{i}") for i in range(WORKERS)]
    for worker in workers:
        await worker.wait_log("worker_started")

    # Kill moments as progress: acknowledged webhooks (server), delivered events (workers).
    rng_serve, rng_workers = random.Random(SEED), random.Random(SEED + 1)
    serve_marks = sorted(rng_serve.sample(range(EVENTS // 10, EVENTS * 9 // 10), KILLS))
    worker_marks = sorted(rng_workers.sample(range(EVENTS // 10, EVENTS * 9 // 10), KILLS))
    in_flight_at_kill: set[str] = set()
    kills: list[str] = []

    async def kill_serve(load: Load) -> None:
        nonlocal serve
        for n, mark in enumerate(serve_marks, 1):
            await load.wait_acknowledged(mark, timeout_s=90)
            await serve.sigkill()
            kills.append(f"serve@{load.ok}")
            await asyncio.sleep(rng_serve.uniform(0, 0.5))
            serve = await estafeta.serve(config, no_workers=True, name=f"serve-{n}")

    async def kill_workers() -> None:
        for n, mark in enumerate(worker_marks, 1):

            def reached(s: Sink, mark: int = mark) -> bool:
                return len(s.delivered_ids) >= mark

            assert await sink.wait_for(reached, 90), f"{mark} deliveries never arrived"
            victim = rng_workers.randrange(WORKERS)
            pid = workers[victim].pid
            await workers[victim].sigkill()
            kills.append(f"worker-{victim}@{len(sink.delivered_ids)}")
            in_flight_at_kill.update(await leased_by(chaos_database, pid))
            await asyncio.sleep(rng_workers.uniform(0, 0.5))
            workers[victim] = estafeta.worker(config, name=f"worker-{victim}-{n}")

    async with hub_client(serve) as hub:
        load = Load(hub, give_up_after_s=60)
        messages = [lead(n) for n in range(EVENTS)]
        chaos = asyncio.gather(kill_serve(load), kill_workers())
        await load.burst(messages, concurrency=CONCURRENCY)
        await asyncio.wait_for(chaos, timeout=60)
        assert len(kills) == 2 * KILLS, kills

        await assert_kills_lost_nothing(
            "chaos kill_everything",
            load,
            sink,
            chaos_database,
            in_flight_at_kill,
            events=EVENTS,
            kills=KILLS,
            started=started,
        )

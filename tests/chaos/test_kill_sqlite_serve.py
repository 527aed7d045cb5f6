"""The embedded default, killed: one `estafeta serve` on SQLite (its worker in-process, the
shape a small clinic runs) is SIGKILLed at random moments while signed webhooks stream in,
and started again. Nothing it acknowledged is lost, each webhook is one event, and the only
duplicates are sends that were in flight when it died.

test_kill_everything.py proves the same on PostgreSQL with separate processes; here the
group commit goes through SQLite's own writer thread and fresh deliveries are handed to the
in-process worker already leased, both of which a kill cuts short. The sender retries a
request that failed with a connection error, with the same `webhook-id`.
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

EVENTS = 2000
CONCURRENCY = 50
KILLS = 3
SEED = 20261204


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_killed_sqlite_serve_loses_nothing_and_duplicates_only_sends_in_flight(
    tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    started = time.monotonic()
    database_url = f"sqlite:///{tmp_path / 'estafeta.db'}"
    config = kill_config(database_url, tmp_path, sink)
    serve = await estafeta.serve(config)
    rng = random.Random(SEED)
    marks = sorted(rng.sample(range(EVENTS // 10, EVENTS * 9 // 10), KILLS))
    in_flight_at_kill: set[str] = set()
    kills: list[str] = []

    async def kill_serve(load: Load) -> None:
        nonlocal serve
        for n, mark in enumerate(marks, 1):
            await load.wait_acknowledged(mark, timeout_s=90)
            pid = serve.pid
            await serve.sigkill()
            kills.append(f"serve@{load.ok}")
            # Its leases (stored with its pid in the worker id) outlive it.
            in_flight_at_kill.update(await leased_by(database_url, pid))
            await asyncio.sleep(rng.uniform(0, 0.5))
            serve = await estafeta.serve(config, name=f"serve-{n}")

    async with hub_client(serve) as hub:
        load = Load(hub, give_up_after_s=60)
        chaos = asyncio.create_task(kill_serve(load))
        await load.burst([lead(n) for n in range(EVENTS)], concurrency=CONCURRENCY)
        await asyncio.wait_for(chaos, timeout=60)
        assert len(kills) == KILLS, kills

        await assert_kills_lost_nothing(
            "chaos kill_sqlite_serve",
            load,
            sink,
            database_url,
            in_flight_at_kill,
            events=EVENTS,
            kills=KILLS,
            started=started,
        )

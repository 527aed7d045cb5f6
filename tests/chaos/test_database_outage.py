"""The database goes away for 20 s under load: ingest keeps answering 2xx from the spool,
`/health` stays 200, and once the database is back the spool drains and every acknowledged
event is delivered, duplicated only if its send was in flight when the database went.

`estafeta serve` (workers in-process) reaches PostgreSQL through a TCP proxy in this test's
process; cutting the proxy closes its listener (new connections are refused) and aborts every
connection it carried, which is how a crashed database or a broken network looks to a client.
The shared PostgreSQL server itself is never touched.

A duplicate is legitimate when the send was made before the cut (nothing can be leased while
the database is away, so its first 2xx at the sink arrived by the cut plus one send's time
limit) and its result could not be recorded, so the lease expired and a `lease_expired`
attempt took it over after the restore; or when a send outlived the destination's time limit
or lost its connection before the answer (recorded as a `timeout` or `connection_error`
attempt; docs/guarantees.md Limits) and the sink took it all the same: after the restore the
spool's backlog is sent at once, and on a loaded machine this test's own sink can answer
later than 2 s. Any other duplicate is a defect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    Estafeta,
    hub_client,
    leads_to_crm_config,
    report,
    wait_until,
)
from tests.chaos.conftest import (
    Load,
    TcpProxy,
    all_delivered,
    deliveries_by_state,
    events_with_attempt,
    lead,
    settled_deliveries,
    via_proxy,
)

RATE_PER_S = 50
BEFORE_S = 4.0
OUTAGE_S = 20.0
AFTER_S = 3.0
TIMEOUT_S = 2  # the destination's; a send lasts at most this + 1 s (the worker's ceiling)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_database_outage_is_absorbed_by_the_spool_and_drained_after(
    chaos_database: str, pg_proxy: TcpProxy, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    started = time.monotonic()
    sink.respond(200, delay_s=0.02)
    config = leads_to_crm_config(
        via_proxy(chaos_database, pg_proxy.port),
        tmp_path,
        sink.url,
        timeout_s=TIMEOUT_S,
        max_attempts=20,
        worker={"lease_s": 1},  # lease = timeout_s + 2 = 4 s
    )
    serve = await estafeta.serve(config)

    async with hub_client(serve) as hub:
        load = Load(hub, give_up_after_s=30)
        health: list[tuple[float, int]] = []
        stop_load, stop_health = asyncio.Event(), asyncio.Event()

        async def watch_health() -> None:
            timeout = aiohttp.ClientTimeout(total=2)
            while not stop_health.is_set():
                try:
                    async with hub.http.get(f"{serve.base_url}/health", timeout=timeout) as r:
                        health.append((time.monotonic(), r.status))
                except (aiohttp.ClientError, TimeoutError):
                    health.append((time.monotonic(), 0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_health.wait(), 0.25)

        sending = asyncio.create_task(load.steady(RATE_PER_S, stop_load, lead))
        watching = asyncio.create_task(watch_health())
        await asyncio.sleep(BEFORE_S)  # the scenario's timeline, not a wait for luck
        assert sink.delivered_ids, "nothing delivered before the outage"
        cut_at = time.monotonic()
        await pg_proxy.cut()
        await asyncio.sleep(OUTAGE_S)
        await pg_proxy.restore()
        restored_at = time.monotonic()
        await asyncio.sleep(AFTER_S)
        stop_load.set()
        sent = await asyncio.wait_for(sending, timeout=30)

        assert load.refused() == {}, list(load.refused().items())[:10]
        assert load.connection_errors == 0
        spooled = load.spooled()
        assert spooled, "nothing was spooled while the database was away"
        assert min(a.at for a in spooled) >= cut_at
        acknowledged = load.acknowledged()
        assert len(acknowledged) == sent

        async def spool_empty() -> bool:
            checks = (await hub.get_json("/health/detailed"))["checks"]
            return bool(checks["spool"]["segments"] == 0)

        await wait_until(spool_empty, timeout_s=20, what="the spool drained (0 segments)")
        missing = await all_delivered(sink, acknowledged, timeout_s=20)
        assert not missing, f"{len(missing)} acknowledged webhooks never delivered"

        await settled_deliveries(chaos_database, timeout_s=20)
        stop_health.set()
        await watching

    outage_health = [status for at, status in health if cut_at <= at <= restored_at]
    assert len(outage_health) >= OUTAGE_S * 2, "/health was not watched during the outage"
    assert set(outage_health) == {200}, Counter(outage_health)
    assert await deliveries_by_state(chaos_database) == {"succeeded": sent}

    oks = Counter(r.webhook_id or "" for r in sink.received if 200 <= r.status < 300)
    duplicated = {event_id for event_id, n in oks.items() if n > 1}
    first_ok: dict[str, float] = {}
    for r in sink.received:
        if 200 <= r.status < 300 and r.webhook_id is not None:
            first_ok.setdefault(r.webhook_id, r.at)
    timed_out = await events_with_attempt(chaos_database, "timeout")
    timed_out |= await events_with_attempt(chaos_database, "connection_error")
    late = {i for i in duplicated - timed_out if first_ok[i] > cut_at + TIMEOUT_S + 1}
    assert late == set(), f"sent twice though first sent after the cut: {late}"
    rescued = await events_with_attempt(chaos_database, "lease_expired")
    unexplained = duplicated - rescued - timed_out
    assert not unexplained, (
        f"sent again without a rescue, a timeout or a lost answer: {unexplained}"
    )
    report(
        "chaos database_outage", sink, acknowledged, sent=sent, lost=len(missing), started=started
    )

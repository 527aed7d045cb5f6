"""A circuit's probe that meets the destination's rate limit: the destination recovers as soon
as the budget allows a probe, not a minute later.

A destination with `rate_limit = "5/second"` and `circuit = {failures = 5, reset_s = 0.2}`
fails its first 5 requests, then recovers. Those 5 failures spend the second's whole budget
and open the circuit; 0.2 s later, still inside that second, the worker claims the probe
(the circuit becomes half-open), leases one delivery for it, and the throttle snoozes it.
Nothing ever reports a result for that probe, so the circuit stays half-open, rejecting
everything, until the probe is presumed lost (`probe_timeout_s`, 60 s), though the budget
is back after a second. The webhooks are sent just after a wall-clock second begins (the
limiter's windows are wall-clock seconds), so the probe falls in the spent second every run.
"""

from __future__ import annotations

import asyncio
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
    lead,
    lost,
)

EVENTS = 10
FAILURES = 5
RECOVERY_BOUND_S = 10.0  # 10 events at 5/second need 2 s; a correct hub is done well within


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_a_probe_held_back_by_the_rate_limit_does_not_block_the_destination(
    chaos_database: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    started = time.monotonic()
    sink.fail_first(FAILURES, 500)
    config = leads_to_crm_config(
        chaos_database,
        tmp_path,
        sink.url,
        max_attempts=20,
        rate_limit="5/second",
        circuit={"failures": FAILURES, "reset_s": 0.2},
    )
    serve = await estafeta.serve(config)
    async with hub_client(serve) as hub:
        load = Load(hub)
        # The scenario's timeline: start just after a wall-clock second begins.
        await asyncio.sleep(math.ceil(time.time()) + 0.02 - time.time())
        sent_at = time.monotonic()
        await load.burst([lead(n) for n in range(EVENTS)], concurrency=EVENTS)
    acknowledged = load.acknowledged()
    assert len(acknowledged) == EVENTS
    await serve.wait_log("circuit_open", timeout_s=5)
    missing = await all_delivered(
        sink, acknowledged, timeout_s=RECOVERY_BOUND_S - (time.monotonic() - sent_at)
    )
    circuit = await query(chaos_database, "SELECT data FROM circuits")
    report(
        "chaos throttled_probe",
        sink,
        acknowledged,
        sent=load.sent,
        lost=len(lost(acknowledged, sink.delivered_ids)),
        started=started,
    )
    assert not missing, (
        f"{len(missing)} of {EVENTS} still undelivered {RECOVERY_BOUND_S} s after the "
        f"destination recovered; its circuit: {circuit}"
    )

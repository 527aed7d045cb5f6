"""One destination fails every request for 30 s, then recovers: the other destination keeps
its pace, the sick one's circuit opens (only single probes reach it while open), and after
recovery one probe goes first and the backlog follows at its rate limit.

Two destinations take every event; `billing` (the sick one) has `circuit = {failures = 5,
reset_s = 5}` and `rate_limit = "50/second"`. The load is steady during the first two phases
and stops when billing recovers, so the end of the test is the backlog draining.

* Isolation: the healthy destination's deliveries per second, as the median over 1-second
  windows (robust to a busy machine), during the outage are at least 70 % of before it.
* No storm: after recovery, the first request billing sees is alone for as long as billing
  takes to answer it (the probe; billing holds each answer PROBE_HOLD_S), and then the backlog
  arrives at the rate limit: the drain as a whole and its median second stay within the
  limit. Arrivals at a sink are bunched by a busy machine, so a single second (sliding,
  starting anywhere) is only held to twice the limit here; the strict bound, measured on the
  hub's own send times, is test_rate_limit_burst.py's.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    TENANT,
    Estafeta,
    http_destination,
    hub_client,
    hub_config,
    query,
    summary,
    wait_until,
    write_config,
)
from tests.chaos.conftest import (
    Load,
    acknowledged_and_delivered,
    arrivals,
    busiest_second,
    lead,
    logged,
    lost,
    median,
    per_second,
    settled_deliveries,
)
from tests.conftest import SINK_SECRET

RATE_PER_S = 16  # events a second, each to both destinations
BEFORE_S = 6.0
OUTAGE_S = 30.0
RESET_S = 5.0
LIMIT_PER_S = 50
SLACK = 5  # sends over the limit tolerated in one second (arrival jitter)
PROBE_HOLD_S = 0.25  # how long billing takes to answer after recovery
DOWN_ALERT_S = 10.0  # worker.alert_destination_down_s: well inside the outage


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(120)
async def test_a_sick_destination_opens_its_circuit_and_recovers_without_a_storm(
    chaos_database: str, tmp_path: Path, estafeta: Estafeta
) -> None:
    started = time.monotonic()
    healthy, sick = Sink(secret=SINK_SECRET), Sink(secret=SINK_SECRET)
    await healthy.start()
    await sick.start()
    try:
        config = write_config(
            tmp_path / "estafeta.toml",
            hub_config(
                chaos_database,
                tmp_path,
                destinations=[
                    http_destination("crm", f"{healthy.url}/crm", max_attempts=100),
                    http_destination(
                        "billing",
                        f"{sick.url}/billing",
                        max_attempts=100,
                        rate_limit=f"{LIMIT_PER_S}/second",
                        circuit={"failures": 5, "reset_s": RESET_S},
                    ),
                ],
                routes=[
                    {"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm", "billing"]}
                ],
                worker={"alert_destination_down_s": DOWN_ALERT_S},
            ),
        )
        serve = await estafeta.serve(config)

        async with hub_client(serve) as hub:
            load = Load(hub, give_up_after_s=30)
            stop_load = asyncio.Event()

            sending = asyncio.create_task(load.steady(RATE_PER_S, stop_load, lead))
            load_started = time.monotonic()
            await asyncio.sleep(BEFORE_S)  # the scenario's timeline
            sick.respond(500)
            outage_at = time.monotonic()

            async def circuit_open() -> bool:
                rows = await query(
                    chaos_database, "SELECT data FROM circuits WHERE destination_id = 'billing'"
                )
                return bool(rows) and ('"open"' in rows[0][0] or '"half_open"' in rows[0][0])

            await wait_until(circuit_open, timeout_s=10, what="billing's circuit open")
            await asyncio.sleep(max(0.0, outage_at + OUTAGE_S - time.monotonic()))
            # Down for longer than the alert's bound (checked every 5 s): the operator hears.
            health = await load.hub.get_json("/health/detailed")
            assert "destination_down" in health["checks"]["alerts"]["firing"], health
            sick.respond(200, delay_s=PROBE_HOLD_S)
            recovered_at = time.monotonic()
            stop_load.set()
            sent = await asyncio.wait_for(sending, timeout=30)

            for sink in (healthy, sick):
                acknowledged, _ = await acknowledged_and_delivered(
                    load, sink, sent=sent, timeout_s=40
                )
            assert await settled_deliveries(chaos_database, timeout_s=20) == {"succeeded": 2 * sent}

        # Isolation: the healthy destination's pace, before and during the outage.
        ok = arrivals(healthy, status=200)
        before = per_second(ok, load_started + 1, outage_at)
        during = per_second(ok, outage_at + 1, recovered_at)
        assert median(during) >= 0.7 * median(before), (before, during)

        # The alert named billing once, and resolved once billing was back; crm never.
        alerts = [
            (e["event"], e["destination"])
            for e in logged(serve, "alert_fired") + logged(serve, "alert_resolved")
            if e.get("alert") == "destination_down"
        ]
        assert alerts == [("alert_fired", "billing"), ("alert_resolved", "billing")], alerts

        # While open, billing sees single probes RESET_S apart, nothing else.
        opened = [e for e in logged(serve, "circuit_open") if e.get("destination") == "billing"]
        assert opened, "no circuit_open logged for billing"
        while_open = [t for t in arrivals(sick) if outage_at + 2 <= t < recovered_at]
        gaps = [b - a for a, b in itertools.pairwise(while_open)]
        assert gaps and min(gaps) >= RESET_S - 0.5, gaps

        # After recovery: one probe, alone until answered, then the backlog at the limit.
        after = [t for t in arrivals(sick) if t >= recovered_at]
        probe, rest = after[0], after[1:]
        assert rest and rest[0] >= probe + PROBE_HOLD_S - 0.01, (
            f"{sum(1 for t in rest if t < probe + PROBE_HOLD_S)} requests raced the probe"
        )
        # The limiter (limits' moving window) admits at most the limit in any second, so a
        # drain spanning T seconds holds at most LIMIT * (T + 2) sends and its typical second
        # is at the limit. Arrival jitter may bunch one second's sends (see the docstring).
        span = rest[-1] - rest[0]
        seconds = per_second(rest, rest[0], rest[-1])
        assert len(rest) <= LIMIT_PER_S * (span + 2), f"{len(rest)} sends in {span:.1f} s"
        assert median(seconds) <= LIMIT_PER_S + SLACK, seconds
        busiest, at = busiest_second(rest)
        assert busiest <= 2 * LIMIT_PER_S + SLACK, f"{busiest} sends from {at - rest[0]:.2f} s"
        assert healthy.duplicates == sick.duplicates == 0
        delivered = set(acknowledged) - lost(acknowledged, healthy.delivered_ids)
        delivered -= lost(acknowledged, sick.delivered_ids)
        summary(
            "chaos destination_outage",
            sent=sent,
            acknowledged=len(acknowledged),
            delivered=len(delivered),
            duplicates=healthy.duplicates + sick.duplicates,
            lost=len(acknowledged) - len(delivered),
            started=started,
        )
    finally:
        await healthy.stop()
        await sick.stop()

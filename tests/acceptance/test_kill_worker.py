"""A worker killed mid-send (SIGKILL, no goodbye) loses nothing: its leases expire and another
worker delivers them. Duplicates are allowed only for what was in flight at the kill."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import make_url

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    Estafeta,
    execute,
    hub_client,
    leads_to_crm_config,
    query,
    report,
    settled,
)

EVENTS = 400
SINK_DELAY_S = 0.4  # slow enough that dozens of sends are in flight at any moment


@pytest.mark.timeout(90)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_killed_worker_loses_nothing_and_duplicates_only_what_was_in_flight(
    database_url: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    started = time.monotonic()
    sink.respond(200, delay_s=SINK_DELAY_S)
    # lease = max(lease_s, timeout_s + 2) = 3 s: a dead worker's sends come back soon
    config = leads_to_crm_config(
        database_url,
        tmp_path,
        sink.url,
        timeout_s=1,
        worker={"lease_s": 1, "concurrency": 32},
    )
    serve = await estafeta.serve(config, no_workers=True)
    doomed = estafeta.worker(config, name="worker-1")
    await doomed.wait_log("worker_started")

    async with hub_client(serve) as hub:
        sent = await hub.send_leads(EVENTS)
        assert sent.errors == []
        assert sent.statuses == [202] * EVENTS
        acknowledged = sent.acknowledged

        assert await sink.wait_for(lambda s: len(s.received) >= 60, 30), "no sends started"
        await doomed.sigkill()
        received_at_kill = len(sink.received)
        rows = await query(
            database_url, "SELECT event_id FROM deliveries WHERE state = 'in_flight'"
        )
        in_flight_at_kill = {event_id for (event_id,) in rows}
        assert in_flight_at_kill, "nothing was in flight when the worker died"

        rescuer = estafeta.worker(config, name="worker-2")
        assert await sink.wait_for(lambda s: acknowledged <= s.delivered_ids, 45), (
            f"{len(acknowledged - sink.delivered_ids)} acknowledged events never delivered"
        )
        by_state = await settled(hub, database_url, timeout_s=20)
        assert by_state == {"succeeded": EVENTS}, by_state

        # The attempts log says why a rescued delivery was sent again.
        for event_id in sorted(in_flight_at_kill)[:10]:
            delivery = await hub.delivery(event_id, "crm")
            classes = [a["error_class"] for a in delivery["attempt_log"]]
            assert delivery["state"] == "succeeded", delivery
            assert "lease_expired" in classes, delivery
            assert classes[-1] is None, delivery

    await rescuer.stop()
    sends = Counter(r.webhook_id or "" for r in sink.received)
    resent = {event_id for event_id, n in sends.items() if n > 1}
    assert resent <= in_flight_at_kill, (
        f"sent twice though not in flight at the kill: {sorted(resent - in_flight_at_kill)}"
    )
    report(
        "kill_worker[postgresql]",
        sink,
        acknowledged,
        sent=EVENTS,
        lost=len(acknowledged - sink.delivered_ids),
        started=started,
    )
    print(
        f"  in flight at kill={len(in_flight_at_kill)} received before kill={received_at_kill}"
        f" sent more than once={len(resent)}"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_serve_without_workers_says_when_no_worker_runs(
    database_url: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    # `serve --no-workers` accepts every event whether or not a worker runs: a worker that
    # died (or was never started) used to go unheard until the backlog reached 10,000.
    config = leads_to_crm_config(
        database_url, tmp_path, sink.url, worker={"alert_no_workers_s": 30}
    )
    serve = await estafeta.serve(config, no_workers=True)
    worker = estafeta.worker(config, name="worker-1")
    started = await worker.wait_log("worker_started")
    async with hub_client(serve) as hub:
        health = await hub.get_json("/health/detailed")
        listed = {p["id"]: p["delivers"] for p in health["checks"]["processes"]}
        assert listed[started["worker"]] is True
        assert list(listed.values()).count(False) == 1  # serve itself, HTTP only

        await worker.sigkill()
        killed_at = time.monotonic()
        sent = await hub.send_leads(3)
        assert sent.statuses == [202] * 3  # accepted all the same

        fired = await serve.wait_log("alert_fired", timeout_s=60)
        # Its last announcement is up to 10 s before the kill; a check every 5 s.
        assert 15 <= time.monotonic() - killed_at <= 45
        assert (fired["alert"], fired["pending"]) == ("no_workers", 3)
        assert fired["last_seen"] is not None
        health = await hub.get_json("/health/detailed")
        assert health["checks"]["alerts"]["firing"] == ["no_workers"]
        assert sink.received == []

        estafeta.worker(config, name="worker-2")
        resolved = await serve.wait_log("alert_resolved", timeout_s=30)
        assert resolved["alert"] == "no_workers"
        assert await sink.wait_for(lambda s: sent.acknowledged <= s.delivered_ids, 30)
        assert await settled(hub, database_url, timeout_s=20) == {"succeeded": 3}
        health = await hub.get_json("/health/detailed")
        assert health["checks"]["alerts"]["firing"] == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("layout", ["worker", "serve"])
async def test_serve_hears_of_a_worker_that_runs_but_keeps_crashing(
    database_url: str, tmp_path: Path, estafeta: Estafeta, layout: str, sink: Sink
) -> None:
    # A process whose database role may not update the deliveries (a grant missed when the
    # database was set up): it starts, records itself every 10 s, and its delivery task
    # crashes at every step and is restarted. It used to count as a worker running. Either
    # an `estafeta worker` beside a `serve --no-workers`, or a `serve` with its own worker.
    role = f"estafeta_reader_{os.getpid()}"
    role_made = False
    try:
        settings = {"alert_no_workers_s": 30}
        config = leads_to_crm_config(database_url, tmp_path, sink.url, worker=settings)
        migrated = estafeta.start("migrate", "migrate", "--config", str(config))
        assert await migrated.wait_exit(30) == 0, migrated.tail()
        await execute(database_url, f"CREATE ROLE {role} LOGIN")
        role_made = True
        await execute(
            database_url,
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
            f"REVOKE UPDATE ON deliveries FROM {role}",
        )
        restricted_dir = tmp_path / "restricted"
        restricted_dir.mkdir()
        restricted = leads_to_crm_config(
            make_url(database_url).set(username=role).render_as_string(False),
            restricted_dir,
            sink.url,
            worker=settings,
        )
        if layout == "worker":
            serve = await estafeta.serve(config, no_workers=True)
            crashing = estafeta.worker(restricted)
        else:
            serve = crashing = await estafeta.serve(restricted, "--no-migrate")
        started = await crashing.wait_log("worker_started")
        async with hub_client(serve) as hub:
            sent = await hub.send_many([{"type": "lead.created", "data": {"n": 1}}], ["msg_1"])
            assert sent.statuses == [202]
            crashed = await crashing.wait_log("task_crashed")
            assert crashed["task"] == "worker"

            fired = await serve.wait_log("alert_fired", timeout_s=60)
            assert fired["alert"] == "no_workers"
            # Pending, or in flight: handed to serve's own worker as it was stored.
            assert fired["pending"] + fired["in_flight"] == 1
            assert crashing.running()  # it runs, recording itself, all along
            health = await hub.get_json("/health/detailed")
            (listed,) = [p for p in health["checks"]["processes"] if p["id"] == started["worker"]]
            assert listed["delivers"] is True
            # Only its first record, before its delivery task ever ran, counts.
            assert listed["delivering_at"] == fired["last_seen"]
            assert listed["seen_at"] > listed["delivering_at"]
            assert await query(database_url, "SELECT state FROM deliveries") != [("succeeded",)]
            if layout == "serve":
                async with hub.http.get(f"{serve.base_url}/metrics") as scraped:
                    text = await scraped.text()
                crashes = re.search(
                    r'^estafeta_task_crashes_total\{task="worker"\} (\S+)$', text, re.M
                )
                assert crashes is not None and float(crashes.group(1)) >= 2
    finally:
        estafeta.kill_all()  # its connections first: a role is dropped once unused
        if role_made:
            await execute(database_url, f"DROP OWNED BY {role}", f"DROP ROLE {role}")

"""Stopping `serve` and `worker`: a second SIGTERM or Ctrl-C during the graceful stop ends the
process at once, as a crash would, and loses nothing; a hangup stops them as SIGTERM does,
unless they were started under `nohup` (docs/operations.md, Stopping)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    Estafeta,
    Proc,
    child_env,
    estafeta_command,
    hub_client,
    leads_to_crm_config,
    query,
    send_one_lead,
)

# Longer than the test waits for the process to exit: a stop that waited for the send (or
# for the grace period) instead of ending at once fails the test.
SEND_S = 30.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize(
    ("command", "database_url"),
    [("serve", "sqlite"), ("worker", "postgresql")],
    indirect=["database_url"],
)
async def test_a_second_stop_signal_ends_the_graceful_stop_at_once(
    database_url: str,
    tmp_path: Path,
    estafeta: Estafeta,
    sink: Sink,
    command: str,
    second: signal.Signals,
) -> None:
    sink.respond(200, delay_s=SEND_S)
    config = leads_to_crm_config(
        database_url,
        tmp_path,
        sink.url,
        timeout_s=SEND_S + 10,
        worker={"shutdown_grace_s": 60},
    )
    serve = await estafeta.serve(config, no_workers=command == "worker")
    stopped = serve if command == "serve" else estafeta.worker(config)
    event_id = await send_one_lead(serve)
    assert await sink.wait_for(lambda s: len(s.received) == 1, 20), "the send never started"

    stopped.send_signal(signal.SIGTERM)
    # Two signals sent at once may arrive as one: the second only once the first is heard.
    assert (await stopped.wait_log("stopping"))["signal"] == "SIGTERM"
    stopped.send_signal(second)
    code = await stopped.wait_exit(15)

    assert code == -second, f"exit {code}\n{stopped.tail()}"
    forced = [e for e in stopped.log_events() if e.get("event") == "shutdown_forced"]
    assert [e["signal"] for e in forced] == [second.name], stopped.tail()
    assert "Traceback" not in stopped.stderr()
    assert "worker_stopped" not in [e.get("event") for e in stopped.log_events()]

    # As after a crash: the event is stored, its delivery still leased by the stopped
    # process with no attempt counted, for the rescue once the lease expires.
    rows = await query(database_url, "SELECT event_id, state, attempts FROM deliveries")
    assert rows == [(event_id, "in_flight", 0)], rows

    # And the store is whole: a new `serve` starts on it and shows the event.
    if command == "serve":
        serve = await estafeta.serve(config, name="serve-again")
    async with hub_client(serve) as hub:
        delivery = await hub.delivery(event_id, "crm")
        assert delivery["state"] == "in_flight", delivery


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("command", "database_url"),
    [("serve", "sqlite"), ("worker", "postgresql")],
    indirect=["database_url"],
)
async def test_a_hangup_stops_gracefully_as_sigterm_does(
    database_url: str, tmp_path: Path, estafeta: Estafeta, sink: Sink, command: str
) -> None:
    """A process run from a terminal (an SSH session) gets SIGHUP when the terminal closes.
    Killed by it, it left its sends leased for a whole lease, each to cost a `lease_expired`
    attempt; it stops as on SIGTERM instead: sends given back, exit 0."""
    sink.respond(200, delay_s=SEND_S)
    config = leads_to_crm_config(
        database_url, tmp_path, sink.url, timeout_s=SEND_S + 10, worker={"shutdown_grace_s": 0.3}
    )
    serve = await estafeta.serve(config, no_workers=command == "worker")
    stopped = serve if command == "serve" else estafeta.worker(config)
    await send_one_lead(serve)
    assert await sink.wait_for(lambda s: len(s.received) == 1, 20), "the send never started"

    stopped.send_signal(signal.SIGHUP)
    code = await stopped.wait_exit(15)

    rows = await query(database_url, "SELECT state, attempts, leased_by FROM deliveries")
    assert rows == [("pending", 0, None)], f"{rows}\n{stopped.tail()}"
    assert (await stopped.wait_log("stopping"))["signal"] == "SIGHUP"
    assert code == 0, f"exit {code}\n{stopped.tail()}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_worker_started_with_nohup_keeps_running_through_a_hangup(
    database_url: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    """`nohup estafeta worker …` asks for the hangup to be ignored: it is."""
    config = leads_to_crm_config(database_url, tmp_path, sink.url)
    await estafeta.serve(config, no_workers=True)
    args = ["nohup", *estafeta_command(), "worker", "--config", str(config)]
    out, err = tmp_path / "nohup-worker.stdout", tmp_path / "nohup-worker.stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        popen = subprocess.Popen(args, stdout=stdout, stderr=stderr, cwd=tmp_path, env=child_env())
    worker = Proc("nohup-worker", args, popen, out, err)
    estafeta.started.append(worker)  # killed at teardown
    await worker.wait_log("worker_started")

    worker.send_signal(signal.SIGHUP)
    # Heard, the hangup would begin the stop (logged as SIGHUP) or force the one SIGTERM
    # began (not exit 0), whichever came first.
    worker.send_signal(signal.SIGTERM)
    code = await worker.wait_exit(15)

    assert (await worker.wait_log("stopping"))["signal"] == "SIGTERM", worker.tail()
    assert code == 0, f"exit {code}\n{worker.tail()}"

"""A rolling change of the configuration with the real CLI on one PostgreSQL: the HTTP server
is restarted with a new destination before the worker. The worker still on the old file
leaves the new destination's deliveries alone, and the worker started on the new file
sends them: none reaches the dead-letter queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    TENANT,
    Estafeta,
    free_port,
    http_destination,
    hub_client,
    hub_config,
    run_cli,
    settled,
    write_config,
)

EVENTS = 5


@pytest.mark.timeout(90)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_new_destinations_deliveries_wait_for_a_worker_on_the_new_file(
    database_url: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    port = free_port()
    crm = http_destination("crm", f"{sink.url}/hooks/crm")
    agenda = http_destination("agenda", f"{sink.url}/hooks/agenda")
    leads = {"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm"]}
    bookings = {"tenant": TENANT, "events": ["appointment.*"], "destinations": ["agenda"]}
    old = write_config(
        tmp_path / "old.toml",
        hub_config(database_url, tmp_path, port=port, destinations=[crm], routes=[leads]),
    )
    new = write_config(
        tmp_path / "new.toml",
        hub_config(
            database_url,
            tmp_path,
            port=port,
            destinations=[crm, agenda],
            routes=[leads, bookings],
        ),
    )
    migrated = await run_cli("migrate", "--config", str(old), cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    old_worker = estafeta.worker(old, name="old-worker")
    await old_worker.wait_log("worker_started")
    serve = await estafeta.serve(new, no_workers=True)  # ingest updated first
    async with hub_client(serve) as hub:
        msg_ids = [f"msg_{n}" for n in range(EVENTS)]
        sent = await hub.send_many(
            [{"type": "appointment.booked", "data": {"n": n}} for n in range(EVENTS)], msg_ids
        )
        assert sent.statuses == [202] * EVENTS, sent.errors
        found = await old_worker.wait_log("destination_configured_elsewhere")
        assert found["destinations"] == ["agenda"]
        assert await hub.queue() == {"pending": EVENTS}
        assert await hub.dead("agenda") == []

        estafeta.worker(new, name="new-worker")
        assert await sink.wait_for(lambda s: sent.acknowledged <= s.delivered_ids, 30)
        assert await settled(hub, database_url, timeout_s=20) == {"succeeded": EVENTS}
        assert await hub.dead("agenda") == []
    assert not [e for e in old_worker.log_events() if e.get("event") == "unknown_destinations"]
    # An HTTP-only `serve` says it stopped, as a worker does: a rolling restart's log
    # shows each process leave.
    assert await serve.stop() == 0, serve.tail()
    [stopped] = [e for e in serve.log_events() if e.get("event") == "server_stopped"]
    assert stopped["listen"] == f"127.0.0.1:{port}"

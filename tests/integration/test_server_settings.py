"""Settings a DBA or a managed PostgreSQL puts on the database or the role, which every
session of estafeta inherits: the hub's paths behave as on a default server, or fail with
an error that says why.

Each test has a database of its own (`ALTER DATABASE … SET` reaches only its sessions)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from structlog.testing import capture_logs

from estafeta.cli import main
from estafeta.config import load_config_dict
from estafeta.store import open_store
from estafeta.testing.sink import Sink
from tests.conftest import _pg_sync_url, base_config, fresh_database
from tests.integration.test_cli_store import config_file
from tests.integration.test_ingress_api import ADMIN, make_client
from tests.integration.test_worker import Running, config_for

pytestmark = pytest.mark.postgres


@contextmanager
def database_with(*settings: str) -> Iterator[str]:
    """A fresh database whose sessions start with `settings` (`name = 'value'`)."""
    with fresh_database("estafeta_settings") as url:
        admin = create_engine(_pg_sync_url(url), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                name = url.rsplit("/", 1)[1]
                for setting in settings:
                    conn.execute(text(f'ALTER DATABASE "{name}" SET {setting}'))
        finally:
            admin.dispose()
        yield url


@pytest.mark.parametrize("level", ["serializable", "repeatable read"])
async def test_a_stricter_default_isolation_leases_and_records_as_read_committed(
    level: str, sink: Sink
) -> None:
    """`default_transaction_isolation` stricter than PostgreSQL's default (some managed
    databases, a DBA's choice): two workers leasing one backlog while webhooks keep coming
    deliver each event once, with no serialization failure taken for an outage
    (`store_unavailable`, an attempt sent but `attempt_not_recorded`)."""
    with database_with(f"default_transaction_isolation = '{level}'") as url:
        # The default timeout, not the 2 s of base_config: on a busy machine the sink (in this
        # loop) answered the last of the workers' first ~450 sends in up to 1.9 s, and five
        # timeouts in a row opened the circuit for 30 s, this test's whole wait.
        config = config_for(url, sink, timeout_s=30)
        stores = [open_store(config.storage.url) for _ in range(3)]
        await stores[0].migrate()
        await stores[0].sync_config(config, int(time.time() * 1000))
        ingest = Running(stores[0], config, started=False)
        workers = [Running(s, config, handoff=False, started=False) for s in stores[1:]]
        try:
            with capture_logs() as logs:
                ids = await asyncio.gather(*[ingest.publish(n=n) for n in range(400)])
                for worker in workers:
                    worker.start()
                ids += await asyncio.gather(*[ingest.publish(n=n) for n in range(400)])
                delivered = await sink.wait_for(lambda s: len(s.delivered_ids) == len(ids), 30)
                # What the workers said, should they stall: captured, it is not printed.
                said = [(e["event"], e.get("error")) for e in logs if e["log_level"] != "debug"]
                assert delivered, (len(sink.delivered_ids), len(ids), said[-20:])
        finally:
            for running in [*workers, ingest]:
                await running.stop()
            for store in stores:
                await store.close()
        assert sink.delivered_ids == set(ids) and sink.duplicates == 0
        warned = [e["event"] for e in logs if e["log_level"] in ("warning", "error")]
        assert warned == []


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        # A read replica given by mistake, or a database a DBA made read-only.
        ("default_transaction_read_only = on", "cannot execute CREATE TABLE in a read-only"),
        # A search_path naming no schema that exists (PostgreSQL 15: none the role may use).
        ("search_path = nowhere", "no schema has been selected to create in"),
    ],
)
def test_migrate_where_it_cannot_create_the_schema_says_why(
    setting: str, reason: str, tmp_path: Path
) -> None:
    """The server's own reason, not only its SQLSTATE (25006, 3F000) to look up."""
    with database_with(setting) as url:
        result = CliRunner().invoke(main, ["migrate", "--config", str(config_file(tmp_path, url))])
    assert result.exit_code in (2, 3)
    assert reason in result.output, result.output
    assert "none of it was kept" in result.output


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("lock_timeout = '100ms'", "canceling statement due to lock timeout"),
        ("statement_timeout = '300ms'", "canceling statement due to statement timeout"),
    ],
)
async def test_a_read_the_server_cancels_is_answered_503_and_logged_with_its_reason(
    setting: str, reason: str
) -> None:
    """A role's `statement_timeout` or `lock_timeout` (as managed databases set) cancels an
    API read that waits for a table another session locks: the request is answered 503,
    and the log says the server cancelled it, and why (57014, 55P03), not only that the
    store "cannot be reached"."""
    with database_with(setting) as url:
        config = load_config_dict(base_config(url))
        store = open_store(config.storage.url)
        try:
            await store.migrate()
            await store.sync_config(config, int(time.time() * 1000))
            async for client in make_client(store, config):
                locker = await asyncpg.connect(url)
                try:
                    async with locker.transaction():
                        await locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                        with capture_logs() as logs:
                            answer = await client.http.get("/api/v1/events/evt_x", headers=ADMIN)
                finally:
                    await locker.close()
        finally:
            await store.close()
    assert answer.status_code == 503
    [error] = [e["error"] for e in logs if e["event"] == "store_unavailable"]
    assert reason in error, error

"""estafeta behind PgBouncer in transaction mode, as hosted poolers run it (Supabase's,
Heroku's, a PgBouncer beside the database): `migrate`, `serve` and a separate `worker` with
`?statement_cache_size=0`, and a clear refusal without it (docs/configuration.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    TENANT,
    Estafeta,
    hub_client,
    leads_to_crm_config,
    run_cli,
)
from tests.conftest import SINK_SECRET, fresh_database, pgbouncer


@pytest.mark.timeout(120)
async def test_serve_and_a_worker_deliver_through_pgbouncer_in_transaction_mode(
    tmp_path: Path, estafeta: Estafeta
) -> None:
    sink = Sink(secret=SINK_SECRET)
    await sink.start()
    try:
        with (
            fresh_database("estafeta_pgbouncer") as direct,
            pgbouncer(tmp_path, direct, pool_mode="transaction") as pooled,
        ):
            # Without the setting: refused at start, saying what to add, the second
            # `migrate` as the first (it was the second that failed, on the first's
            # prepared statements left on the server connection).
            refused = leads_to_crm_config(pooled, tmp_path, sink.url)
            for _ in range(2):
                migrated = await run_cli("migrate", "--config", str(refused), cwd=tmp_path)
                assert migrated.returncode == 2, migrated
                assert migrated.stderr.endswith(
                    f"error: {pooled}: the store failed: a pooler in transaction mode"
                    " (PgBouncer) is in front of PostgreSQL: add ?statement_cache_size=0 to"
                    " storage.url\n"
                ), migrated

            config = leads_to_crm_config(f"{pooled}?statement_cache_size=0", tmp_path, sink.url)
            for _ in range(2):
                migrated = await run_cli("migrate", "--config", str(config), cwd=tmp_path)
                assert migrated.returncode == 0, migrated
            serve = await estafeta.serve(config, no_workers=True)
            worker = estafeta.worker(config)
            await worker.wait_log("worker_started")
            # More webhooks at once than the pool has server connections (5).
            async with hub_client(serve) as hub:
                answers = await asyncio.gather(
                    *(
                        hub.post_signed({"type": "lead.created", "data": {"n": n}}, f"msg_{n}")
                        for n in range(30)
                    )
                )
            assert {status for status, _ in answers} == {202}, answers
            ids = {answer["id"] for _, answer in answers}
            assert await sink.wait_for(lambda s: ids <= s.delivered_ids, timeout_s=30)
            # The CLI's commands read and write the store the same way.
            created = await run_cli(
                "keys", "create", "--config", str(config), "--tenant", TENANT, cwd=tmp_path
            )
            assert created.returncode == 0, created
            listed = await run_cli("dlq", "list", "--config", str(config), cwd=tmp_path)
            assert listed.returncode == 0, listed
            assert await worker.stop() == 0, worker.tail()
            assert await serve.stop() == 0, serve.tail()
    finally:
        await sink.stop()

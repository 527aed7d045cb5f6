"""A worker running alone can be scraped: `estafeta worker --metrics-listen` serves this
process's /metrics (its attempts counted as it delivers) and /health, and stops with it."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    Estafeta,
    HubClient,
    client_session,
    leads_to_crm_config,
    settled,
)

ATTEMPTS = re.compile(
    r'^estafeta_delivery_attempts_total\{destination="crm",outcome="success"\} (\S+)$', re.M
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_lone_workers_own_metrics_count_what_it_delivered(
    database_url: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    config = leads_to_crm_config(database_url, tmp_path, sink.url)
    serve = await estafeta.serve(config, no_workers=True)
    worker = estafeta.worker(config, "--metrics-listen", "127.0.0.1:0")
    listening = await worker.wait_log("metrics_listening")
    host, _, metrics_port = listening["listen"].rpartition(":")
    assert host == "127.0.0.1" and int(metrics_port) > 0  # the port bound, not 0
    endpoint = f"http://127.0.0.1:{metrics_port}"

    async with client_session() as http:
        hub = HubClient(serve.base_url, http)
        async with http.get(f"{endpoint}/health") as health:
            assert (health.status, await health.json()) == (
                200,
                {"status": "ok", "version": (await health.json())["version"]},
            )
        sent = await hub.send_leads(5)
        assert sent.statuses == [202] * 5
        assert await settled(hub, database_url, timeout_s=20) == {"succeeded": 5}

        async with http.get(f"{endpoint}/metrics") as scraped:
            assert scraped.status == 200
            assert scraped.headers["Content-Type"].startswith("text/plain; version=")
            text = await scraped.text()
        assert [float(n) for n in ATTEMPTS.findall(text)] == [5.0]
        # The hub-wide gauges are `serve`'s to report, read from the store.
        assert "estafeta_deliveries{" not in text
        async with http.get(f"{endpoint}/api/v1/events") as elsewhere:
            assert elsewhere.status == 404
            assert (await elsewhere.json())["error"] == "not_found"

    assert await worker.stop() == 0, worker.tail()
    async with client_session() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{endpoint}/health")

"""/metrics, the backlog alert and /health/detailed, seen from outside."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from structlog.testing import capture_logs

from estafeta.api.app import create_app
from estafeta.config import Config, load_config_dict
from estafeta.hub import Hub
from estafeta.observability.monitor import BacklogMonitor
from estafeta.store.sqlstore import SqlStore
from tests.conftest import base_config, lease_any
from tests.integration.redis_support import RedisServer

ADMIN = {"authorization": "Bearer test-admin-key"}


@pytest.fixture
async def hub(config: Config, store: SqlStore) -> AsyncIterator[Hub]:
    made = Hub(config, store)
    yield made
    await made.close()


async def accept(hub: Hub, n: int) -> None:
    for i in range(n):
        await hub.accept(
            tenant_id="clinica-sol",
            source_id="crm-events",
            event_type="message.received",
            data={"i": i},
            idempotency_key=None,
        )


async def test_metrics_report_accepted_events_and_the_queue(hub: Hub) -> None:
    await accept(hub, 3)
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        r = await http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'estafeta_deliveries{state="pending"} 3.0' in text
    assert 'estafeta_events_accepted_total{outcome="stored",source="crm-events"}' in text


async def test_the_backlog_alert_fires_and_resolves_once(hub: Hub, store: SqlStore) -> None:
    monitor = BacklogMonitor(store, threshold=3)
    with capture_logs() as logs:
        await accept(hub, 2)
        await monitor.check()
        assert monitor.firing == set()
        await accept(hub, 1)
        await monitor.check()
        await monitor.check()  # still over: no second alert
        assert monitor.firing == {"queue_backlog"}
        leased = await lease_any(store, now_ms=hub.clock.now_ms(), limit=10)
        assert len(leased) == 3
        await monitor.check()  # nothing pending any more
    assert monitor.firing == set()
    assert [e["event"] for e in logs if e["event"].startswith("alert_")] == [
        "alert_fired",
        "alert_resolved",
    ]


async def test_detailed_health_shows_circuits_and_queue(hub: Hub) -> None:
    from estafeta.delivery.circuit import CircuitPolicy, record

    policy = CircuitPolicy(failures=1)
    await hub.circuit_states.update("billing", lambda c: record(c, policy, success=False, now_ms=1))
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        body = (await http.get("/health/detailed", headers=ADMIN)).json()
    assert body["checks"]["circuits"]["billing"]["state"] == "open"
    assert body["checks"]["store"]["status"] == "ok"


async def test_detailed_health_reports_redis_and_stays_up_without_it(
    database_url: str, store: SqlStore, own_redis: RedisServer
) -> None:
    config = load_config_dict({**base_config(database_url), "redis": {"url": own_redis.url}})
    hub = Hub(config, store)
    transport = httpx.ASGITransport(app=create_app(hub))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            r = await http.get("/health/detailed", headers=ADMIN)
            assert (r.status_code, r.json()["status"]) == (200, "ok")
            assert r.json()["checks"]["redis"] == {"status": "ok"}
            own_redis.kill()
            r = await http.get("/health/detailed", headers=ADMIN)
    finally:
        await hub.close()
    # Degraded, not down: circuits and rate limits carry on from process memory.
    assert (r.status_code, r.json()["status"]) == (200, "degraded")
    redis_check = r.json()["checks"]["redis"]
    assert redis_check["status"] == "unavailable" and "per process" in redis_check["effect"]
    assert r.json()["checks"]["store"]["status"] == "ok"

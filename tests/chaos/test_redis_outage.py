"""Redis stopped mid-run: deliveries go on (rate limit and circuits fall back to process
memory), `redis_unavailable` is logged once per component that uses Redis, nothing is lost,
and when Redis is back on the same port `redis_available` is logged and Redis is used again.
An outage longer than `worker.alert_redis_down_s` fires the `redis_down` alert.

The Redis is this test's own `redis-server` (killed with SIGKILL and started again); the
shared one on 6379 is never touched.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    Estafeta,
    Proc,
    hub_client,
    leads_to_crm_config,
    report,
    wait_until,
)
from tests.chaos.conftest import (
    Load,
    RedisProcess,
    acknowledged_and_delivered,
    all_delivered,
    arrivals,
    lead,
    logged,
    median,
    per_second,
    settled_deliveries,
)
from tests.integration.redis_support import fill_past_maxmemory

RATE_PER_S = 40
BEFORE_S = 3.0
OUTAGE_S = 7.0  # longer than the 5 s between tries: a failed retry must not log again
# What uses Redis in `serve` (RedisFailover names): its worker's two, and ingest's.
COMPONENTS = {"throttle", "circuit_store", "ingress_rate_limit"}


async def logged_by_each(serve: Proc, event: str, components: set[str], timeout_s: float) -> None:
    """Wait until each of `components` has logged `event` (`redis_unavailable`, …)."""

    async def each() -> bool:
        return {e.get("component") for e in logged(serve, event)} >= components

    await wait_until(each, timeout_s=timeout_s, what=f"{event} from {sorted(components)}")


async def stopped_and_settled(
    load: Load, stop_load: asyncio.Event, sending: asyncio.Task[int], sink: Sink, database: str
) -> tuple[int, dict[str, set[str]], set[str]]:
    """Stop the load; every webhook sent was acknowledged, delivered and its delivery
    settled as succeeded. Returns how many were sent, what was acknowledged and what lost."""
    stop_load.set()
    sent = await asyncio.wait_for(sending, timeout=30)
    acknowledged, missing = await acknowledged_and_delivered(load, sink, sent=sent, timeout_s=20)
    assert await settled_deliveries(database, timeout_s=20) == {"succeeded": sent}
    return sent, acknowledged, missing


def redis_outage_config(
    database_url: str, workdir: Path, sink: Sink, own_redis: RedisProcess, **overrides: Any
) -> Path:
    """crm at `sink`, everything that can use Redis on this test's own Redis: crm's rate
    limit (500/second, never reached) is there to be counted in it."""
    return leads_to_crm_config(
        database_url,
        workdir,
        sink.url,
        rate_limit="500/second",
        redis_url=own_redis.url,
        **overrides,
    )


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_deliveries_go_on_while_redis_is_down_and_redis_is_used_again_after(
    chaos_database: str, own_redis: RedisProcess, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    started = time.monotonic()
    config = redis_outage_config(chaos_database, tmp_path, sink, own_redis, max_attempts=10)
    serve = await estafeta.serve(config)

    async with hub_client(serve) as hub:
        load = Load(hub, give_up_after_s=30)
        stop_load = asyncio.Event()
        sending = asyncio.create_task(load.steady(RATE_PER_S, stop_load, lead))
        await asyncio.sleep(BEFORE_S)  # the scenario's timeline
        assert sink.delivered_ids, "nothing delivered before Redis went away"
        client = redis.asyncio.Redis.from_url(own_redis.url)
        try:
            throttle_keys = [k async for k in client.scan_iter(match="estafeta:throttle*")]
            ingress_keys = [k async for k in client.scan_iter(match="estafeta:ingress:*")]
        finally:
            await client.aclose()
        assert throttle_keys, "the rate limit does not count in Redis"
        assert ingress_keys, "the tenant's inbound rate limit does not count in Redis"

        await own_redis.kill()
        killed_at = time.monotonic()
        await serve.wait_log("redis_unavailable", timeout_s=10)
        await asyncio.sleep(max(0.0, killed_at + OUTAGE_S - time.monotonic()))
        await own_redis.start()
        restarted_at = time.monotonic()

        # Redis is tried again every 5 s (RedisFailover.retry_s) by each component.
        await logged_by_each(serve, "redis_available", COMPONENTS, timeout_s=15)
        sent, acknowledged, missing = await stopped_and_settled(
            load, stop_load, sending, sink, chaos_database
        )

    ok = arrivals(sink, status=200)
    before = per_second(ok, started + 1, killed_at)
    during = per_second(ok, killed_at, restarted_at)
    assert min(during) > 0, f"a second without deliveries while Redis was down: {during}"
    assert median(during) >= 0.7 * median([n for n in before if n]), (before, during)
    unavailable = Counter(e.get("component") for e in logged(serve, "redis_unavailable"))
    assert unavailable == dict.fromkeys(COMPONENTS, 1), unavailable
    assert logged(serve, "task_crashed") == []
    # 7 s is under worker.alert_redis_down_s (60 by default): a blip pages nobody.
    assert [e for e in logged(serve, "alert_fired") if e.get("alert") == "redis_down"] == []
    assert sink.duplicates == 0
    report("chaos redis_outage", sink, acknowledged, sent=sent, lost=len(missing), started=started)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_a_redis_outage_is_alerted_and_reading_health_does_not_log_it_again(
    chaos_database: str, own_redis: RedisProcess, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    started = time.monotonic()
    config = redis_outage_config(
        chaos_database, tmp_path, sink, own_redis, worker={"alert_redis_down_s": 1}
    )
    serve = await estafeta.serve(config)
    async with hub_client(serve) as hub:
        load = Load(hub)
        await load.burst([lead(n) for n in range(5)], concurrency=5)
        await own_redis.kill()
        await load.burst([lead(n) for n in range(5, 10)], concurrency=5)

        await logged_by_each(serve, "redis_unavailable", COMPONENTS, timeout_s=10)

        async def alerted() -> bool:
            return any(e.get("alert") == "redis_down" for e in logged(serve, "alert_fired"))

        # The monitor pings every 5 s: a failed ping, then one a second or more after it.
        await wait_until(alerted, timeout_s=15, what="alert_fired redis_down")
        # What an operator (or a Prometheus scrape of /metrics) does during the outage.
        detailed = await hub.get_json("/health/detailed")
        assert detailed["status"] == "degraded", detailed
        assert detailed["checks"]["redis"]["status"] == "unavailable", detailed
        assert "redis_down" in detailed["checks"]["alerts"]["firing"], detailed
        # This serve delivers: its own circuits are its live view, and shown.
        assert detailed["checks"]["circuits"]["crm"]["state"] == "closed", detailed
        acknowledged = load.acknowledged()
        missing = await all_delivered(sink, acknowledged, timeout_s=10)
    unavailable = Counter(e.get("component") for e in logged(serve, "redis_unavailable"))
    report(
        "chaos redis_logged_once",
        sink,
        acknowledged,
        sent=load.sent,
        lost=len(missing),
        started=started,
    )
    assert not missing
    assert unavailable == dict.fromkeys(COMPONENTS, 1), unavailable


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_a_full_redis_is_one_outage_with_its_reason_not_one_per_try(
    chaos_database: str, own_redis: RedisProcess, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    """Redis full (`maxmemory`, `noeviction`): it still answers PINGs and reads, and refuses
    every write. Deliveries go on from memory; each component that writes logs the outage
    once, with its reason, over three tries of Redis (not `redis_available` then
    `redis_unavailable` every 5 s); health and the alert say why; once memory is freed Redis
    is used again. crm never fails, so its circuit is only read, which a full Redis answers:
    the circuits have no outage."""
    writers = COMPONENTS - {"circuit_store"}
    started = time.monotonic()
    config = redis_outage_config(
        chaos_database, tmp_path, sink, own_redis, worker={"alert_redis_down_s": 1}
    )
    serve = await estafeta.serve(config)
    admin = redis.asyncio.Redis.from_url(own_redis.url)
    async with hub_client(serve) as hub:
        load = Load(hub, give_up_after_s=30)
        stop_load = asyncio.Event()
        sending = asyncio.create_task(load.steady(RATE_PER_S, stop_load, lead))
        await asyncio.sleep(1.0)
        with redis.Redis.from_url(own_redis.url) as blocking:
            await asyncio.to_thread(fill_past_maxmemory, blocking)

        await logged_by_each(serve, "redis_unavailable", writers, timeout_s=15)
        await asyncio.sleep(3 * 5.0)  # three tries of Redis per component (retry_s)
        detailed = await hub.get_json("/health/detailed")
        refused = logged(serve, "redis_unavailable")
        flapped = logged(serve, "redis_available")
        await admin.config_set("maxmemory", 0)

        await logged_by_each(serve, "redis_available", writers, timeout_s=20)
        sent, acknowledged, missing = await stopped_and_settled(
            load, stop_load, sending, sink, chaos_database
        )
    await admin.aclose()
    report("chaos redis_full", sink, acknowledged, sent=sent, lost=len(missing), started=started)
    assert flapped == [], flapped
    assert Counter(e.get("component") for e in refused) == dict.fromkeys(writers, 1), refused
    assert all("out of memory" in e.get("reason", "") for e in refused), refused
    assert detailed["checks"]["redis"]["status"] == "unavailable", detailed
    assert "out of memory" in detailed["checks"]["redis"]["reason"], detailed
    assert "redis_down" in detailed["checks"]["alerts"]["firing"], detailed
    fired = [e for e in logged(serve, "alert_fired") if e.get("alert") == "redis_down"]
    assert len(fired) == 1 and "out of memory" in fired[0]["reason"], fired
    assert sink.duplicates == 0
    assert logged(serve, "task_crashed") == []

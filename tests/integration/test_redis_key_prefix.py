"""Two deployments on one Redis database (staging and production, or several customers' hubs),
whose operators name their destinations and tenants alike: each keeps its circuits, budgets
and limits under its own `[redis] key_prefix`, and a process of another store on a prefix in
use is refused (redis_prefix.py). On the shared Redis, under prefixes of the test's own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio
from structlog.testing import capture_logs

from estafeta.clock import SystemClock
from estafeta.config import Config, load_config_dict
from estafeta.delivery.breakers import Breakers
from estafeta.delivery.circuit import Circuit, CircuitState
from estafeta.delivery.presence import Presence
from estafeta.delivery.worker import Worker
from estafeta.errors import RedisKeyPrefixShared
from estafeta.hub import Hub
from estafeta.redis_client import connect_redis
from estafeta.redis_prefix import LIVE_S, PrefixProcesses
from estafeta.server import announced, store_clock
from estafeta.store.sqlstore import SqlStore
from estafeta.supervise import Tasks
from tests.conftest import base_config, migrated_store
from tests.integration.redis_support import SHARED_REDIS_URL

pytestmark = pytest.mark.timeout(60)

OPEN = Circuit(CircuitState.OPEN, consecutive_failures=5, opened_at=1_000)


def deployment(database_url: str, key_prefix: str) -> Config:
    """The same destinations and tenants as any other deployment (`crm`, `clinica-sol`), with
    a send budget and an inbound limit small enough to spend."""
    data = base_config(database_url, redis={"url": SHARED_REDIS_URL, "key_prefix": key_prefix})
    data["tenants"][0]["ingress_rate_limit"] = "3/minute"
    data["destinations"][0]["rate_limit"] = "2/minute"
    return load_config_dict(data)


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    client = connect_redis(SHARED_REDIS_URL)
    yield client
    await client.aclose()


async def test_deployments_under_their_own_key_prefixes_share_no_circuit_budget_or_limit(
    tmp_path: Path, shared_prefix: str, client: redis.asyncio.Redis
) -> None:
    # Before `[redis] key_prefix`, every deployment kept its state under `estafeta:`: the
    # staging's failing `crm` stopped production's deliveries, its sends spent production's
    # `rate_limit` and its webhooks the tenant's `ingress_rate_limit` there.
    staging, production = (
        deployment(f"sqlite:///{tmp_path / f'{name}.db'}", f"{shared_prefix}{name}:")
        for name in ("staging", "production")
    )
    async with (
        migrated_store(staging) as staging_store,
        migrated_store(production) as production_store,
    ):
        hubs = Hub(staging, staging_store), Hub(production, production_store)
        workers = [
            Worker(store, config, breakers=Breakers(hub.circuit_states, config))
            for store, config, hub in zip(
                (staging_store, production_store), (staging, production), hubs, strict=True
            )
        ]
        try:
            (staging_hub, production_hub), (staging_worker, production_worker) = hubs, workers
            await staging_hub.circuit_states.update("crm", lambda c: OPEN)
            assert await staging_hub.circuit_states.get_all() == {"crm": OPEN}
            assert await production_hub.circuit_states.get_all() == {}

            sends = [await staging_worker.throttle.acquire("crm") for _ in range(3)]
            assert sends[:2] == [None, None] and sends[2] is not None
            assert await production_worker.throttle.acquire("crm") is None

            webhooks = [await staging_hub.rate_limiter.admit("clinica-sol") for _ in range(4)]
            assert webhooks[:3] == [None] * 3 and webhooks[3] is not None
            await staging_hub.rate_limiter.share()
            assert await production_hub.rate_limiter.admit("clinica-sol") is None

            # Every key each one wrote is under its own prefix.
            await production_hub.rate_limiter.share()
            keys = {key.decode() async for key in client.scan_iter(match=f"{shared_prefix}*")}
            assert f"{shared_prefix}staging:circuits" in keys
            for name in ("staging", "production"):
                mine = {k for k in keys if k.startswith(f"{shared_prefix}{name}:")}
                assert {k.split(":")[3][:8] for k in mine} >= {"throttle", "ingress"}
            assert all(k.startswith((f"{shared_prefix}staging:", f"{shared_prefix}production:"))
                       for k in keys)  # fmt: skip
        finally:
            for worker in workers:
                await worker.throttle.aclose()
            for hub in hubs:
                await hub.close()


async def start(store: SqlStore, config: Config, client: redis.asyncio.Redis) -> Presence:
    """A process's start as `serve` and `worker` make it."""
    clock = await store_clock(store)
    return await announced(store, config, delivers=True, tasks=Tasks(), clock=clock, redis=client)


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_process_of_another_store_is_refused_on_a_prefix_in_use_and_its_own_are_not(
    database_url: str, tmp_path: Path, shared_prefix: str, client: redis.asyncio.Redis
) -> None:
    # Both keep the default-like shared prefix: the operator forgot to set one.
    staging = deployment(database_url, shared_prefix)
    production = deployment(f"sqlite:///{tmp_path / 'production.db'}", shared_prefix)
    async with (
        migrated_store(staging) as staging_store,
        migrated_store(production) as production_store,
    ):
        first = await start(staging_store, staging, client)
        second = await start(staging_store, staging, client)  # `serve` and a `worker`
        with pytest.raises(RedisKeyPrefixShared) as refused:
            await start(production_store, production, client)
        message = str(refused.value)
        assert f"the Redis key prefix {shared_prefix!r} is in use" in message
        assert "`[redis] key_prefix`" in message and "database number" in message
        assert first.process_id in message and second.process_id in message
        # Refused before it recorded itself anywhere.
        assert await production_store.live_processes(seen_since_ms=0) == []
        key = f"{shared_prefix}processes"
        recorded = await PrefixProcesses(client, shared_prefix, "-").others(record=False)
        assert recorded == {first.process_id, second.process_id}
        assert 0 < await client.pttl(key) <= 2 * LIVE_S * 1000

        # A rolling restart: a process stopped a moment ago is still recorded in Redis, and
        # its store knows it, so the one that replaces it starts.
        await first.retire()
        await start(staging_store, staging, client)


async def test_a_running_process_logs_another_stores_processes_on_its_prefix(
    tmp_path: Path, shared_prefix: str, client: redis.asyncio.Redis
) -> None:
    staging, production = (
        deployment(f"sqlite:///{tmp_path / f'{name}.db'}", shared_prefix)
        for name in ("staging", "production")
    )
    async with (
        migrated_store(staging) as staging_store,
        migrated_store(production) as production_store,
    ):
        running = await start(staging_store, staging, client)
        # Production started while Redis was unreachable (a start is not refused then), or at
        # the same moment: it records itself at its next announcement.
        intruder = Presence(
            production_store,
            production,
            process_id="prod:1:abc",
            clock=SystemClock(),
            redis=PrefixProcesses(client, shared_prefix, "prod:1:abc"),
        )
        with capture_logs() as intruder_logs:
            await intruder.announce()
        assert [e["processes"] for e in intruder_logs] == [[running.process_id]]
        with capture_logs() as logs:
            await running.announce()
            await running.announce()  # said once, not every 10 s
        shared = [e for e in logs if e["event"] == "redis_key_prefix_shared"]
        assert shared == [
            {
                "event": "redis_key_prefix_shared",
                "log_level": "error",
                "key_prefix": shared_prefix,
                "processes": ["prod:1:abc"],
                "process": running.process_id,
            }
        ]

        # Production stops; a minute later its process no longer counts, however long the
        # staging keeps the key alive.
        seconds, _ = await client.time()
        gone = (int(seconds) - int(LIVE_S) - 1) * 1000
        await client.zadd(f"{shared_prefix}processes", {"prod:1:abc": gone})
        with capture_logs() as logs:
            await running.announce()
            await start(staging_store, staging, client)
        assert [e for e in logs if e["event"] == "redis_key_prefix_shared"] == []

"""The tenants' inbound rate limit shared by several `serve` processes through Redis: the
shared server under a prefix of the test's own, or a Redis of the test's own to take away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio
from structlog.testing import capture_logs

from estafeta.api.app import create_app
from estafeta.config import Config, load_config_dict
from estafeta.hub import Hub
from estafeta.ingress.ratelimit import TenantRateLimiter
from estafeta.redis_client import connect_redis
from estafeta.store.sqlstore import SqlStore
from tests.conftest import base_config
from tests.integration.redis_support import SHARED_REDIS_URL, RedisServer
from tests.integration.test_ingress_api import MESSAGE, signed


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limited(limit: str) -> Config:
    return load_config_dict(
        {"tenants": [{"id": "acme", "name": "Acme", "ingress_rate_limit": limit}]}
    )


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    client = connect_redis(SHARED_REDIS_URL)
    yield client
    await client.aclose()


def admitted(limiter: TenantRateLimiter, n: int) -> int:
    """How many of `n` requests the limiter lets through."""
    return sum(limiter.retry_after("acme") is None for _ in range(n))


async def test_two_processes_draw_from_one_tenant_budget(
    client: redis.asyncio.Redis, shared_prefix: str
) -> None:
    clock = FakeClock(1_000_020.0)  # the start of a minute
    a, b = (
        TenantRateLimiter(limited("10/minute"), clock=clock, redis=client, key_prefix=shared_prefix)
        for _ in range(2)
    )
    try:
        assert admitted(a, 6) == 6
        await a.share()
        await b.share()  # b learns a's 6 before its next requests
        assert admitted(b, 10) == 4
        assert b.retry_after("acme") is not None
        await b.share()
        await a.share()
        assert admitted(a, 10) == 0  # the whole budget is spent, by both together
        keys = [key async for key in client.scan_iter(match=f"{shared_prefix}ingress:acme:*")]
        assert len(keys) == 1 and int(await client.get(keys[0]) or 0) == 10
        assert 0 < await client.ttl(keys[0]) <= 180  # gone three windows later
    finally:
        await a.aclose()
        await b.aclose()


async def test_each_tenant_learns_its_own_total_from_one_share(
    client: redis.asyncio.Redis, shared_prefix: str
) -> None:
    # One read brings back every tenant's totals: each must land on its own tenant, whatever
    # the limits' periods and whichever tenants had new counts to add.
    config = load_config_dict(
        {
            "tenants": [
                {"id": "acme", "name": "Acme", "ingress_rate_limit": "10/minute"},
                {"id": "idle", "name": "Idle", "ingress_rate_limit": "5/minute"},
                {"id": "sol", "name": "Sol", "ingress_rate_limit": "4/second"},
            ]
        }
    )
    clock = FakeClock(1_000_020.0)  # the start of a minute and of a second
    a, b = (
        TenantRateLimiter(config, clock=clock, redis=client, key_prefix=shared_prefix)
        for _ in range(2)
    )
    try:
        assert sum(a.retry_after("acme") is None for _ in range(7)) == 7
        assert sum(a.retry_after("sol") is None for _ in range(3)) == 3
        await a.share()
        await b.share()
        assert sum(b.retry_after("acme") is None for _ in range(10)) == 3
        assert sum(b.retry_after("sol") is None for _ in range(10)) == 1
        assert sum(b.retry_after("idle") is None for _ in range(10)) == 5
    finally:
        await a.aclose()
        await b.aclose()


async def test_counts_are_shared_in_the_background_while_requests_come(
    client: redis.asyncio.Redis, shared_prefix: str
) -> None:
    clock = FakeClock(1_000_020.0)
    a = TenantRateLimiter(limited("10/minute"), clock=clock, redis=client, key_prefix=shared_prefix)
    b = TenantRateLimiter(limited("10/minute"), clock=clock, redis=client, key_prefix=shared_prefix)
    try:
        assert admitted(a, 7) == 7  # no share called: the limiter shares by itself
        key = f"{shared_prefix}ingress:acme:60:{1_000_020 // 60}"
        async with asyncio.timeout(5):
            while await client.get(key) != b"7":
                await asyncio.sleep(0.02)
        await b.share()
        assert admitted(b, 10) == 3
    finally:
        await a.aclose()
        await b.aclose()


async def test_closing_shares_what_was_counted_since_the_last_share(
    client: redis.asyncio.Redis, shared_prefix: str
) -> None:
    clock = FakeClock(1_000_020.0)
    a = TenantRateLimiter(limited("10/minute"), clock=clock, redis=client, key_prefix=shared_prefix)
    assert admitted(a, 5) == 5
    await a.aclose()  # before the background share's interval is up
    assert await client.get(f"{shared_prefix}ingress:acme:60:{1_000_020 // 60}") == b"5"


async def test_a_redis_outage_limits_each_process_on_its_own_then_catches_up(
    own_redis: RedisServer,
) -> None:
    clock = FakeClock(1_000_020.0)
    client = connect_redis(own_redis.url, timeout_s=0.5)
    a = TenantRateLimiter(limited("10/minute"), clock=clock, redis=client, retry_s=0)
    try:
        assert admitted(a, 3) == 3
        await a.share()
        own_redis.kill()
        with capture_logs() as logs:
            assert admitted(a, 4) == 4
            await a.share()  # fails: the 4 wait for the next share, and still count here
            await a.share()
            assert admitted(a, 10) == 3  # its own 10, no more
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["redis_unavailable"]
        own_redis.start()  # empty: this Redis keeps nothing on disk, the first 3 are gone
        await a.share()
        # What was counted during the outage reached Redis once it was back.
        assert await client.get(f"estafeta:ingress:acme:60:{1_000_020 // 60}") == b"7"
    finally:
        await a.aclose()
        await client.aclose()


async def test_two_serve_processes_with_redis_answer_429_past_the_shared_limit(
    store: SqlStore, database_url: str, own_redis: RedisServer
) -> None:
    data = base_config(database_url)
    data["tenants"][0]["ingress_rate_limit"] = "4/minute"
    data["redis"] = {"url": own_redis.url}
    config = load_config_dict(data)
    hubs = [Hub(config, store), Hub(config, store)]

    async def post(hub: Hub, i: int) -> int:
        transport = httpx.ASGITransport(app=create_app(hub))
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            r = await http.post("/in/crm-events", content=MESSAGE, headers=signed(MESSAGE, f"m{i}"))
            return r.status_code

    try:
        first = [await post(hubs[0], i) for i in range(3)]
        await hubs[0].rate_limiter.share()
        await hubs[1].rate_limiter.share()
        second = [await post(hubs[1], i) for i in range(3, 6)]
    finally:
        for hub in hubs:
            await hub.close()
    assert (first, second) == ([202, 202, 202], [202, 429, 429])


async def test_a_process_idle_until_now_does_not_admit_what_another_already_spent(
    store: SqlStore, database_url: str, own_redis: RedisServer
) -> None:
    """A process decides from the other processes' counts as it last read them; one that had
    no requests for a while (or just started) has read nothing recent and, unless it reads
    first, admits the tenant's whole budget again: two processes, twice the limit."""
    data = base_config(database_url)
    data["tenants"][0]["ingress_rate_limit"] = "4/minute"
    data["redis"] = {"url": own_redis.url}
    config = load_config_dict(data)
    busy, idle = Hub(config, store), Hub(config, store)
    redis_client = redis.asyncio.Redis.from_url(own_redis.url)

    async def post(hub: Hub, i: int) -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(hub))
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            return await http.post(
                "/in/crm-events", content=MESSAGE, headers=signed(MESSAGE, f"m{i}")
            )

    async def shared_count() -> int:
        keys = [k async for k in redis_client.scan_iter(match="estafeta:ingress:clinica-sol:*")]
        return sum(int(v or 0) for v in await redis_client.mget(keys)) if keys else 0

    try:
        assert [(await post(busy, i)).status_code for i in range(4)] == [202] * 4
        async with asyncio.timeout(5):  # the busy process shares its counts by itself
            while await shared_count() < 4:
                await asyncio.sleep(0.02)
        refused = [await post(idle, i) for i in range(4, 6)]
    finally:
        for hub in (busy, idle):
            await hub.close()
        await redis_client.aclose()
    assert [r.status_code for r in refused] == [429, 429]
    # The budget is spent until enough of the four requests slide out of the window: at the
    # latest a quarter into the next minute, when they fell in this one's first instant.
    assert all(1 <= int(r.headers["retry-after"]) <= 60 + 15 for r in refused)

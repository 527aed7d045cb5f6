"""The tenants' inbound rate limit shared by several `serve` processes through Redis: the
shared server under a prefix of the test's own, or a Redis of the test's own to take away."""

from __future__ import annotations

import asyncio
import contextlib
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
from tests.conftest import base_config, signed
from tests.integration.redis_support import SHARED_REDIS_URL, LateRedis, RedisServer
from tests.integration.test_ingress_api import MESSAGE


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


@contextlib.asynccontextmanager
async def two_processes(
    client: redis.asyncio.Redis, prefix: str, clock: FakeClock
) -> AsyncIterator[tuple[TenantRateLimiter, TenantRateLimiter]]:
    """Two processes' limiters of one tenant at "10/minute", sharing through `client`."""
    a, b = (
        TenantRateLimiter(limited("10/minute"), clock=clock, redis=client, key_prefix=prefix)
        for _ in range(2)
    )
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def admitted(limiter: TenantRateLimiter, n: int) -> int:
    """How many of `n` requests the limiter lets through."""
    return sum(limiter.retry_after("acme") is None for _ in range(n))


async def test_two_processes_draw_from_one_tenant_budget(
    client: redis.asyncio.Redis, shared_prefix: str
) -> None:
    clock = FakeClock(1_000_020.0)  # the start of a minute
    async with two_processes(client, shared_prefix, clock) as (a, b):
        assert admitted(a, 6) == 6
        await a.share()
        await b.share()  # b learns a's 6 before its next requests
        assert admitted(b, 10) == 4
        assert b.retry_after("acme") is not None
        await b.share()
        await a.share()
        assert admitted(a, 10) == 0  # the whole budget is spent, by both together
        total = f"{shared_prefix}ingress:acme:60:{1_000_020 // 60}"
        assert int(await client.get(total) or 0) == 10
        for key in (total, f"{total}:processes"):  # gone three windows later
            assert 0 < await client.ttl(key) <= 180


async def test_another_processes_previous_window_slides_out_as_its_own_would(
    client: redis.asyncio.Redis, shared_prefix: str
) -> None:
    clock = FakeClock(1_000_020.0)  # the start of a minute
    async with two_processes(client, shared_prefix, clock) as (a, b):
        assert admitted(a, 10) == 10
        await a.share()
        clock.now += 90  # half-way into the next minute: a's 10 still weigh 5
        await b.share()
        assert admitted(b, 10) == 5


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
    async with two_processes(client, shared_prefix, clock) as (a, b):
        assert admitted(a, 7) == 7  # no share called: the limiter shares by itself
        key = f"{shared_prefix}ingress:acme:60:{1_000_020 // 60}"
        async with asyncio.timeout(5):
            while await client.get(key) != b"7":
                await asyncio.sleep(0.02)
        await b.share()
        assert admitted(b, 10) == 3


async def test_closing_shares_what_was_counted_since_the_last_share(
    client: redis.asyncio.Redis, shared_prefix: str
) -> None:
    clock = FakeClock(1_000_020.0)
    a = TenantRateLimiter(limited("10/minute"), clock=clock, redis=client, key_prefix=shared_prefix)
    assert admitted(a, 5) == 5
    await a.aclose()  # before the background share's interval is up
    assert await client.get(f"{shared_prefix}ingress:acme:60:{1_000_020 // 60}") == b"5"


@pytest.mark.parametrize(("limit", "period_s"), [("10/minute", 60), ("10/hour", 3600)])
async def test_a_shared_window_outlives_the_next_one(
    client: redis.asyncio.Redis, shared_prefix: str, limit: str, period_s: int
) -> None:
    """A window's totals are read as the previous window's all through the next one: shared
    at any instant of their window, they must live two periods on (else the other processes
    forget the previous window's requests before they slide out, and admit them again)."""
    clock = FakeClock(1_000_800.0)  # the start of an hour, and of a minute
    a = TenantRateLimiter(limited(limit), clock=clock, redis=client, key_prefix=shared_prefix)
    try:
        assert admitted(a, 4) == 4
        await a.share()
        total = f"{shared_prefix}ingress:acme:{period_s}:{1_000_800 // period_s}"
        for key in (total, f"{total}:processes"):
            assert 2 * period_s <= await client.ttl(key) <= 3 * period_s
    finally:
        await a.aclose()


async def test_closing_leaves_no_share_running(
    client: redis.asyncio.Redis, shared_prefix: str
) -> None:
    """`serve` closes its Redis client after the limiter: a background share still running
    after `aclose` would go on calling Redis once the limiter is closed."""
    before = asyncio.all_tasks()
    clock = FakeClock(1_000_020.0)
    a = TenantRateLimiter(limited("10/minute"), clock=clock, redis=client, key_prefix=shared_prefix)
    assert admitted(a, 3) == 3  # starts the background share
    await a.aclose()
    assert asyncio.all_tasks() <= before


async def test_a_redis_found_down_is_not_called_again_before_retry_s(shared_prefix: str) -> None:
    """The module docstring: a process whose Redis fails goes on with the counts it has and
    tries Redis again every `retry_s`, not at every share (ten a second while requests come)."""
    async with LateRedis(SHARED_REDIS_URL) as proxy:
        flaky = connect_redis(proxy.url, timeout_s=0.5)
        a = TenantRateLimiter(
            limited("10/minute"),
            clock=FakeClock(1_000_020.0),
            redis=flaky,
            key_prefix=shared_prefix,
            retry_s=600,
        )
        try:
            proxy.refusing = True
            assert admitted(a, 2) == 2
            with capture_logs() as logs:
                await a.share()  # fails: Redis is down, next tried in 10 minutes
            assert [e["event"] for e in logs] == ["redis_unavailable"]
            proxy.refusing = False  # back, but not due for a try
            assert admitted(a, 3) == 3
            await a.share()
            assert await a.admit("acme") is None
            key = f"{shared_prefix}ingress:acme:60:{1_000_020 // 60}"
            assert await flaky.get(key) is None  # read past the limiter: nothing was sent
        finally:
            await a.aclose()  # shares nothing either: Redis is not due for a try
            await flaky.aclose()


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
        # Once it is back, Redis has the process's whole count of the window again: what it
        # counted during the outage and the 3 the restart lost.
        assert await client.get(f"estafeta:ingress:acme:60:{1_000_020 // 60}") == b"10"
    finally:
        await a.aclose()
        await client.aclose()


async def test_requests_are_decided_while_a_silent_redis_is_tried_again(
    shared_prefix: str,
) -> None:
    """Redis hangs during an outage: the periodic share (in the background) waits for its
    try of Redis; requests decide from the counts they have and never wait for it."""
    async with LateRedis(SHARED_REDIS_URL) as proxy:
        # A timeout past the test's bound: a request that waits for Redis fails it.
        slow = connect_redis(proxy.url, timeout_s=30)
        a = TenantRateLimiter(
            limited("10/minute"),
            clock=FakeClock(1_000_020.0),
            redis=slow,
            key_prefix=shared_prefix,
            retry_s=0,  # every share tries Redis again
        )
        trying: asyncio.Task[None] | None = None
        try:
            proxy.refusing = True  # Redis is gone, and found so at once
            with capture_logs():
                async with asyncio.timeout(10):
                    assert await a.admit("acme") is None
                proxy.refusing, proxy.silent = False, True
                trying = asyncio.create_task(a.share())  # waits for the silent Redis
                await asyncio.sleep(0.1)  # the share has sent its try (not needed to pass)
                async with asyncio.timeout(5):
                    assert [await a.admit("acme") for _ in range(3)] == [None] * 3
                assert not trying.done()
        finally:
            if trying is not None:
                trying.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await trying
            proxy.silent, proxy.refusing = False, True  # the last share fails at once
            with capture_logs():
                await a.aclose()
            await slow.aclose()


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


class SlowReplies:
    """A TCP proxy to Redis that passes commands on at once and holds each reply for
    `delay_s`: a Redis that executes what it is sent but answers after the client's
    timeout (a busy server, a congested network)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self.port = 0
        self.sent = bytearray()  # every command passed on to Redis, as sent
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += (writer, up_writer)
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer, 0.0)),
            asyncio.create_task(self._pipe(up_reader, writer, None)),
        ):
            self._tasks.add(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float | None
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while chunk := await reader.read(65536):
                await asyncio.sleep(self.delay_s if delay_s is None else delay_s)
                if delay_s is not None:  # towards Redis
                    self.sent += chunk
                writer.write(chunk)
                await writer.drain()
        writer.transport.abort()


async def test_a_share_redis_answers_too_late_is_not_counted_twice(
    own_redis: RedisServer,
) -> None:
    """Redis executed the share but answered after the client's timeout: the client sends it
    again (redis-py retries once on a timeout) and the limiter again at its next share. The
    tenant's requests must count once, or every process refuses it early."""
    proxy = SlowReplies(own_redis.port)
    await proxy.start()
    clock = FakeClock(1_000_020.0)
    slow = connect_redis(f"redis://127.0.0.1:{proxy.port}/0", timeout_s=0.2)
    direct = connect_redis(own_redis.url)
    a = TenantRateLimiter(limited("10/minute"), clock=clock, redis=slow, retry_s=0)
    b = TenantRateLimiter(limited("10/minute"), clock=clock, redis=direct)
    try:
        await a.share()  # connected: what follows is answered late, not refused
        assert admitted(a, 3) == 3
        proxy.delay_s = 0.5
        with capture_logs():
            await a.share()  # Redis adds the 3, the answer comes too late
        proxy.delay_s = 0.0
        await a.share()  # answered: the limiter shares what it counted again
        await b.share()
        assert admitted(b, 10) == 7  # the 3 of process a, once
    finally:
        await a.aclose()
        await b.aclose()
        await slow.aclose()
        await direct.aclose()
        await proxy.close()


async def test_requests_waiting_for_a_slow_read_are_decided_by_it(own_redis: RedisServer) -> None:
    """A process that has not read the totals lately reads them before it decides, and the
    requests that arrive meanwhile wait for that read: one read, however slow, not one after
    another for each waiting request (each as slow as the FRESH_S it outlasted)."""
    proxy = SlowReplies(own_redis.port)
    await proxy.start()
    # A Redis that answers in 1.2 s, under the client's timeout (`?socket_timeout=5`).
    slow = connect_redis(f"redis://127.0.0.1:{proxy.port}/0", timeout_s=5)
    a = TenantRateLimiter(limited("10/minute"), clock=FakeClock(1_000_020.0), redis=slow)
    try:
        await slow.ping()  # connected; this process has read no totals yet
        proxy.delay_s = 1.2
        answers = await asyncio.gather(*(a.admit("acme") for _ in range(3)))
        assert answers == [None] * 3
        assert proxy.sent.count(b"MGET") == 1  # each waiting request read again: 3, 3.6 s
    finally:
        proxy.delay_s = 0.0
        await a.aclose()
        await slow.aclose()
        await proxy.close()

"""Circuit state stores: one behaviour suite for memory and real Redis, then Redis going away.

The shared Redis (127.0.0.1:6379, or ESTAFETA_TEST_REDIS_URL) is used under a unique key
prefix per test and cleaned up after; it is never flushed. Tests that take Redis away start
their own `redis-server` on a free port and kill it. Without the shared Redis the tests that
need it are skipped locally and fail under CI=true.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from estafeta.delivery.circuit import Admission, Circuit, CircuitPolicy, CircuitState, admit
from estafeta.delivery.circuit_store import (
    CircuitStateStore,
    FallbackCircuitStore,
    MemoryCircuitStore,
    RedisCircuitStore,
)
from estafeta.redis_client import RedisFailover, connect_redis
from tests.integration.redis_support import SHARED_REDIS_URL, LateRedis, RedisServer

pytestmark = pytest.mark.timeout(60)

OPEN = Circuit(CircuitState.OPEN, consecutive_failures=5, opened_at=1_000)


def one_more_failure(c: Circuit) -> Circuit:
    return replace(c, consecutive_failures=c.consecutive_failures + 1)


# -- Redis servers ------------------------------------------------------------------------


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


# -- the same behaviour from every store ----------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CircuitStateStore]:
    if request.param == "memory":
        yield MemoryCircuitStore()
        return
    prefix: str = request.getfixturevalue("shared_prefix")
    client = connect_redis(SHARED_REDIS_URL)
    yield RedisCircuitStore(client, prefix)
    await client.aclose()


async def test_update_returns_before_and_after_and_get_all_lists_unhealthy_circuits(
    store: CircuitStateStore,
) -> None:
    assert await store.get_all() == {}
    assert await store.update("crm", lambda c: OPEN) == (Circuit(), OPEN)
    assert await store.update("crm", one_more_failure) == (OPEN, one_more_failure(OPEN))
    await store.update("billing", one_more_failure)
    assert await store.get_all() == {
        "crm": one_more_failure(OPEN),
        "billing": Circuit(consecutive_failures=1),
    }
    # Back to healthy means absent.
    assert await store.update("billing", lambda c: Circuit()) == (
        Circuit(consecutive_failures=1),
        Circuit(),
    )
    assert set(await store.get_all()) == {"crm"}


async def test_concurrent_updates_never_lose_one(store: CircuitStateStore) -> None:
    async with asyncio.timeout(30):
        await asyncio.gather(*(store.update("crm", one_more_failure) for _ in range(50)))
    assert (await store.get_all())["crm"].consecutive_failures == 50


# -- Redis specifics ----------------------------------------------------------------------


async def test_two_clients_share_one_circuit_without_losing_increments(shared_prefix: str) -> None:
    """Two clients stand for two worker processes: WATCH/MULTI keeps every increment."""
    a, b = connect_redis(SHARED_REDIS_URL), connect_redis(SHARED_REDIS_URL)
    store_a, store_b = RedisCircuitStore(a, shared_prefix), RedisCircuitStore(b, shared_prefix)
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(
                *(s.update("crm", one_more_failure) for _ in range(25) for s in (store_a, store_b))
            )
        assert (await store_b.get_all())["crm"].consecutive_failures == 50
        raw = await a.hget(f"{shared_prefix}circuits", "crm")
        assert raw is not None and orjson.loads(raw)["consecutive_failures"] == 50
    finally:
        await a.aclose()
        await b.aclose()


async def test_unreadable_field_counts_as_healthy_and_is_overwritten(shared_prefix: str) -> None:
    client = connect_redis(SHARED_REDIS_URL)
    try:
        await client.hset(f"{shared_prefix}circuits", mapping={"crm": b"{not json", "x": b"[]"})
        store = RedisCircuitStore(client, shared_prefix)
        assert await store.get_all() == {}
        assert await store.update("crm", one_more_failure) == (
            Circuit(),
            Circuit(consecutive_failures=1),
        )
    finally:
        await client.aclose()


# -- Redis going away -----------------------------------------------------------------------


async def test_fallback_carries_on_from_memory_and_returns_to_redis(own_redis: RedisServer) -> None:
    clock = FakeMonotonic()
    client = connect_redis(own_redis.url, timeout_s=2.0)
    key = "estafeta:circuits"
    fallback = FallbackCircuitStore(RedisCircuitStore(client), retry_s=5.0, monotonic=clock)
    try:
        with capture_logs() as logs:
            await fallback.update("crm", one_more_failure)
            assert await client.hget(key, "crm") is not None  # written to Redis
            own_redis.kill()

            # Redis is gone: calls keep working, from the last state seen in Redis.
            for _ in range(3):
                await fallback.update("crm", one_more_failure)
            assert (await fallback.get_all())["crm"].consecutive_failures == 4
            assert not fallback.using_primary
            down = [e for e in logs if e["event"] == "redis_unavailable"]
            assert len(down) == 1 and down[0]["log_level"] == "warning"
            assert down[0]["component"] == "circuit_store"

            # Back on the same port (empty), but not tried before retry_s has passed.
            own_redis.start()
            clock.now += 4.9
            await fallback.update("crm", one_more_failure)
            assert await client.hget(key, "crm") is None
            assert (await fallback.get_all())["crm"].consecutive_failures == 5

            # Due: the next call tries Redis in the background and goes on from memory.
            clock.now += 0.2
            await fallback.update("crm", one_more_failure)
            assert await client.hget(key, "crm") is None
            await fallback._failover.probed()
            assert fallback.using_primary
            before, after = await fallback.update("billing", one_more_failure)
            assert (before, after) == (Circuit(), Circuit(consecutive_failures=1))
            assert await client.hget(key, "billing") is not None  # Redis is the truth again
            assert fallback.using_primary
            assert await fallback.get_all() == {"billing": Circuit(consecutive_failures=1)}
        events = [e["event"] for e in logs if e["event"].startswith("redis_")]
        assert events == ["redis_unavailable", "redis_available"]
    finally:
        await client.aclose()


async def test_fallback_never_raises_when_redis_was_never_there(tmp_path: Path) -> None:
    absent = RedisServer(tmp_path)  # a free port with nothing listening
    client = connect_redis(absent.url)
    fallback = FallbackCircuitStore(RedisCircuitStore(client), monotonic=FakeMonotonic())
    try:
        with capture_logs() as logs:
            async with asyncio.timeout(10):
                await asyncio.gather(*(fallback.update("crm", one_more_failure) for _ in range(20)))
                assert (await fallback.get_all())["crm"].consecutive_failures == 20
        assert [e["event"] for e in logs] == ["redis_unavailable"]
    finally:
        await client.aclose()


def test_failover_ignores_calls_that_straddle_an_outage() -> None:
    """A call from before an outage cannot end it, nor one from before a recovery restart it."""
    clock = FakeMonotonic()
    failover = RedisFailover("test", retry_s=5.0, monotonic=clock)
    with capture_logs() as logs:
        slow_ok, failing = failover.begin(), failover.begin()
        assert slow_ok is not None and failing is not None
        failover.failed(failing, ConnectionError("refused"))
        failover.succeeded(slow_ok)  # started before the outage: says nothing about now
        assert not failover.available and failover.begin() is None

        clock.now += 5
        probe = failover.begin()
        assert probe is not None and failover.begin() is None  # one probe per retry_s
        failover.failed(slow_ok, ConnectionError("late"))  # stale: no new outage
        failover.succeeded(probe)
        assert failover.available
    assert [e["event"] for e in logs] == ["redis_unavailable", "redis_available"]


async def test_failover_tries_redis_in_the_background_once_per_retry_s() -> None:
    """While down, no caller waits for Redis: a call due for a try starts a probe (a PING)
    in the background and uses the fallback; the probe's success ends the outage."""
    clock = FakeMonotonic()
    answer = asyncio.Event()  # the probe is silent until the test lets it answer
    outcomes: list[Exception | None] = [ConnectionError("still down"), None]
    tries = 0

    async def probe() -> None:
        nonlocal tries
        tries += 1
        await answer.wait()
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    failover = RedisFailover("test", retry_s=5.0, monotonic=clock, probe=probe)
    with capture_logs() as logs:
        token = failover.begin()
        assert token is not None
        failover.failed(token, ConnectionError("refused"))
        clock.now += 5
        assert failover.begin() is None  # due: tried in the background, not by this caller
        await asyncio.sleep(0)  # the probe starts, and waits for its answer
        clock.now += 5
        assert [failover.begin(), failover.begin()] == [None, None]  # one probe at a time
        assert tries == 1
        answer.set()
        await failover.probed()
        assert not failover.available  # the probe failed: still down, no new outage

        clock.now += 4.9
        assert failover.begin() is None
        await failover.probed()
        assert tries == 1  # not due yet
        clock.now += 0.1
        assert failover.begin() is None
        await failover.probed()
        assert tries == 2 and failover.available
        assert failover.begin() is not None  # Redis again, for every call
    assert [e["event"] for e in logs] == ["redis_unavailable", "redis_available"]


async def test_a_burst_of_failures_in_one_process_is_written_once_each(shared_prefix: str) -> None:
    """A destination that times out ends every send in flight at once, and a worker (256
    sends by default) records as many failures together. Each update WATCHed the one hash
    and all but one lost the race at every round: 100 at once ran the policy some 3,500
    times (a second of CPU, while the attempts' records waited behind it past their leases:
    a soak saw them rescued as `lease_expired` and sent again), and past 100 at once the
    client's pool ran out of connections (`Too many connections`: the circuits fell back to
    memory as if Redis were down). One process's updates now take their turn."""
    client = connect_redis(SHARED_REDIS_URL)
    store = RedisCircuitStore(client, shared_prefix)
    runs = 0

    def counted(c: Circuit) -> Circuit:
        nonlocal runs
        runs += 1
        return one_more_failure(c)

    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(store.update("crm", counted) for _ in range(300)))
        assert (await store.get_all())["crm"].consecutive_failures == 300
        assert runs == 300  # none lost a race to another update of this process
    finally:
        await client.aclose()


async def test_a_burst_waits_for_one_silent_redis_call_not_one_each() -> None:
    """Redis stops answering (a partition, a stuck server) as a destination fails: every
    send in flight records its failure at once. Taking turns, each update waited for the
    one before it to time out against Redis, then timed out itself: 20 of them took 20
    timeouts in a row (and a worker's 256, minutes), holding back every attempt's record
    past its lease. Once the first fails, those waiting their turn use memory at once."""
    accepted = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read()  # never answers; the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect_redis(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
    fallback = FallbackCircuitStore(RedisCircuitStore(client), monotonic=FakeMonotonic())
    try:
        with capture_logs() as logs:
            async with asyncio.timeout(30):
                await asyncio.gather(*(fallback.update("crm", one_more_failure) for _ in range(20)))
        assert (await fallback.get_all())["crm"].consecutive_failures == 20
        assert [e["event"] for e in logs] == ["redis_unavailable"]
        # One update tried Redis, not each in turn, and once: a call that timed out is not
        # sent again (it may have run).
        assert accepted == 1
    finally:
        await client.aclose()
        server.close()


async def test_a_probe_claimed_in_a_redis_stall_is_sent_by_the_worker_that_claimed_it(
    shared_prefix: str,
) -> None:
    """Redis ran the claim of a half-open circuit's probe and answered after the client's
    timeout (a stall: a fork for a snapshot, a slow disk). redis-py sent the transaction
    again on a new connection, found its WATCH gone, and the update read the circuit again:
    the probe looked claimed by another worker, so no worker sent it, and the destination,
    back up, waited out the probe's timeout (60 s at least) for its deliveries. A failure
    recorded in such a stall was counted twice. A call that timed out is not sent again:
    the update carries on from memory, as in an outage."""
    policy = CircuitPolicy(failures=5, reset_s=30)
    now_ms = OPEN.opened_at + 31_000  # type: ignore[operator]  # OPEN has its opened_at
    async with LateRedis(SHARED_REDIS_URL, command=b"EXEC", delay_s=0.6) as late:
        client = connect_redis(late.url, timeout_s=0.2)
        circuits = FallbackCircuitStore(
            RedisCircuitStore(client, shared_prefix), monotonic=FakeMonotonic()
        )
        try:
            await circuits.update("crm", lambda _: OPEN)
            late.armed = True
            async with asyncio.timeout(10):
                before, after = await circuits.update("crm", lambda c: admit(c, policy, now_ms)[1])
            assert admit(before, policy, now_ms)[0] is Admission.PROBE  # this worker's probe
            assert after.state is CircuitState.HALF_OPEN
        finally:
            await client.aclose()

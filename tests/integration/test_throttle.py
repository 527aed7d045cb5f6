"""Outbound rate limits per destination: in memory, shared through real Redis, and Redis lost.

The shared Redis (127.0.0.1:6379, or ESTAFETA_TEST_REDIS_URL) is used under a unique key
prefix per test and cleaned up after; it is never flushed. The test that takes Redis away
starts its own `redis-server` on a free port and kills it. Without the shared Redis the tests
that need it are skipped locally and fail under CI=true.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from limits import RateLimitItem, WindowStats
from structlog.testing import capture_logs

from estafeta.delivery.throttle import DestinationThrottle
from tests.integration.redis_support import SHARED_REDIS_URL, LateRedis, RedisServer

pytestmark = pytest.mark.timeout(60)

LIMITS = {"crm": "5/second", "billing": "2/minute"}


def keys_under(url: str, prefix: str) -> list[bytes]:
    with redis.Redis.from_url(url, socket_timeout=5) as client:
        return list(client.scan_iter(match=f"{prefix}*"))


@pytest.fixture
async def throttles() -> AsyncIterator[list[DestinationThrottle]]:
    """Throttles a test makes; all closed at teardown."""
    made: list[DestinationThrottle] = []
    yield made
    for throttle in made:
        await throttle.aclose()


def on_own_redis(
    own_redis: RedisServer,
    throttles: list[DestinationThrottle],
    limit: str,
    clock: list[float],
    **options: Any,
) -> DestinationThrottle:
    """A throttle of `limit` for billing, counted in the test's own Redis (which it takes
    away), on the test's clock (`clock[0]`, seconds); closed at teardown (`throttles`)."""
    made = DestinationThrottle(
        {"billing": limit}, redis_url=own_redis.url, monotonic=lambda: clock[0], **options
    )
    throttles.append(made)
    return made


async def tried_again(throttle: DestinationThrottle) -> None:
    """Redis is due for another try: start it in the background, as the next call would
    (that call goes on from memory), and wait for it to end."""
    assert throttle._failover.begin() is None
    await throttle._failover.probed()


async def admitted_then_wait(throttle: DestinationThrottle, destination: str) -> list[bool]:
    """Acquire until the first refusal; True per admitted send, and check the wait."""
    admitted: list[bool] = []
    for _ in range(20):
        wait = await throttle.acquire(destination)
        if wait is not None:
            assert 0 < wait <= 1.0
            return admitted
        admitted.append(True)
    raise AssertionError("never refused")


async def test_memory_admits_the_limit_then_answers_a_short_wait() -> None:
    throttle = DestinationThrottle(LIMITS)
    assert len(await admitted_then_wait(throttle, "crm")) == 5
    assert not throttle.using_redis


async def test_destinations_have_their_own_budget_and_unlimited_ones_always_go() -> None:
    throttle = DestinationThrottle(LIMITS)
    assert len(await admitted_then_wait(throttle, "crm")) == 5
    assert [await throttle.acquire("billing") for _ in range(2)] == [None, None]
    assert 0 < (await throttle.acquire("billing") or 0) <= 60
    assert [await throttle.acquire("sheets") for _ in range(100)] == [None] * 100


async def test_the_wait_answered_is_when_a_send_may_go_again() -> None:
    throttle = DestinationThrottle({"crm": "5/second"})
    await admitted_then_wait(throttle, "crm")
    wait = await throttle.acquire("crm")
    assert wait is not None
    await asyncio.sleep(wait)
    deadline = time.monotonic() + 1.0  # limits counts in whole-ms TTLs: allow rounding
    while (again := await throttle.acquire("crm")) is not None:
        assert time.monotonic() < deadline, "the wait answered was too short"
        await asyncio.sleep(again)


async def test_the_room_is_the_sends_the_budget_takes_now() -> None:
    """What a lease may take for a destination without giving any back (worker.py)."""
    throttle = DestinationThrottle(LIMITS)
    assert await throttle.room("crm") == 5
    assert [await throttle.acquire("crm") for _ in range(2)] == [None] * 2
    assert await throttle.room("crm") == 3
    await admitted_then_wait(throttle, "crm")
    assert await throttle.room("crm") == 0
    assert await throttle.room("billing") == 2  # its own budget
    assert await throttle.room("sheets") is None  # no limit


def test_an_unreadable_limit_is_refused_at_construction() -> None:
    with pytest.raises(ValueError):
        DestinationThrottle({"crm": "five per second"})


async def test_redis_admits_the_limit_then_answers_a_short_wait(
    shared_prefix: str, throttles: list[DestinationThrottle]
) -> None:
    throttle = DestinationThrottle(LIMITS, redis_url=SHARED_REDIS_URL, key_prefix=shared_prefix)
    throttles.append(throttle)
    assert len(await admitted_then_wait(throttle, "crm")) == 5
    assert throttle.using_redis
    assert keys_under(SHARED_REDIS_URL, f"{shared_prefix}throttle:")  # counted in Redis


async def test_two_throttles_sharing_redis_share_the_budget(
    shared_prefix: str, throttles: list[DestinationThrottle]
) -> None:
    """Two instances stand for two worker processes: 5/second is for estafeta as a whole."""
    a, b = (
        DestinationThrottle(LIMITS, redis_url=SHARED_REDIS_URL, key_prefix=shared_prefix)
        for _ in range(2)
    )
    throttles.extend([a, b])
    assert [await a.acquire("crm") for _ in range(3)] == [None] * 3
    assert await b.room("crm") == 2  # what a sent takes b's room too
    assert [await b.acquire("crm") for _ in range(2)] == [None] * 2
    for throttle in (a, b):
        assert await throttle.room("crm") == 0
        wait = await throttle.acquire("crm")
        assert wait is not None and 0 < wait <= 1.0
    # A third instance under another prefix is another estafeta: its own budget.
    other = DestinationThrottle(LIMITS, redis_url=SHARED_REDIS_URL, key_prefix=f"{shared_prefix}x:")
    throttles.append(other)
    assert await other.acquire("crm") is None


async def test_a_lease_asking_hundreds_of_budgets_at_once_keeps_them_shared(
    shared_prefix: str, throttles: list[DestinationThrottle]
) -> None:
    """A hub of many tenants, each destination rate-limited: every lease asks the room of
    each at once (worker.py, `_budgets`). Past redis-py's 100 pooled connections the asks
    beyond were refused (`MaxConnectionsError`) as if Redis were down: `redis_unavailable`
    was logged at every poll and each process sent on a budget of its own."""
    limits = {f"clinic-{n}": "1/minute" for n in range(300)}
    a, b = (
        DestinationThrottle(limits, redis_url=SHARED_REDIS_URL, key_prefix=shared_prefix)
        for _ in range(2)
    )
    throttles.extend([a, b])
    for destination in limits:  # process a spends every budget
        assert await a.acquire(destination) is None
    with capture_logs() as logs:
        rooms = await asyncio.gather(*(b.room(d) for d in limits))
    assert rooms == [0] * len(limits)  # process b sees what a sent, for each of them
    assert b.using_redis
    assert not [e for e in logs if e["event"] == "redis_unavailable"]


async def test_redis_lost_falls_back_to_memory_and_comes_back(
    own_redis: RedisServer, throttles: list[DestinationThrottle]
) -> None:
    clock = [1_000.0]
    throttle = on_own_redis(own_redis, throttles, "3/minute", clock, retry_s=5.0)
    with capture_logs() as logs:
        assert await throttle.acquire("billing") is None
        assert keys_under(own_redis.url, "estafeta:throttle:")
        own_redis.kill()

        # Redis is gone: the in-memory limiter takes over, the send Redis counted this
        # minute still in it (one worker never sends more than the limit in a window).
        async with asyncio.timeout(10):
            assert [await throttle.acquire("billing") for _ in range(2)] == [None] * 2
            assert await throttle.acquire("billing") is not None
        assert not throttle.using_redis
        down = [e for e in logs if e["event"] == "redis_unavailable"]
        assert len(down) == 1 and down[0]["log_level"] == "warning"
        assert down[0]["component"] == "throttle"

        # Back on the same port (empty); Redis is tried again once retry_s has passed, in
        # the background: the call that starts the try goes on from memory.
        own_redis.start()
        assert await throttle.acquire("billing") is not None  # still memory: not yet retried
        assert not keys_under(own_redis.url, "estafeta:throttle:")
        clock[0] += 5.0
        assert await throttle.acquire("billing") is not None
        await throttle._failover.probed()
        assert not keys_under(own_redis.url, "estafeta:throttle:")
        # Redis again, empty: the two sends counted in memory this minute are added to it
        # first, so the minute that spans the outage still admits three, not six.
        wait = await throttle.acquire("billing")
        assert wait is not None and 0 < wait <= 60
        assert throttle.using_redis
        assert keys_under(own_redis.url, "estafeta:throttle:")
    events = [e["event"] for e in logs if e["event"].startswith("redis_")]
    assert events == ["redis_unavailable", "redis_available"]


async def test_sends_counted_during_an_outage_reach_every_process_after_it(
    own_redis: RedisServer, throttles: list[DestinationThrottle]
) -> None:
    clock = [1_000.0]
    a, b = (on_own_redis(own_redis, throttles, "5/minute", clock) for _ in range(2))
    own_redis.kill()
    async with asyncio.timeout(10):
        # Only a sends during the outage: two of the minute's five, counted in its memory.
        assert [await a.acquire("billing") for _ in range(2)] == [None] * 2
        assert await a.room("billing") == 3  # its own count, Redis not tried again yet
    assert not a.using_redis
    own_redis.start()
    clock[0] += 5.0
    await tried_again(a)
    # Redis answers again, empty: a's two sends are not in it yet, but count in a's room.
    assert await a.room("billing") == 3

    # Back: a's two sends go to Redis with a's next one, so b finds two of five left, not
    # five; and a's own memory no longer holds them (they would count twice).
    assert await a.acquire("billing") is None
    assert [await b.acquire("billing") for _ in range(2)] == [None] * 2
    for throttle in (a, b):
        wait = await throttle.acquire("billing")
        assert wait is not None and 0 < wait <= 60


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:1/0", "async+redis://127.0.0.1:1", "rediss://h:1", "unix:///tmp/r.sock"],
)
async def test_redis_url_forms_are_accepted_without_connecting(url: str) -> None:
    throttle = DestinationThrottle(LIMITS, redis_url=url)
    await throttle.aclose()


# -- one worker never gets a second budget from an outage ----------------------------------------


async def admitted(throttle: DestinationThrottle, n: int) -> int:
    return sum([await throttle.acquire("billing") is None for _ in range(n)])


@pytest.mark.timeout(60)
async def test_the_window_spanning_an_outage_start_admits_no_more_than_the_limit(
    own_redis: RedisServer, throttles: list[DestinationThrottle]
) -> None:
    throttle = on_own_redis(own_redis, throttles, "3/minute", [1_000.0])
    assert await admitted(throttle, 3) == 3  # the minute's budget, counted in Redis
    own_redis.kill()
    async with asyncio.timeout(10):
        # Same worker, same minute: its own three sends are still in the window.
        assert await admitted(throttle, 3) == 0


@pytest.mark.timeout(60)
async def test_a_flapping_redis_does_not_give_a_new_budget_per_outage(
    own_redis: RedisServer, throttles: list[DestinationThrottle]
) -> None:
    clock = [1_000.0]
    throttle = on_own_redis(own_redis, throttles, "3/minute", clock)
    total = 0
    async with asyncio.timeout(30):
        for _ in range(3):  # three short outages within one minute
            total += await admitted(throttle, 3)
            own_redis.kill()
            total += await admitted(throttle, 3)
            own_redis.start()
            clock[0] += 5.0
    assert total <= 3, f"one worker sent {total} in one minute to a 3/minute destination"


@pytest.mark.timeout(60)
async def test_a_redis_restarted_empty_between_two_sends_gives_no_new_budget(
    own_redis: RedisServer, throttles: list[DestinationThrottle]
) -> None:
    """The pooled connection's one retry reconnects at once, so no outage is even noticed:
    Redis, empty, hands the minute's budget out again to the worker that just spent it."""
    throttle = DestinationThrottle({"billing": "3/minute"}, redis_url=own_redis.url)
    throttles.append(throttle)
    assert await admitted(throttle, 3) == 3
    own_redis.kill()
    own_redis.start()
    async with asyncio.timeout(10):
        assert await admitted(throttle, 3) == 0


@pytest.mark.timeout(60)
async def test_outage_sends_are_not_lost_when_another_worker_sends_meanwhile(
    own_redis: RedisServer, throttles: list[DestinationThrottle], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1_000.0]
    a, b = (on_own_redis(own_redis, throttles, "5/minute", clock) for _ in range(2))
    own_redis.kill()
    async with asyncio.timeout(10):
        assert [await a.acquire("billing") for _ in range(3)] == [None] * 3  # in a's memory
    own_redis.start()
    clock[0] += 5.0
    await tried_again(a)

    # b sends three times right after a read Redis's room for its three (five then) and
    # before a adds them.
    shared = a._redis
    assert shared is not None
    read = shared.get_window_stats

    async def read_then_b_sends(item: RateLimitItem, *identifiers: str) -> WindowStats:
        monkeypatch.setattr(shared, "get_window_stats", read)
        stats = await read(item, *identifiers)
        assert [await b.acquire("billing") for _ in range(3)] == [None] * 3
        return stats

    monkeypatch.setattr(shared, "get_window_stats", read_then_b_sends)
    sent = 3 + 3
    sent += await a.acquire("billing") is None
    for throttle in (a, b):
        sent += sum([await throttle.acquire("billing") is None for _ in range(3)])
    # b's three already make six with a's outage sends (the outage allows that); the
    # window must admit nothing more, as Redis holds both.
    assert sent <= 6, f"{sent} sends in one minute to a 5/minute destination"


async def test_a_rate_limit_changed_between_runs_keeps_the_sends_of_its_window(
    shared_prefix: str, throttles: list[DestinationThrottle]
) -> None:
    """`rate_limit` applies at once to a changed configuration: ten sent this minute under
    "10/minute", a process started on "5/minute" sends nothing more this minute, and one on
    "15/minute" five more. Each limit had a budget of its own in Redis (limits' key names
    the limit), so the lowered one sent five more at once, and during a rolling change the
    processes on the old and the new value together sent both limits' worth."""

    def throttle(limit: str) -> DestinationThrottle:
        made = DestinationThrottle(
            {"billing": limit}, redis_url=SHARED_REDIS_URL, key_prefix=shared_prefix
        )
        throttles.append(made)
        return made

    before = throttle("10/minute")
    assert await admitted(before, 10) == 10
    lowered = throttle("5/minute")
    assert await admitted(lowered, 5) == 0, "a lowered limit gave a new budget in its window"
    raised = throttle("15/minute")
    assert await admitted(raised, 15) == 5
    # Nor does a process of a rolling change started on the old value: one budget for all.
    assert await admitted(throttle("10/minute"), 10) == 0


async def test_a_send_redis_counted_late_is_counted_once(
    shared_prefix: str, throttles: list[DestinationThrottle]
) -> None:
    """Redis counted a send and answered after the client's timeout (a stall: a fork for a
    snapshot, a slow disk). redis-py sent the count again, Redis counted the send twice,
    and the destination's next send in the window was held back though the destination had
    had one of its two: a minute here, a day for a "1000/day" destination. A count that
    timed out is not sent again: the throttle carries on from memory, as in an outage."""
    async with LateRedis(SHARED_REDIS_URL, command=b"EVALSHA", delay_s=0.6) as late:
        throttle = DestinationThrottle(
            {"billing": "2/minute"}, redis_url=late.url, key_prefix=shared_prefix, timeout_s=0.2
        )
        throttles.append(throttle)
        late.armed = True
        async with asyncio.timeout(10):
            assert await throttle.acquire("billing") is None
            assert await throttle.acquire("billing") is None  # the second of two a minute


async def test_a_send_redis_counted_late_is_not_added_again_when_redis_answers(
    shared_prefix: str, throttles: list[DestinationThrottle]
) -> None:
    """Redis counted a send and answered after the client's timeout; the throttle went on
    from memory and, once Redis answered again, added the sends it had counted meanwhile,
    that one among them: counted twice, the third send of a "3/minute" window (after two)
    waited a minute. Redis may have counted a send whose answer timed out: it is counted in
    this process's memory alone."""
    clock = [1_000.0]
    async with LateRedis(SHARED_REDIS_URL, command=b"EVALSHA", delay_s=0.6) as late:
        throttle = DestinationThrottle(
            {"billing": "3/minute"},
            redis_url=late.url,
            key_prefix=shared_prefix,
            timeout_s=0.2,
            monotonic=lambda: clock[0],
        )
        throttles.append(throttle)
        late.armed = True
        async with asyncio.timeout(10):
            assert await throttle.acquire("billing") is None  # Redis ran it, answered late
            assert not throttle.using_redis
            assert await throttle.acquire("billing") is None  # from memory
            clock[0] += 10  # Redis is due for another try, and answers
            await tried_again(throttle)
            assert await throttle.acquire("billing") is None, "a send was counted twice"
            assert throttle.using_redis
            assert await throttle.acquire("billing") is not None  # three sent: full

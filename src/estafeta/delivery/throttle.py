"""Outbound rate limits: at most `rate_limit` sends per destination, across every worker.

A destination that allows "50/second" allows it to estafeta as a whole, not to each worker
process, so with Redis configured the counters live there and every process draws from one
budget (limits' Lua scripts make each check-and-count atomic). Without Redis they live in
process memory.

The strategy is limits' moving window: never more than N sends in any window of the period,
exactly. (The sliding window counter used for ingress approximates, and let a backlog
released mid-second through at up to twice the limit within one second: found by
tests/chaos/test_rate_limit_burst.py.) Its cost grows with the limit, one entry per send in
the window, which for an outbound limit (tens or hundreds a second) is negligible.

If Redis fails, each process falls back to its own in-memory limiter rather than stopping
deliveries or ignoring the limit; while it lasts, N worker processes may together send up
to N times the limit. `redis_unavailable` is logged once and Redis is tried again every
`retry_s` seconds by a write in the background, so no send waits for a silent Redis (see
`RedisFailover` in redis_client.py). When Redis answers again, the
sends a process counted in memory within a destination's window are added to Redis before
that destination's next send, so the window that spans the recovery does not admit a whole
budget more. limits' storages can only count a send at the time it is counted, so they
land in Redis as sent at the recovery: the budget they hold back comes free up to one
period late, never early.

Each process also counts its own sends in memory, those Redis admitted too, and never sends
more than the limit in a window by that count either: when an outage begins (or Redis
restarts empty) mid-window, the sends Redis counted before it still take room in the
window, so one process never gets a second budget out of the outage.

A destination's sends are kept under a key naming the destination alone (`_DestinationWindow`),
not limits' own, which names the limit too: a `rate_limit` changed between runs then goes on
from the sends of the current window instead of a whole new budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from limits import RateLimitItem, WindowStats, parse
from limits.aio.storage import MemoryStorage, MovingWindowSupport, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from estafeta.config.models import DEFAULT_REDIS_KEY_PREFIX
from estafeta.redis_client import REDIS_ERRORS, RedisFailover, retry_once, write_probe

MIN_WAIT_S = 0.01  # the shortest wait answered: a caller told "0.0001 s" would just spin
# Reads of Redis's room for the sends counted during an outage, each refused only because
# other processes sent meanwhile (so the window is fuller at every try).
SHARE_TRIES = 5
POOL_CONNECTIONS = 100  # Redis connections per throttle at most (redis-py's default)


class DestinationThrottle:
    def __init__(
        self,
        limits_by_destination: Mapping[str, str],
        *,
        redis_url: str | None = None,
        key_prefix: str = DEFAULT_REDIS_KEY_PREFIX,
        retry_s: float = 5.0,
        timeout_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`limits_by_destination` maps a destination id to a limit such as "5/second".

        Raises ValueError for a limit `limits.parse` cannot read. No connection is made here.
        """
        self._items: dict[str, RateLimitItem] = {
            destination: parse(limit) for destination, limit in limits_by_destination.items()
        }
        # Every send of this process, whether Redis or memory admitted it.
        self._memory = _DestinationWindow(MemoryStorage())
        # Those of them admitted during a Redis outage and not yet added to Redis, and the
        # destinations that have some.
        self._outage = _DestinationWindow(MemoryStorage())
        self._unshared: set[str] = set()
        self._failover = RedisFailover(
            "throttle", retry_s=retry_s, monotonic=monotonic, probe=self._probe
        )
        self._probe_key = f"{key_prefix}probe"
        self._pool: ConnectionPool | None = None
        self._redis: MovingWindowRateLimiter | None = None
        if redis_url is not None:
            # Our own pool, so that calls fail fast (see connect_redis) and `aclose` can
            # close it: limits' storage has no way to close the client it builds.
            # Blocking: a lease asks the room of every rate-limited destination at once
            # (worker.py, `_budgets`), and redis-py's default pool refused the asks past its
            # 100 connections as if Redis were down; here they wait for a connection, no
            # longer than a call may take.
            self._pool = BlockingConnectionPool.from_url(
                _plain_redis_url(redis_url),
                max_connections=POOL_CONNECTIONS,
                timeout=timeout_s,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=retry_once(),
            )
            options: dict[str, Any] = {"connection_pool": self._pool}
            storage = RedisStorage(
                _limits_redis_url(redis_url),
                implementation="redispy",
                key_prefix=f"{key_prefix}throttle",
                **options,
            )
            self._redis = _DestinationWindow(storage)

    @property
    def limited(self) -> frozenset[str]:
        """The destinations that have a rate limit."""
        return frozenset(self._items)

    @property
    def using_redis(self) -> bool:
        """True when Redis is configured and was reachable at the last try."""
        return self._redis is not None and self._failover.available

    async def acquire(self, destination_id: str) -> float | None:
        """Take one send from the destination's budget.

        None: send now (the send is counted). A number: seconds (> 0) until the budget has
        room again; nothing was counted, ask again then. Destinations without a limit always
        get None. Never raises a Redis error.
        """
        item = self._items.get(destination_id)
        if item is None:
            return None
        if self._redis is None:
            return await _acquire(self._memory, item, destination_id)
        token = self._failover.begin()
        counted = False  # Redis may have counted this send already
        if token is not None:
            try:
                if destination_id in self._unshared:
                    await self._share_memory_counts(self._redis, item, destination_id)
                wait = await self._acquire_shared(self._redis, item, destination_id)
            except _MaybeCounted as exc:
                self._failover.failed(token, exc.__cause__ or exc)
                counted = True
            except REDIS_ERRORS as exc:
                self._failover.failed(token, exc)
            else:
                self._failover.succeeded(token)
                return wait
        self._unshared.add(destination_id)
        wait = await _acquire(self._memory, item, destination_id)
        if wait is None and not counted:
            await self._outage.hit(item, destination_id)
        return wait

    async def room(self, destination_id: str) -> int | None:
        """How many sends the destination's budget would take now without waiting (None: it
        has no limit), so that a lease takes no more than that. An estimate: other processes
        may spend some of it before this one sends, and `acquire` still decides each send.
        Never raises a Redis error (Redis unreachable: this process's own count)."""
        item = self._items.get(destination_id)
        if item is None:
            return None
        room = (await self._memory.get_window_stats(item, destination_id)).remaining
        token = None if self._redis is None else self._failover.begin(writes=False)
        if self._redis is None or token is None:
            return max(0, room)
        try:
            shared = await self._redis.get_window_stats(item, destination_id)
        except REDIS_ERRORS as exc:
            self._failover.failed(token, exc, writes=False)
            return max(0, room)
        self._failover.succeeded(token)
        unshared = 0  # an outage's sends, added to Redis before this destination's next send
        if destination_id in self._unshared:
            counted = await self._outage.get_window_stats(item, destination_id)
            unshared = item.amount - counted.remaining
        return max(0, min(room, shared.remaining - unshared))

    async def _acquire_shared(
        self, redis: MovingWindowRateLimiter, item: RateLimitItem, destination_id: str
    ) -> float | None:
        """Redis's answer, unless this process's own sends already fill the window."""
        if not await self._memory.test(item, destination_id):
            return await _wait(self._memory, item, destination_id)
        try:
            admitted = await redis.hit(item, destination_id)
        except REDIS_ERRORS as exc:
            if _may_have_run(exc):
                raise _MaybeCounted from exc
            raise
        if not admitted:
            return await _wait(redis, item, destination_id)
        await self._memory.hit(item, destination_id)
        return None

    async def _share_memory_counts(
        self, redis: MovingWindowRateLimiter, item: RateLimitItem, destination_id: str
    ) -> None:
        """Add the sends counted in memory within the window to Redis, then forget them
        there. Raises the Redis error if Redis fails meanwhile (they stay unshared)."""
        self._unshared.discard(destination_id)  # a concurrent send must not add them twice
        try:
            counted = await self._outage.get_window_stats(item, destination_id)
            cost = item.amount - counted.remaining
            for _ in range(SHARE_TRIES):
                shared = await redis.get_window_stats(item, destination_id)
                # Never more than the window holds: Redis refuses a cost beyond its room
                # whole, and another process may take room between the read and the hit.
                cost = min(cost, shared.remaining)
                if cost <= 0 or await redis.hit(item, destination_id, cost=cost):
                    break
        except BaseException:
            self._unshared.add(destination_id)
            raise
        await self._outage.clear(item, destination_id)  # still counted in `_memory`

    async def _probe(self) -> None:
        """The failover's try of Redis during an outage (in the background): a write, as a
        full or read-only Redis answers a PING."""
        assert self._pool is not None  # noqa: S101 - only called with Redis configured
        await write_probe(Redis(connection_pool=self._pool), self._probe_key)

    async def aclose(self) -> None:
        """Close the Redis connections (a no-op without Redis)."""
        await self._failover.aclose()
        if self._pool is not None:
            await self._pool.aclose()


class _DestinationWindow(MovingWindowRateLimiter):
    """limits' moving window, with a destination's sends under a key of its id alone.

    limits' own key names the limit too (`LIMITER/crm/10/1/minute`), so a `rate_limit`
    changed between runs started from an empty window (ten sent, lowered to five a minute:
    five more went at once), and during a rolling change the processes on the old and the
    new value each had a budget of their own. One list of send times serves any limit: it
    holds the latest sends, newest first, and a check of N reads the N-th; limits' script
    trims it to the limit of the send just counted, which drops only sends already out of
    that limit's window (a period changed too may forget some of the longer one's).
    """

    async def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        storage = cast(MovingWindowSupport, self.storage)
        return await storage.acquire_entry(
            _key(item, identifiers), item.amount, item.get_expiry(), amount=cost
        )

    async def test(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        return (await self.get_window_stats(item, *identifiers)).remaining >= cost

    async def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        storage = cast(MovingWindowSupport, self.storage)
        start, count = await storage.get_moving_window(
            _key(item, identifiers), item.amount, item.get_expiry()
        )
        return WindowStats(start + item.get_expiry(), item.amount - count)

    async def clear(self, item: RateLimitItem, *identifiers: str) -> None:
        await self.storage.clear(_key(item, identifiers))


def _key(item: RateLimitItem, identifiers: tuple[str, ...]) -> str:
    return "/".join([item.namespace, *identifiers])


class _MaybeCounted(Exception):
    """Redis did not answer a send's count in time, but may have run it."""


def _may_have_run(exc: BaseException) -> bool:
    """True when a Redis call failed after it was sent: its answer timed out, and a stalled
    Redis (a fork for a snapshot, a slow disk) runs it and answers late. Added to Redis again
    with the outage's sends once Redis answers, such a send counted twice; kept in memory
    alone, it counts one fewer in Redis only if the network lost it. A refused connection or
    a connect that timed out never sent it. redis-py tells the two timeouts apart by their
    text alone (an unknown text: shared again, as before)."""
    return isinstance(exc, RedisTimeoutError) and str(exc).startswith("Timeout reading")


async def _acquire(
    limiter: MovingWindowRateLimiter, item: RateLimitItem, destination_id: str
) -> float | None:
    if await limiter.hit(item, destination_id):
        return None
    return await _wait(limiter, item, destination_id)


async def _wait(
    limiter: MovingWindowRateLimiter, item: RateLimitItem, destination_id: str
) -> float:
    stats = await limiter.get_window_stats(item, destination_id)
    # limits reports wall-clock time; the wait never exceeds one window, when all is free.
    return min(float(item.get_expiry()), max(MIN_WAIT_S, stats.reset_time - time.time()))


def _plain_redis_url(url: str) -> str:
    """`redis://…` for redis-py from either form of the URL."""
    url = url.removeprefix("async+")
    return "unix" + url.removeprefix("redis+unix") if url.startswith("redis+unix") else url


def _limits_redis_url(url: str) -> str:
    """`async+redis://…` (or `async+rediss`, `async+redis+unix`) for limits' async storage."""
    plain = _plain_redis_url(url)
    if plain.startswith("unix:"):
        return "async+redis+unix" + plain.removeprefix("unix")
    return f"async+{plain}"

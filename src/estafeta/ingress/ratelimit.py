"""Inbound rate limit per tenant: a sliding window counter, shared through Redis if set.

The algorithm is the one of the `limits` package's `SlidingWindowCounterRateLimiter`: two
counters per tenant (this window's and the previous one's), the previous weighed by how much
of it the sliding window still covers, so the count is approximate (it assumes the previous
window's requests were spread evenly) and O(1). `limits` still parses and validates the
configured limit ("100/minute"); its storages are not used on this path: in memory it
measured at 17 µs per request (an asyncio lock, key formatting and expiry bookkeeping per
hit), 8–13 % of the ingest server's CPU, where these few lines of arithmetic cost about 1 µs;
through Redis it would add a round trip to every webhook.

Shared without a round trip per request: each process decides from its own counts plus the
other processes' counts as it last saw them, and every `SHARE_INTERVAL_S` while requests come
in it tells Redis what it counted (one total per tenant and window) and reads the totals
back, in one pipelined round trip for all tenants: one script call for every tenant with new
counts and one MGET for every tenant's totals. The script is given each process's count so
far, not what it added since, and adds to the total only what exceeds the count it last
recorded for that process: a share that Redis ran but answered too late (the client times
out, retries it, and the limiter sends the counts again next time) counts once, not two or
three times, which would refuse the tenant early everywhere. (An MGET per tenant, parsed by
redis-py in Python, cost 10.3 ms of CPU per share at 500 tenants, a tenth of a core; one for
all, parsed by hiredis, 2.1 ms, most of it this module's own work per tenant.) A process
whose last read is older than `FRESH_S` (it had no requests for a while, or just started)
reads once before it decides, the requests that arrive meanwhile waiting for that one read:
deciding from what it saw minutes ago, it would admit the tenant's whole budget again, spent
elsewhere meanwhile. So a tenant's
limit holds across every `serve` process, give or take what the others admitted since they
last shared (at most `SHARE_INTERVAL_S` of their traffic). Windows are numbered by wall-clock
time so that every process numbers them alike. If Redis fails, each process goes on with the
counts it has, its own and the last seen, logs `redis_unavailable` once and tries again every
`retry_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from collections.abc import Callable

import redis.asyncio
from limits import parse
from redis.exceptions import NoScriptError

from estafeta.cancelling import cancel_and_wait
from estafeta.config import Config
from estafeta.config.models import DEFAULT_REDIS_KEY_PREFIX
from estafeta.redis_client import REDIS_ERRORS, RedisFailover

SHARE_INTERVAL_S = 0.1  # how often a process with traffic shares its counts through Redis
# How old the other processes' counts may be when a request is decided: ten shares' time, so
# a process with traffic (sharing every SHARE_INTERVAL_S) never waits for Redis.
FRESH_S = 1.0

# Records each process's count of a window and adds to the window's total what it grew by
# since last recorded, so that sending a count again (a retried or late share) adds nothing.
# KEYS: per window its total, then its hash of the processes' counts; ARGV: the process's
# id, then per window the process's count and the keys' TTL.
_ADD_COUNTS = """
for i = 1, #KEYS, 2 do
  local count = tonumber(ARGV[i + 1])
  local before = tonumber(redis.call('HGET', KEYS[i + 1], ARGV[1]) or '0')
  if count > before then
    redis.call('HSET', KEYS[i + 1], ARGV[1], count)
    redis.call('INCRBY', KEYS[i], count - before)
    redis.call('EXPIRE', KEYS[i], ARGV[i + 2])
    redis.call('EXPIRE', KEYS[i + 1], ARGV[i + 2])
  end
end
return 0
"""
_ADD_COUNTS_SHA = hashlib.sha1(_ADD_COUNTS.encode(), usedforsecurity=False).hexdigest()


class SlidingWindowCounter:
    """At most about `limit` requests in any `period_s`-second sliding window.

    `shared` counters also tell what they admitted per window and Redis does not have yet
    (`to_share()`, then `shared()` once Redis has it), and count what other processes
    admitted as `learn()` last told them.
    """

    def __init__(
        self,
        limit: int,
        period_s: float,
        *,
        clock: Callable[[], float] = time.time,
        shared: bool = False,
    ) -> None:
        if limit < 1 or period_s <= 0:
            raise ValueError(
                f"a rate limit needs a positive amount and period: {limit}/{period_s}s"
            )
        self.limit = limit
        self.period_s = period_s
        self._clock = clock
        self._shared = shared
        self._window = 0  # index of the current fixed window: floor(now / period)
        self._previous = 0  # requests counted here in the window before it
        self._current = 0  # requests counted here in it so far
        self._others: dict[int, int] = {}  # window → what other processes counted in it
        self._in_redis: dict[int, int] = {}  # window → this process's count as Redis has it

    def window(self) -> int:
        return int(self._clock() // self.period_s)

    def hit(self) -> float | None:
        """Count one request and return None if the window has room for it; else count
        nothing and return the seconds (> 0) until it will have."""
        now = self._clock()
        window = int(now // self.period_s)
        if window != self._window:
            # The current window became the previous one, or both are long gone.
            self._previous = self._current if window == self._window + 1 else 0
            self._window, self._current = window, 0
        previous = self._previous
        current = self._current
        if self._others:
            previous += self._others.get(window - 1, 0)
            current += self._others.get(window, 0)
        left_s = (window + 1) * self.period_s - now  # of the current window, in (0, period]
        if previous * left_s / self.period_s + current + 1 <= self.limit:
            self._current += 1
            return None
        room = self.limit - current - 1
        if room >= 0:
            # Within this window: the previous window's weight shrinks as it slides out.
            # previous * (left - t) / period <= room  ⇔  t >= left - room * period / previous
            return max(left_s - room * self.period_s / previous, 1e-3)
        # Only in the next window, once this one's weight has slid down far enough:
        # current * (period - s) / period + 1 <= limit.
        return left_s + self.period_s * (1 - (self.limit - 1) / current)

    # -- sharing (TenantRateLimiter.share) ---------------------------------------------------

    def to_share(self) -> dict[int, int]:
        """This process's whole count of each window it counted more in than Redis has
        (only windows that still count: the current and the previous)."""
        if not self._shared:
            return {}
        oldest = self.window() - 1
        counts = {self._window: self._current, self._window - 1: self._previous}
        return {w: n for w, n in counts.items() if w >= oldest and n > self._in_redis.get(w, 0)}

    def shared(self, counts: dict[int, int]) -> None:
        """Redis has the counts `to_share` returned (a failed share calls nothing: the
        counts go again, whole, with the next)."""
        for window, count in counts.items():
            self._in_redis[window] = max(count, self._in_redis.get(window, 0))

    def learn(self, totals: dict[int, int]) -> None:
        """Every process's count per window, as Redis holds it: the others' share is the
        total less this process's count in it."""
        for window, total in totals.items():
            self._others[window] = max(0, total - self._in_redis.get(window, 0))
        oldest = min(totals, default=self._window) - 1
        self._others = {w: n for w, n in self._others.items() if w >= oldest}
        self._in_redis = {w: n for w, n in self._in_redis.items() if w >= oldest}


class TenantRateLimiter:
    """`ingress_rate_limit` of every tenant, each counted on its own; shared by every process
    through `redis` when given (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        redis: redis.asyncio.Redis | None = None,
        key_prefix: str = DEFAULT_REDIS_KEY_PREFIX,
        retry_s: float = 5.0,
    ) -> None:
        self._counters: dict[str, SlidingWindowCounter] = {}
        for tenant in config.tenants:
            item = parse(tenant.ingress_rate_limit)
            self._counters[tenant.id] = SlidingWindowCounter(
                item.amount, float(item.get_expiry()), clock=clock, shared=redis is not None
            )
        self._redis = redis
        # Each tenant's counters are `<prefix>ingress:<tenant>:<period>:<window>` (the total)
        # and that key with `:processes` (each process's count, by `_process`). The period
        # is part of the key: a limit changed from per minute to per second numbers its
        # windows differently.
        self._key_heads = {
            tenant: f"{key_prefix}ingress:{tenant}:{counter.period_s:g}:"
            for tenant, counter in self._counters.items()
        }
        self._process = uuid.uuid4().hex  # this limiter's field in the counts' hashes
        self._failover = RedisFailover("ingress_rate_limit", retry_s=retry_s)
        self._sharing: asyncio.Task[None] | None = None
        self._active = False  # a request was counted since the last share
        self._share_lock = asyncio.Lock()  # one share at a time: see `share`
        self._learned_at = -math.inf  # time.monotonic() of the last share that read totals

    async def admit(self, tenant_id: str) -> int | None:
        """`retry_after`, decided from the other processes' counts as read at most `FRESH_S`
        ago: when the last read is older, the totals are read first. Never while Redis is
        known to be down (the background share tries it again), so no request waits for an
        outage."""
        if self._redis is not None and self._stale() and tenant_id in self._counters:
            learned_at = self._learned_at
            async with self._share_lock:
                # A share that held the lock meanwhile read them: that read decides, however
                # long it took (else each waiting request would read again, one after another).
                if self._stale() and self._learned_at == learned_at:
                    await self._share()
        return self.retry_after(tenant_id)

    def _stale(self) -> bool:
        return self._failover.available and time.monotonic() - self._learned_at > FRESH_S

    def retry_after(self, tenant_id: str) -> int | None:
        """None when the request may pass (and is counted); else whole seconds to wait (≥ 1),
        as `Retry-After` says them. An unknown tenant is not limited here (its request is
        refused elsewhere)."""
        counter = self._counters.get(tenant_id)
        if counter is None:
            return None
        wait_s = counter.hit()
        if self._redis is not None:
            self._active = True
            if self._sharing is None:
                self._sharing = asyncio.get_running_loop().create_task(self._share_while_active())
        return None if wait_s is None else max(1, math.ceil(wait_s))

    async def _share_while_active(self) -> None:
        try:
            while self._active:
                self._active = False
                await asyncio.sleep(SHARE_INTERVAL_S)
                await self.share()
        finally:
            self._sharing = None

    async def share(self) -> None:
        """Add this process's new counts to Redis and learn every process's totals; never
        raises a Redis error (the counts wait for the next share)."""
        if self._redis is None:
            return
        # One at a time: a share that sent counts and has not yet read the totals would make
        # another's arithmetic count those counts as this process's own already in Redis.
        async with self._share_lock:
            await self._share()

    async def _share(self) -> None:
        assert self._redis is not None  # noqa: S101 - callers check
        token = self._failover.begin()
        if token is None:  # Redis is down and not due for another try
            return
        sending = {tenant: c.to_share() for tenant, c in self._counters.items()}
        windows = {tenant: c.window() for tenant, c in self._counters.items()}
        started = time.monotonic()
        try:
            try:
                replies = await self._pipeline(sending, windows).execute()
            except NoScriptError:  # a Redis started since the script was loaded: load it
                await self._redis.script_load(_ADD_COUNTS)
                replies = await self._pipeline(sending, windows).execute()
        except REDIS_ERRORS as exc:
            self._failover.failed(token, exc)
            return
        self._failover.succeeded(token)
        self._learned_at = started
        totals = iter(replies[-1])
        for tenant, counter in self._counters.items():
            counter.shared(sending[tenant])
            now = windows[tenant]
            current, previous = next(totals), next(totals)
            counter.learn({now: int(current or 0), now - 1: int(previous or 0)})

    def _pipeline(
        self, sending: dict[str, dict[int, int]], windows: dict[str, int]
    ) -> redis.asyncio.client.Pipeline:
        """The share's one round trip: the new counts (one script call), then the totals of
        every tenant's current window and previous one (one MGET)."""
        assert self._redis is not None  # noqa: S101 - callers check
        pipe = self._redis.pipeline(transaction=False)
        keys: list[str] = []
        args: list[str | int] = [self._process]
        totals_keys: list[str] = []  # each tenant's current window's key, then its previous's
        for tenant, counter in self._counters.items():
            ttl_s = math.ceil(3 * counter.period_s)  # the window, the next, and a margin
            for window, count in sending[tenant].items():
                key = self._key(tenant, window)
                keys += (key, f"{key}:processes")
                args += (count, ttl_s)
            now = windows[tenant]
            totals_keys += (self._key(tenant, now), self._key(tenant, now - 1))
        if keys:
            pipe.evalsha(_ADD_COUNTS_SHA, len(keys), *keys, *args)
        pipe.mget(totals_keys)
        return pipe

    def _key(self, tenant: str, window: int) -> str:
        return f"{self._key_heads[tenant]}{window}"

    async def aclose(self) -> None:
        """Share what is left (best effort) and stop sharing."""
        if self._sharing is not None:
            await cancel_and_wait(self._sharing)
        await self.share()

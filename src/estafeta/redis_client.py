"""Redis for state shared by processes: a client that fails fast, and the bookkeeping of
its outages.

Redis holds nothing that must survive (DESIGN.md §1: cache, rate limits, breakers), so every
component that keeps state there — circuits (delivery/circuit_store.py), the outbound throttle
(delivery/throttle.py), the tenants' inbound limit (ingress/ratelimit.py) — carries on from
process memory while Redis is unreachable, and each logs the outage once (`RedisFailover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import redis.asyncio
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)  # OSError: TimeoutError too


class RedisFailover:
    """When to try Redis, and the two log events of an outage, for one component.

    `begin()` before a Redis call returns a token (None: use the fallback now); report the
    call with `succeeded(token)` or `failed(token, exc)`. The token is the outage generation
    the call started in, so a slow call that started before an outage cannot end it, and one
    that fails after recovery cannot start a new one: `redis_unavailable` and
    `redis_available` are each logged once per outage, however many calls were in flight.

    While down, Redis is tried again at most every `retry_s` (monotonic seconds). With a
    `probe` (a PING), a call due for a try starts it in the background and uses the fallback
    like the rest: its success ends the outage. A silent Redis (it accepts connections and
    never answers: stopped, or a proxy that stopped forwarding) is waited for by the probe
    alone, not by a delivery; only the call that finds the outage waits out its timeout.
    Without a probe, the call due for a try gets a token and tries Redis itself: for callers
    already off the hot path (the inbound limit's periodic share, ingress/ratelimit.py).
    """

    def __init__(
        self,
        component: str,
        *,
        retry_s: float,
        monotonic: Callable[[], float] = time.monotonic,
        probe: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.component = component
        self.retry_s = retry_s
        self._monotonic = monotonic
        self._probe = probe
        self._probing: asyncio.Task[None] | None = None
        self.available = True
        self._generation = 0
        self._next_try = 0.0

    def begin(self) -> int | None:
        if self.available:
            return self._generation
        now = self._monotonic()
        if now < self._next_try:
            return None
        self._next_try = now + self.retry_s  # one try per retry_s, however many callers
        if self._probe is None:
            return self._generation  # this caller tries Redis
        if self._probing is None:
            self._probing = asyncio.get_running_loop().create_task(self._try(self._generation))
        return None

    async def _try(self, token: int) -> None:
        assert self._probe is not None  # noqa: S101 - begin checks
        try:
            await self._probe()
        except REDIS_ERRORS as exc:
            self.failed(token, exc)
        else:
            self.succeeded(token)
        finally:
            self._probing = None

    async def probed(self) -> None:
        """Until the background try in flight, if any, has ended (for tests)."""
        if self._probing is not None:
            await asyncio.shield(self._probing)

    async def aclose(self) -> None:
        """Stop the background try in flight, if any: before its client is closed, or its
        connection, given back to a closed pool, stays open."""
        if self._probing is not None:
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing
            self._probing = None  # cancelled before it ran, it did not reset it

    def current(self, token: int) -> bool:
        """No outage began since `token` was handed out."""
        return token == self._generation

    def succeeded(self, token: int) -> None:
        if not self.available and token == self._generation:
            self.available = True
            _log().info("redis_available", component=self.component)

    def failed(self, token: int, exc: BaseException) -> None:
        if token != self._generation:
            return
        self._next_try = self._monotonic() + self.retry_s
        if self.available:
            self.available = False
            self._generation += 1
            _log().warning(
                "redis_unavailable",
                component=self.component,
                error=type(exc).__name__,
                detail=str(exc)[:200],
                retry_s=self.retry_s,
            )


def connect_redis(url: str, *, timeout_s: float = 1.0) -> redis.asyncio.Redis:
    """A client whose calls fail within about `2 * timeout_s` when Redis is gone.

    redis-py's defaults wait forever on a silent network and retry ten times with backoff;
    for state that has a local fallback, failing fast is worth more. One retry stays, so the
    first call after a Redis restart replaces its dead pooled connection instead of failing
    (see `retry_once`).
    """
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=retry_once(),
    )


def retry_once() -> Retry:
    """One more try of a call whose connection failed, none of one that timed out.

    redis-py retries on timeouts too, but a call that timed out waiting for its answer may
    have run: Redis, stalled (a fork for a snapshot, a slow disk), answers late. Sent again,
    it ran twice: a destination's send or a circuit's failure counted twice, the claim of a
    half-open circuit's probe taken for another worker's, so that no worker sent it. A
    dead pooled connection (Redis restarted) fails as a connection error instead.
    """
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def _log() -> structlog.typing.FilteringBoundLogger:
    # Looked up at each (rare) use rather than once per module: with
    # cache_logger_on_first_use, a module-level logger would keep the processors of whichever
    # configuration was current when it first logged.
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("estafeta.redis")
    return logger

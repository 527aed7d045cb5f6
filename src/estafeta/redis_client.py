"""Redis for state shared by processes: a client that fails fast, and the bookkeeping of
its outages.

Redis holds nothing that must survive (DESIGN.md §1: cache, rate limits, breakers), so every
component that keeps state there — circuits (delivery/circuit_store.py), the outbound throttle
(delivery/throttle.py), the tenants' inbound limit (ingress/ratelimit.py) — carries on from
process memory while Redis is unreachable, and each logs the outage once (`RedisFailover`).

A Redis that answers but refuses what we send is an outage too, with its reason (`reason`):
full (`OOM`: `maxmemory` under `noeviction`), a read-only replica after a failover
(`READONLY`), a failing snapshot (`MISCONF`), a command the ACL user may not run (`NOPERM`),
a password no longer valid (`WRONGPASS`). Reads still pass then, and a PING too (but under
`MISCONF`), so a try of Redis writes a key of ours (`write_probe`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import redis.asyncio
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from estafeta.cancelling import cancel_and_wait

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)  # OSError: TimeoutError too
PROBE_TTL_MS = 60_000  # the probe's key goes with the last process that wrote it

# Redis's error codes (the first word of its answer) that refuse a command of ours, and what
# the operator reads of each (docs/operations.md, "Redis refuses writes").
_REFUSALS = {
    "OOM": "Redis refuses writes: out of memory (maxmemory reached, noeviction policy)",
    "READONLY": "Redis refuses writes: a read-only replica (after a failover?)",
    "MISCONF": "Redis refuses writes: it cannot save its snapshot (MISCONF)",
    "NOPERM": "Redis refuses a command: the ACL user lacks a permission (NOPERM)",
    "WRONGPASS": "Redis refuses the password or user (WRONGPASS)",
    "NOAUTH": "Redis requires a password (NOAUTH)",
}


class RedisFailover:
    """When to try Redis, and the two log events of an outage, for one component.

    `begin()` before a Redis call returns a token (None: use the fallback now); report the
    call with `succeeded(token)` or `failed(token, exc)`. The token is the outage generation
    the call started in, so a slow call that started before an outage cannot end it, and one
    that fails after recovery cannot start a new one: `redis_unavailable` and
    `redis_available` are each logged once per outage, however many calls were in flight.

    While down, Redis is tried again at most every `retry_s` (monotonic seconds). With a
    `probe` (`write_probe`), a call due for a try starts it in the background and uses the
    fallback like the rest: its success ends the outage. A silent Redis (it accepts connections and
    never answers: stopped, or a proxy that stopped forwarding) is waited for by the probe
    alone, not by a delivery; only the call that finds the outage waits out its timeout.
    Without a probe, the call due for a try gets a token and tries Redis itself: for callers
    already off the hot path (the inbound limit's periodic share, ingress/ratelimit.py).

    An outage of a Redis that answered with a refusal (`refused`) is not ended by the probe
    alone: a probe that writes a key may pass where the component's own commands still fail
    (an ACL user allowed SET, not EVALSHA). Its success lets the next call try Redis, and that
    call's success ends the outage; its failure keeps it, unlogged, for another `retry_s`.
    Each refusal would otherwise end and start an outage every `retry_s`, two log lines each.
    A read (`writes=False`) does not take that trial after a write was refused: reads pass
    on a full or read-only Redis, and one passing ended the outage (the circuits' copy read
    back from Redis's stale one) until the next write began another.
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
        # The outage's last failure, when Redis refused a command: "read" or "write" (only
        # a write ends the refusal of one); "" when it could not be reached.
        self._refused: Literal["", "read", "write"] = ""
        self._trial = False  # a probe passed: the next call tries Redis (after a refusal)
        self.reason = ""  # why the current outage began (`describe`)

    def begin(self, *, writes: bool = True) -> int | None:
        """A token to call Redis with, or None; `writes`: whether the call writes."""
        if self.available:
            return self._generation
        now = self._monotonic()
        if self._trial and (writes or self._refused != "write"):
            self._trial = False
            self._next_try = now + self.retry_s
            return self._generation  # this caller tries what the probe could not
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
            # The try's write is ours, not the component's: which of its calls failed stands.
            self.failed(token, exc, writes=self._refused == "write")
        else:
            if self._refused and token == self._generation:
                self._trial = True
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
            await cancel_and_wait(self._probing)
            self._probing = None  # cancelled before it ran, it did not reset it

    def current(self, token: int) -> bool:
        """No outage began since `token` was handed out."""
        return token == self._generation

    def succeeded(self, token: int, *, writes: bool = True) -> None:
        """`writes`: whether the call wrote; one that did not ends no refusal of a write."""
        if not writes and self._refused == "write":
            return  # the next try's trial goes to a call that writes
        if not self.available and token == self._generation:
            self.available = True
            self._refused, self._trial = "", False
            self.reason = ""
            _log().info("redis_available", component=self.component)

    def failed(self, token: int, exc: BaseException, *, writes: bool = True) -> None:
        if token != self._generation:
            return
        self._next_try = self._monotonic() + self.retry_s
        self._refused = ("write" if writes else "read") if refused(exc) else ""
        self._trial = False
        if self.available:
            self.available = False
            self._generation += 1
            self.reason = describe(exc)
            _log().warning(
                "redis_unavailable",
                component=self.component,
                reason=self.reason,
                error=type(exc).__name__,
                detail=str(exc)[:200],
                retry_s=self.retry_s,
            )


def refused(exc: BaseException) -> bool:
    """Redis answered, refusing the command (or the password): it may take others, a PING."""
    return isinstance(exc, ResponseError | AuthenticationError)


def describe(exc: BaseException) -> str:
    """What an operator reads of a failed call: Redis's refusal, else that it could not be
    reached. Redis's own text of a refusal names no secret."""
    if not refused(exc):
        return "Redis cannot be reached"
    for kind, code in _CODES:  # redis-py drops the code from the text of these
        if isinstance(exc, kind):
            no_auth = kind is AuthenticationError and "required" in str(exc)
            return _REFUSALS["NOAUTH" if no_auth else code]
    # A pipeline's error is "Command # 1 (HSET …) of pipeline caused error: MISCONF …".
    text = str(exc).rsplit("caused error: ", 1)[-1]
    if "user executing the script can't run" in text:  # NOPERM within a script: ERR
        return _REFUSALS["NOPERM"]
    return _REFUSALS.get(text.split(" ", 1)[0], "Redis refuses a command")


_CODES: tuple[tuple[type[Exception], str], ...] = (
    (OutOfMemoryError, "OOM"),
    (ReadOnlyError, "READONLY"),
    (NoPermissionError, "NOPERM"),
    (AuthenticationError, "WRONGPASS"),
)


async def write_probe(client: redis.asyncio.Redis, key: str) -> None:
    """Whether Redis takes a write (raises its error if not): what every component needs of
    it, where a PING passes a full Redis, a replica or a user without write permissions."""
    await client.set(key, b"1", px=PROBE_TTL_MS)


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

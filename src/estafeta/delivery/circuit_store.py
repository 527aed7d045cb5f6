"""Where circuits live: one `CircuitStateStore` Protocol, three implementations.

Every worker process must see the same circuit for a destination, or N processes would each
send their own probe and each count only their own failures. With Redis configured the
circuits live there (`RedisCircuitStore`); without it, in process memory
(`MemoryCircuitStore`); the SQL store implements the same Protocol (store/).

`FallbackCircuitStore` wraps Redis with a memory copy, because Redis holds no data that must
survive (DESIGN.md §1: cache, rate limits, breakers) and its outage must not stop deliveries:
on a Redis error it carries on from memory — seeded with the last state it read from Redis,
so an open circuit does not snap shut — and tries Redis again every `retry_s` with a write of
a key of its own in the background (`write_probe`: a full or read-only Redis answers a PING),
so that no delivery waits for a silent Redis.

The outage bookkeeping (`RedisFailover`) and the fail-fast client are in redis_client.py,
shared with the outbound throttle and the inbound rate limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import orjson
import redis.asyncio
from redis.exceptions import WatchError

from estafeta.config.models import DEFAULT_REDIS_KEY_PREFIX
from estafeta.delivery.circuit import Circuit
from estafeta.redis_client import REDIS_ERRORS, RedisFailover, write_probe

_HEALTHY = Circuit()


def every_circuit(known: Mapping[str, Circuit], destinations: Iterable[str]) -> dict[str, Circuit]:
    """The circuits a reader shows: each of `destinations`, healthy unless `known` (what a
    store's `get_all` said) has it otherwise, and every other circuit on record."""
    return {destination_id: _HEALTHY for destination_id in destinations} | dict(known)


class CircuitStateStore(Protocol):
    async def get_all(self) -> dict[str, Circuit]:
        """Every destination's circuit that is not `Circuit()` (absent means healthy)."""
        ...

    async def update(
        self, destination_id: str, change: Callable[[Circuit], Circuit]
    ) -> tuple[Circuit, Circuit]:
        """Apply `change` atomically across processes; returns (before, after).

        `change` must be pure: an optimistic store may call it more than once.
        """
        ...


class MemoryCircuitStore:
    """Circuits of this process only (no Redis configured, or Redis is down)."""

    def __init__(self) -> None:
        self._circuits: dict[str, Circuit] = {}

    async def get_all(self) -> dict[str, Circuit]:
        return dict(self._circuits)

    async def update(
        self, destination_id: str, change: Callable[[Circuit], Circuit]
    ) -> tuple[Circuit, Circuit]:
        # No await between the read and the write: atomic within the event loop.
        before = self._circuits.get(destination_id, _HEALTHY)
        after = change(before)
        self.put(destination_id, after)
        return before, after

    def put(self, destination_id: str, circuit: Circuit) -> None:
        """Set one circuit (a mirror of what Redis said)."""
        if circuit == _HEALTHY:
            self._circuits.pop(destination_id, None)
        else:
            self._circuits[destination_id] = circuit

    def replace(self, circuits: Mapping[str, Circuit]) -> None:
        """Set every circuit at once (a mirror of what Redis said)."""
        self._circuits = {d: c for d, c in circuits.items() if c != _HEALTHY}


class RedisCircuitStore:
    """All circuits in one hash `{prefix}circuits`, one JSON field per destination.

    Updates are optimistic (WATCH the hash, read, MULTI/EXEC the write, start again on
    WatchError), so `change` runs in Python and stays the pure policy of circuit.py; every
    retry means another writer succeeded, so the writers as a whole always progress. A change
    that changes nothing writes nothing, which keeps the common case (a success on a healthy
    destination) to one read.

    One process's updates take turns: a burst of failures (every send in flight timing out
    together) then costs one round each, not rounds that all but one lose to each other
    (quadratic, and one pooled connection per waiter). Only other processes race.
    """

    def __init__(self, client: redis.asyncio.Redis, prefix: str = DEFAULT_REDIS_KEY_PREFIX) -> None:
        self._client = client
        self.key = f"{prefix}circuits"
        self._probe_key = f"{prefix}probe"
        self._turn = asyncio.Lock()

    async def probe(self) -> None:
        """Raises Redis's error unless it takes a write (redis_client.write_probe)."""
        await write_probe(self._client, self._probe_key)

    async def get_all(self) -> dict[str, Circuit]:
        raw = await self._client.hgetall(self.key)
        circuits = {_text(field): _decode(value) for field, value in raw.items()}
        return {d: c for d, c in circuits.items() if c != _HEALTHY}

    async def update(
        self, destination_id: str, change: Callable[[Circuit], Circuit]
    ) -> tuple[Circuit, Circuit]:
        async with self._turn, self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.key)
                    before = _decode(await pipe.hget(self.key, destination_id))
                    after = change(before)
                    if after == before:
                        return before, after  # leaving the pipeline sends UNWATCH
                    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                    if after == _HEALTHY:
                        pipe.hdel(self.key, destination_id)
                    else:
                        pipe.hset(self.key, destination_id, orjson.dumps(after.to_dict()))
                    await pipe.execute()
                    return before, after
                except WatchError:
                    continue  # someone else wrote the hash between our read and our write


class FallbackCircuitStore:
    """Redis first; process memory while Redis is unreachable. Never raises a Redis error.

    Every answer from Redis is mirrored into the memory store, so during an outage this
    process continues from the last shared state it saw. When Redis is back, Redis is the
    truth again and what was learnt alone in the meantime is dropped: other processes had
    their own views, and a circuit that should be open re-opens after `failures` more tries.
    """

    def __init__(
        self,
        primary: RedisCircuitStore,
        fallback: MemoryCircuitStore | None = None,
        *,
        retry_s: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._primary = primary
        self._fallback = fallback or MemoryCircuitStore()
        self._failover = RedisFailover(
            "circuit_store", retry_s=retry_s, monotonic=monotonic, probe=primary.probe
        )
        self._turn = asyncio.Lock()

    @property
    def using_primary(self) -> bool:
        """False during an outage (for /health and tests)."""
        return self._failover.available

    async def get_all(self) -> dict[str, Circuit]:
        token = self._failover.begin(writes=False)
        if token is not None:
            try:
                circuits = await self._primary.get_all()
            except REDIS_ERRORS as exc:
                self._failover.failed(token, exc, writes=False)
            else:
                self._failover.succeeded(token)
                self._fallback.replace(circuits)
                return circuits
        return await self._fallback.get_all()

    async def update(
        self, destination_id: str, change: Callable[[Circuit], Circuit]
    ) -> tuple[Circuit, Circuit]:
        token = self._failover.begin()
        if token is not None:
            # Updates take turns (RedisCircuitStore): one that waited for its turn while the
            # update before it found Redis gone uses memory at once. Each trying Redis in
            # turn waited out one timeout after another (a burst of 256, minutes), and the
            # attempts' records waited behind them past their leases.
            async with self._turn:
                if self._failover.current(token):
                    try:
                        before, after = await self._primary.update(destination_id, change)
                    except REDIS_ERRORS as exc:
                        self._failover.failed(token, exc)
                    else:
                        # A change of nothing is a read (RedisCircuitStore.update): no write.
                        self._failover.succeeded(token, writes=after != before)
                        self._fallback.put(destination_id, after)
                        return before, after
        return await self._fallback.update(destination_id, change)

    async def aclose(self) -> None:
        """Stop the background try of Redis, if one runs (the client is the caller's)."""
        await self._failover.aclose()


async def close_circuits(circuits: CircuitStateStore) -> None:
    """Stop a Redis-backed store's background try of Redis (before its client is closed)."""
    if isinstance(circuits, FallbackCircuitStore):
        await circuits.aclose()


async def current_circuits(
    circuits: CircuitStateStore, *, delivers: bool
) -> dict[str, Circuit] | None:
    """What `circuits` holds, or None when that says nothing of now: during a Redis outage a
    process whose own workers do not act on the circuits (`serve --no-workers`) has only the
    copy it read before the outage, which nothing updates. A process that delivers acts on
    its copy: that is its live view. Raises what `get_all` raises."""
    known = await circuits.get_all()
    frozen = isinstance(circuits, FallbackCircuitStore) and not circuits.using_primary
    return None if frozen and not delivers else known


def _decode(raw: bytes | str | None) -> Circuit:
    """A stored circuit; unreadable JSON counts as healthy and is overwritten by the next write.

    Erring towards delivering is safe: if the destination really is down, the breaker opens
    again after `failures` more failures.
    """
    if raw is None:
        return _HEALTHY
    try:
        data = orjson.loads(raw)
        return Circuit.from_dict(data) if isinstance(data, dict) else _HEALTHY
    except (ValueError, TypeError):
        return _HEALTHY


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

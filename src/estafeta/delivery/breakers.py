"""The circuit breakers of every destination, as one worker sees and drives them.

The pure breaker is in circuit.py and its shared state behind a `CircuitStateStore`
(Redis with a local fallback when Redis is configured, else the store's `circuits` table).
This module decides, for one worker:

* which destinations the lease must skip: every one whose circuit is not closed. An open
  circuit's deliveries wait in the queue without spending attempts;
* when to probe: once an open circuit's `reset_s` has passed, exactly one worker wins the
  probe (an atomic `admit`), leases one delivery of that destination and sends it; its
  result closes the circuit or opens it again;
* what a result means: a retryable failure (5xx, timeout, connection error) counts against
  the destination; a 429 or a provider's rate-limit code (it asked us to slow down;
  Retry-After and backoff handle that), a permanent
  4xx (about the payload, not the destination's health) and a lost lease count for nothing.
  A probe answered so is given back: the destination answered, so the next delivery probes
  at once instead of every delivery waiting for the probe timeout.

A healthy destination costs nothing: successes are written only while a circuit has
failures on record, so the shared state is touched only when something is wrong.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis

from estafeta.config import Config
from estafeta.config.models import DEFAULT_TIMEOUTS_S
from estafeta.delivery.circuit import (
    Admission,
    Circuit,
    CircuitPolicy,
    CircuitState,
    admit,
    blocked_until,
    give_back,
    record,
)
from estafeta.delivery.circuit_store import (
    CircuitStateStore,
    FallbackCircuitStore,
    RedisCircuitStore,
)
from estafeta.delivery.outcome import LOCAL_RESOURCES, Outcome, OutcomeKind
from estafeta.messaging.facts import send_destination
from estafeta.messaging.outbound import can_send
from estafeta.observability.metrics import CIRCUIT_TRANSITIONS
from estafeta.redis_client import connect_redis
from estafeta.store.sqlstore import SqlStore

log = structlog.get_logger("estafeta.circuit")

REFRESH_S = 0.5  # how stale this worker's view of other workers' circuits may get
PRISTINE = Circuit()
PROBE_TIMEOUT_S = 60.0  # the most a probe is waited for beyond its attempt's own time
PROBE_MARGIN_S = 5.0  # over the attempt's own timeout: its result's way to the circuit


class StoreCircuitStore:
    """`CircuitStateStore` over the store's `circuits` table (no Redis configured)."""

    def __init__(self, store: SqlStore) -> None:
        self._store = store

    async def get_all(self) -> dict[str, Circuit]:
        circuits = {
            d: Circuit.from_dict(data) for d, data in (await self._store.circuit_states()).items()
        }
        # A row stays once written: a healthy one is absent, as the Protocol says (and as a
        # forgotten circuit of a removed destination must be, or /health/detailed lists it).
        return {d: c for d, c in circuits.items() if c != PRISTINE}

    async def update(
        self, destination_id: str, change: Callable[[Circuit], Circuit]
    ) -> tuple[Circuit, Circuit]:
        def apply(data: dict[str, Any] | None) -> dict[str, Any]:
            before = Circuit.from_dict(data) if data else PRISTINE
            result: dict[str, Any] = change(before).to_dict()
            return result

        before, after = await self._store.update_circuit(
            destination_id, apply, time.time_ns() // 1_000_000
        )
        return (Circuit.from_dict(before) if before else PRISTINE), Circuit.from_dict(after)


def circuit_state_store(
    config: Config, store: SqlStore, redis: Redis | None = None
) -> CircuitStateStore:
    """Where circuits are shared: Redis (falling back to memory) when configured, else the store.
    `redis` is a client to use rather than a new one."""
    if config.redis.url:
        client = redis if redis is not None else connect_redis(config.redis.url)
        return FallbackCircuitStore(RedisCircuitStore(client, config.redis.key_prefix))
    return StoreCircuitStore(store)


def counts_against(outcome: Outcome) -> bool | None:
    """True: success; False: a failure of the destination; None: says nothing about it."""
    if outcome.kind is OutcomeKind.SUCCESS:
        return True
    if outcome.kind is OutcomeKind.PERMANENT:
        return None
    # Nor does a send this process had no descriptor for: circuits are shared by every
    # process, and one host's shortage held a sound destination back for all of them.
    if outcome.slow_down or outcome.error_class in ("lease_expired", LOCAL_RESOURCES):
        return None
    return False


def _probe_timeout_s(lease_s: float, timeout_s: float) -> float:
    """How long a probe is waited for: as long as its attempt may take (forgotten sooner, a
    second probe was admitted and the first one's success ignored as late, so a destination
    slower than 60 s never closed its circuit), else a lease, as its delivery is (a killed
    worker's probe blocked the destination for a fixed 60 s after its delivery was rescued).
    Never more than that 60 s, though: a lease may be hours long, and a probe cannot answer
    after its attempt's timeout, while the circuit holds back all of the destination."""
    return max(min(lease_s, PROBE_TIMEOUT_S), timeout_s + PROBE_MARGIN_S)


class Breakers:
    def __init__(self, states: CircuitStateStore, config: Config) -> None:
        self._states = states
        lease_s, max_attempt_s = config.worker.lease_s, config.worker.max_attempt_s
        self._policies = {
            d.id: CircuitPolicy(
                failures=d.circuit.failures,
                reset_s=d.circuit.reset_s,
                failure_ratio=d.circuit.failure_ratio,
                window_s=d.circuit.window_s,
                min_requests=d.circuit.min_requests,
                probe_timeout_s=_probe_timeout_s(lease_s, d.effective_timeout_s(max_attempt_s)),
            )
            for d in config.destinations
        }
        # A provider source's sends have a circuit of the defaults; their probe is waited for
        # by the same rule (a fixed minute held the number back past the rescue of a killed
        # worker's probe).
        send_timeout_s = min(DEFAULT_TIMEOUTS_S["whatsapp_send"], max_attempt_s)
        self._policies.update(
            {
                send_destination(s.id): CircuitPolicy(
                    probe_timeout_s=_probe_timeout_s(lease_s, send_timeout_s)
                )
                for s in config.sources
                if can_send(s)
            }
        )
        self._known: dict[str, Circuit] = {}
        self._next_refresh = 0.0
        self.transitions: Counter[tuple[str, str]] = Counter()  # (destination, new state)

    def _policy(self, destination_id: str) -> CircuitPolicy:
        return self._policies.get(destination_id) or CircuitPolicy()

    async def refresh(self, *, force: bool = False) -> None:
        """Take in what other workers did to the circuits (at most every REFRESH_S)."""
        now = time.monotonic()
        if force or now >= self._next_refresh:
            self._next_refresh = now + REFRESH_S
            self._known = await self._states.get_all()

    def not_closed(self) -> set[str]:
        """Destinations an ordinary lease must skip: every circuit that is not closed."""
        return {d for d, c in self._known.items() if c.state is not CircuitState.CLOSED}

    def blocked_until(self, destination_id: str, now_ms: int) -> int | None:
        circuit = self._known.get(destination_id)
        if circuit is None:
            return None
        return blocked_until(circuit, self._policy(destination_id), now_ms)

    def probe_ready(self, now_ms: int) -> list[str]:
        """Open circuits whose wait is over: one worker may now send them a probe."""
        return [
            d
            for d, c in self._known.items()
            if c.state is not CircuitState.CLOSED
            and blocked_until(c, self._policy(d), now_ms) is None
        ]

    async def try_probe(self, destination_id: str, now_ms: int) -> bool:
        """Claim the probe of a circuit; True for exactly one worker."""
        policy = self._policy(destination_id)
        before, after = await self._states.update(
            destination_id, lambda c: admit(c, policy, now_ms)[1]
        )
        self._remember(destination_id, before, after)
        return admit(before, policy, now_ms)[0] is Admission.PROBE

    async def give_back_probe(self, destination_id: str, *, started_at: int | None = None) -> None:
        """A claimed probe was not sent, or was cut short unanswered (admitted at
        `started_at`): reopen as it was so another may probe."""
        before, after = await self._states.update(
            destination_id, lambda c: give_back(c, started_at_ms=started_at)
        )
        self._remember(destination_id, before, after)  # half_open → open, logged and counted

    def on_record(self) -> set[str]:
        """Destinations with a circuit on record (not healthy), as last read."""
        return set(self._known)

    async def forget(self, destination_id: str) -> None:
        """Clear the circuit of a destination no running process names any more (removed
        or renamed): nothing will probe it again, so it would stay open for good in
        /health/detailed and /metrics, and the destination added back would start from it.
        Left as it is if it changed since it was read (a process naming it again recorded
        meanwhile)."""
        seen = self._known.get(destination_id, PRISTINE)
        before, after = await self._states.update(
            destination_id, lambda c: PRISTINE if c == seen else c
        )
        if after == PRISTINE:
            self._known.pop(destination_id, None)
            if before != PRISTINE:
                log.info("circuit_forgotten", destination=destination_id, state=before.state.value)
        else:
            self._known[destination_id] = after

    async def record(
        self, destination_id: str, outcome: Outcome, *, started_at: int, now_ms: int
    ) -> None:
        success = counts_against(outcome)
        if success is None:
            # Nothing to count; only a half-open circuit (this worker's probe) has to know.
            if self._known.get(destination_id, PRISTINE).state is CircuitState.HALF_OPEN:
                before, after = await self._states.update(
                    destination_id, lambda c: give_back(c, started_at_ms=started_at)
                )
                self._remember(destination_id, before, after)
            return
        policy = self._policy(destination_id)
        pristine = self._known.get(destination_id, PRISTINE) == PRISTINE
        if success and pristine and policy.failure_ratio is None:
            return  # the healthy path writes nothing (a ratio needs every result counted)
        before, after = await self._states.update(
            destination_id,
            lambda c: record(c, policy, success=success, now_ms=now_ms, started_at_ms=started_at),
        )
        self._remember(destination_id, before, after)

    def _remember(self, destination_id: str, before: Circuit, after: Circuit) -> None:
        self._known[destination_id] = after
        if before.state is not after.state:
            self.transitions[(destination_id, after.state.value)] += 1
            CIRCUIT_TRANSITIONS.labels(destination_id, after.state.value).inc()
            log.warning(
                f"circuit_{after.state.value}",
                destination=destination_id,
                previous=before.state.value,
                consecutive_failures=after.consecutive_failures,
            )

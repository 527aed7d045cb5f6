"""The sends in flight: each delivery the worker starts, from its send to its record.

The worker's loop (worker.py) decides what to lease and what to start; each delivery it
starts is one task here, which

    connector.deliver (bounded by a ceiling) ─► the circuit ─► decide ─► free the slot
        ─► submit the completed attempt, recorded with others in one batch (group commit)

The slot accounting those tasks change lives here too, because only they change it: the
sends in flight (all, and per destination, for fair leases and `max_in_flight` caps), those
whose destination has answered (on stop they record their outcome; only the others may be
given back unsent) and those whose record is being committed (they hold no slot).

This is the hot path: every attempt runs `start`, `_attempt` and `_finished`, and reads
nothing but attributes of this object; keep it so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence

import msgspec
import structlog

from estafeta.clock import Clock
from estafeta.config import Config
from estafeta.config.models import DEFAULT_TIMEOUTS_S, SourceConfig
from estafeta.connectors.exchange import no_answer_within
from estafeta.connectors.registry import Connectors
from estafeta.delivery.backoff import DEFAULT_BACKOFF, BackoffPolicy
from estafeta.delivery.breakers import Breakers
from estafeta.delivery.decision import decide
from estafeta.delivery.expiry import Expiry
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.delivery.state import DeliveryState
from estafeta.errors import StoreUnavailable
from estafeta.ids import new_id
from estafeta.messaging.facts import send_destination
from estafeta.messaging.outbound import can_send
from estafeta.observability.log_throttle import LogThrottle
from estafeta.observability.metrics import ATTEMPT_SECONDS, ATTEMPTS, DEAD_LETTERED, series
from estafeta.store.group_commit import GroupCommitter
from estafeta.store.records import CompletedAttempt
from estafeta.store.sqlstore import SqlStore

log = structlog.get_logger("estafeta.worker")

CEILING_MARGIN_S = 1.0  # the per-attempt ceiling over a destination's own timeout
RETRY_AFTER_FLOOR_S = 1.0  # the least wait after a timeout or a 429
# On stop, how long a send already answered may take to record its result; past it, its
# lease expires as if the worker had died (at-least-once), but it is never given back unsent.
RESULT_GRACE_S = 5.0
# While the store cannot be reached, how often a result is offered to it again.
RECORD_RETRY_S = 1.0


def attempt_ceilings(config: Config, senders: Sequence[SourceConfig]) -> dict[str, float]:
    """How long an attempt to each destination (and each provider source's sends) may take
    at most: its own timeout and a margin, in case its connector does not bound itself."""
    ceiling = config.worker.max_attempt_s
    ceilings = {
        d.id: d.effective_timeout_s(ceiling) + CEILING_MARGIN_S for d in config.destinations
    }
    send_timeout_s = min(DEFAULT_TIMEOUTS_S["whatsapp_send"], ceiling)
    ceilings.update({send_destination(s.id): send_timeout_s + CEILING_MARGIN_S for s in senders})
    return ceilings


def attempt_limits(config: Config) -> dict[str, int]:
    """The attempts each destination a delivery stored under `config` may name allows: its
    `max_attempts`, and each provider source's sends their `send_max_attempts`."""
    limits = {d.id: d.max_attempts for d in config.destinations}
    limits.update(
        {send_destination(s.id): s.send_max_attempts for s in config.sources if can_send(s)}
    )
    return limits


def destination_tenants(config: Config) -> dict[str, str]:
    """The tenant each destination a delivery may name belongs to (a configured destination,
    or a provider source's sends). An id is one tenant's at a time, but not for ever: a
    tenant's destination removed, its id given to another tenant's, and the first tenant's
    deliveries still waiting (pending, dead, spooled) must not go to the second's endpoint."""
    owners = {d.id: d.tenant for d in config.destinations}
    owners.update({send_destination(s.id): s.tenant for s in config.sources if can_send(s)})
    return owners


def governed(delivery: LeasedDelivery, limits: Mapping[str, int]) -> LeasedDelivery:
    """`delivery` with the `max_attempts` of the configuration in force, when it names the
    destination: an operator who raises it to outlast an outage, and restarts, means the
    deliveries already waiting too. The limit the delivery was stored with (the store keeps
    the last one decided with) governs only where the configuration lacks the destination."""
    limit = limits.get(delivery.destination_id, delivery.max_attempts)
    if limit == delivery.max_attempts:
        return delivery
    return msgspec.structs.replace(delivery, max_attempts=limit)


class Attempts:
    """One worker's sends in flight and the recording of their results."""

    def __init__(
        self,
        store: SqlStore,
        *,
        connectors: Connectors,
        breakers: Breakers,
        clock: Clock,
        rand: Callable[[], float],
        policies: dict[str, BackoffPolicy],
        limits: dict[str, int],
        ceilings: dict[str, float],
        max_attempt_s: float,
        caps: dict[str, int],
        slot_freed: asyncio.Event,
        cap_freed: asyncio.Event,
        wake: asyncio.Event,
        worker_id: str,
    ) -> None:
        self.store = store
        self.clock = clock
        self.breakers = breakers
        self.worker_id = worker_id
        self._connectors = connectors
        self._rand = rand
        self._policies = policies
        self._limits = limits
        self._ceilings = ceilings
        self._max_attempt_s = max_attempt_s
        self._caps = caps
        self._slot_freed = slot_freed  # a send ended (the worker's loop may lease again)
        self._cap_freed = cap_freed  # a capped destination at its cap freed a slot
        self._wake = wake  # the loop's: set when a key's next delivery may be leased
        self.in_flight: dict[asyncio.Task[None], LeasedDelivery] = {}
        # Sends in `in_flight` whose destination has answered (or timed out): on stop they
        # record their outcome; only the others may be given back as unsent.
        self._answered: set[asyncio.Task[None]] = set()
        # Sends in flight per destination: the lease gives free slots to the destinations
        # with the fewest first, so a slow destination's backlog cannot take every slot.
        self.sending: dict[str, int] = {}
        self._completions: GroupCommitter[CompletedAttempt, bool] = GroupCommitter(
            self._flush_completions,
            max_batch=500,
            max_concurrent_flushes=1 if store.dialect == "sqlite" else 2,
        )
        # Attempts sent whose record is being committed: they no longer hold a slot.
        self._recording: set[asyncio.Task[None]] = set()
        # Set on stop: results still waiting for the store to come back stop waiting.
        self._stopping = asyncio.Event()
        # Probes in flight: their destination and when each was admitted. One cut short on
        # stop is given back, or every process held its destination back until the probe
        # timeout (up to 60 s after a deploy).
        self._probes: dict[asyncio.Task[None], tuple[str, int]] = {}
        # A line a minute per destination whose circuit the store could not take: one per
        # result filled the log while the store failed (out of descriptors, pooled
        # connections answer and new ones fail, so sends and results go on).
        self._circuit_lines = LogThrottle()
        self.sent = 0  # attempts made, for reports and tests

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        delivery: LeasedDelivery,
        *,
        foreign: bool = False,
        started_at: int | None = None,
        probe: bool = False,
    ) -> None:
        """Send `delivery` now, in a task of its own (`loop` is the running one: the caller
        looks it up once per batch, as each lookup is a getpid() call). A `foreign` one
        (its destination id names another tenant's destination, destination_tenants) is
        never sent: it is dead-lettered, as to a destination no longer configured.
        `started_at`: when the rate limit counted the send (default: now). A `probe` is the
        one send its half-open circuit admitted."""
        # The attempt starts when the limiter admits it: its `started_at` is then the
        # moment counted in the destination's window, not a later turn of the loop.
        if started_at is None:
            started_at = self.clock.now_ms()
        task = loop.create_task(self._attempt(delivery, started_at, foreign))
        self.in_flight[task] = delivery
        task.add_done_callback(self._finished)
        if probe:
            self._probes[task] = (delivery.destination_id, started_at)
        self.sending[delivery.destination_id] = self.sending.get(delivery.destination_id, 0) + 1

    # -- one attempt ------------------------------------------------------------------------

    async def _attempt(self, delivery: LeasedDelivery, started_at: int, foreign: bool) -> None:
        # Looked up once for the send's deadline, `_answered` and the slot: each lookup is a
        # call in Python and a getpid().
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - `start` runs every attempt in a task of its own
        outcome = _not_its_tenants(delivery) if foreign else await self._send(delivery, task)
        self._answered.add(task)
        self.sent += 1
        if not foreign:  # unsent, it says nothing of the destination (nor is its probe)
            await self._record_circuit(delivery.destination_id, outcome, started_at)
        # `_value_`, not `.value`: enum's `value` is a property, two calls in Python per read.
        series(ATTEMPTS, delivery.destination_id, outcome.kind._value_).inc()
        series(ATTEMPT_SECONDS, delivery.destination_id).observe(outcome.duration_ms / 1000)
        delivery = governed(delivery, self._limits)
        transition = decide(
            attempts_before=delivery.attempts,
            max_attempts=delivery.max_attempts,
            outcome=outcome,
            now_ms=self.clock.now_ms(),
            policy=self._policies.get(delivery.destination_id, DEFAULT_BACKOFF),
            rand=self._rand(),
            retry_after_floor_s=RETRY_AFTER_FLOOR_S,
        )
        self._free_slot(task)
        dead_lettered = await self._record(
            CompletedAttempt(
                delivery=delivery,
                outcome=outcome,
                transition=transition,
                started_at=started_at,
                attempt_id=new_id("att", started_at),
            )
        )
        # Counted once the store moved it: a death decided after the lease was lost (and
        # the delivery rescued) is not applied, and was counted though nothing died.
        if dead_lettered:
            DEAD_LETTERED.labels(delivery.destination_id).inc()

    async def _record(self, completed: CompletedAttempt) -> bool:
        """Commit the attempt; while the store cannot be reached, try again every
        `RECORD_RETRY_S` as long as the lease holds. Dropped, the answer would be lost and
        the delivery sent again once its lease expired, as a `lease_expired` attempt that
        never happened. (A record whose commit landed but whose answer was lost is not
        written twice: the store keeps one row per attempt id, and the lease is no longer
        held for its transition.) Returns whether the store moved the delivery to the
        dead-letter queue."""
        delivery = completed.delivery
        while True:
            try:
                return await self._completions.submit(completed)
            except StoreUnavailable as exc:
                error = str(exc)  # the store's own words, never data (store/base.py)
            if not await self._may_record_again(delivery):
                # The lease expires and the delivery is retried: at-least-once. Why it was
                # not recorded (a full disk, an outage) is the operator's to fix.
                log.warning(
                    "attempt_not_recorded", delivery=delivery.id, worker=self.worker_id, error=error
                )
                return False

    async def _may_record_again(self, delivery: LeasedDelivery) -> bool:
        """Wait `RECORD_RETRY_S`; False if the lease would end first or the worker stops."""
        retry_at = self.clock.now_ms() + int(RECORD_RETRY_S * 1000)
        if self._stopping.is_set() or retry_at >= delivery.lease_expires_at:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), RECORD_RETRY_S)
        return not self._stopping.is_set()

    async def _record_circuit(self, destination_id: str, outcome: Outcome, started_at: int) -> None:
        try:
            await self.breakers.record(
                destination_id, outcome, started_at=started_at, now_ms=self.clock.now_ms()
            )
        except StoreUnavailable:
            self._circuit_not_recorded(destination_id)

    async def _give_back_probe(self, destination_id: str, started_at: int) -> None:
        """A probe cut short unanswered told nothing: the next process may probe at once."""
        try:
            await self.breakers.give_back_probe(destination_id, started_at=started_at)
        except StoreUnavailable:  # forgotten after the probe timeout, as a dead worker's
            self._circuit_not_recorded(destination_id)

    def _circuit_not_recorded(self, destination_id: str) -> None:
        count = self._circuit_lines.due(destination_id)
        if count is not None:
            log.warning("circuit_not_recorded", destination=destination_id, count=count)

    async def _send(self, delivery: LeasedDelivery, task: asyncio.Task[None]) -> Outcome:
        connector = self._connectors.get(delivery.destination_id)
        if connector is None:
            return Outcome(
                OutcomeKind.PERMANENT,
                0.0,
                error_class="unknown_destination",
                response_excerpt=f"no destination {delivery.destination_id!r} is configured",
            )
        ceiling = self._ceilings.get(delivery.destination_id, self._max_attempt_s)
        started = time.perf_counter()
        expiry = Expiry(ceiling, task)
        try:
            return await connector.deliver(delivery)
        except asyncio.CancelledError:
            if not expiry.ended_it():
                raise
            return Outcome(
                OutcomeKind.RETRYABLE,
                (time.perf_counter() - started) * 1000,
                error_class="timeout",
                response_excerpt=no_answer_within(ceiling),  # as the connector's own says
            )
        finally:
            expiry.disarm()

    async def _flush_completions(self, batch: Sequence[CompletedAttempt]) -> list[bool]:
        """Record `batch`; whether each item's delivery was dead-lettered by it."""
        done = await self.store.complete_batch(batch, self.clock.now_ms())
        # The next delivery of a key may be leased once this one left the queue: lease now,
        # not at the next poll. (A retry stays pending, and its successors wait for it.)
        if any(
            c.delivery.ordering_key is not None
            and c.transition.to_state is not DeliveryState.PENDING
            for c in batch
        ):
            self._wake.set()
        if not done.dead:
            return [False] * len(batch)
        return [c.delivery.id in done.dead for c in batch]

    # -- slots ------------------------------------------------------------------------------

    def _free_slot(self, task: asyncio.Task[None]) -> None:
        """The send of `task` is over: its slot may take new work while its record is
        committed (the lease token guards the record, so nothing waits on it but
        bookkeeping)."""
        delivery = self.in_flight.pop(task, None)
        if delivery is not None:
            self._left_flight(delivery)
            self._recording.add(task)
            self._slot_freed.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        delivery = self.in_flight.pop(task, None)
        if delivery is not None:
            self._left_flight(delivery)
        self._answered.discard(task)
        self._recording.discard(task)
        if self._probes:
            self._probes.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("attempt_crashed", exc_info=task.exception())

    def _left_flight(self, delivery: LeasedDelivery) -> None:
        """A send left `in_flight`: a capped destination that was at its cap has room."""
        sending = self.sending[delivery.destination_id]
        self.sending[delivery.destination_id] = sending - 1
        cap = self._caps.get(delivery.destination_id)
        if cap is not None and sending >= cap:
            self._cap_freed.set()

    # -- stopping ---------------------------------------------------------------------------

    async def stop(self, grace_s: float) -> list[LeasedDelivery]:
        """Let the sends finish for `grace_s`, record what was answered, and return the
        deliveries of the sends cut short before an answer: unsent, to be given back."""
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=grace_s)
        # Sends still waiting for an answer are cut short and given back unsent. One already
        # answered must keep its outcome (given back, it would be sent again): it records it.
        unfinished = {t: d for t, d in self.in_flight.items() if t not in self._answered}
        cut_probes = [self._probes[t] for t in unfinished if t in self._probes]
        await _cancel(unfinished)
        for destination_id, started_at in cut_probes:
            await self._give_back_probe(destination_id, started_at)
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=RESULT_GRACE_S)
            await _cancel(list(self.in_flight))  # not recorded: their leases expire
        self._stopping.set()
        await self._completions.close()
        if self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)
        return list(unfinished.values())


def _not_its_tenants(delivery: LeasedDelivery) -> Outcome:
    """The outcome of a delivery whose destination id now names another tenant's
    destination: to that tenant's endpoint it never goes."""
    return Outcome(
        OutcomeKind.PERMANENT,
        0.0,
        error_class="unknown_destination",
        response_excerpt=f"no destination {delivery.destination_id!r} is configured"
        f" for tenant {delivery.tenant_id!r}",
    )


async def _cancel(tasks: Collection[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)

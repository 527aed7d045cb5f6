"""The delivery worker: lease due deliveries, send them, record what happened.

One worker runs one loop and at most `worker.concurrency` sends at a time:

    lease a batch ─► one task per delivery: connector.deliver ─► decide ─► complete (batched)
       ▲                                                                        │
       └─ woken by new deliveries, a freed slot, a key's next one, or the poll ◄┘

Leases carry a deadline longer than any send may take; a worker that dies loses its leases
and any other worker rescues them once the deadline passes (counted as a failed attempt, so
a delivery that kills its worker cannot loop forever). On stop, the worker leases nothing
more, lets in-flight sends finish for `shutdown_grace_s`, and gives back those still waiting
for an answer (a send already answered records its result instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Collection, Iterator, Sequence

import structlog

from estafeta.clock import Clock, SystemClock
from estafeta.config import Config
from estafeta.config.models import DEFAULT_TIMEOUTS_S
from estafeta.connectors.registry import Connectors
from estafeta.delivery.backoff import DEFAULT_BACKOFF, BackoffPolicy
from estafeta.delivery.breakers import Breakers, circuit_state_store
from estafeta.delivery.decision import decide
from estafeta.delivery.expiry import Expiry
from estafeta.delivery.handoff import Handoff, Reservation, reserve
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.delivery.state import DeliveryState
from estafeta.delivery.throttle import DestinationThrottle
from estafeta.errors import StoreUnavailable
from estafeta.ids import new_id
from estafeta.messaging.facts import send_destination
from estafeta.messaging.outbound import can_send
from estafeta.observability.metrics import ATTEMPT_SECONDS, ATTEMPTS, DEAD_LETTERED, series
from estafeta.store.group_commit import GroupCommitter
from estafeta.store.records import CompletedAttempt, DirectLease, NewEvent
from estafeta.store.sqlstore import SqlStore

log = structlog.get_logger("estafeta.worker")

CEILING_MARGIN_S = 1.0  # the per-attempt ceiling over a destination's own timeout
RETRY_AFTER_FLOOR_S = 1.0  # the least wait after a timeout or a 429
# On stop, how long a send already answered may take to record its result; past it, its
# lease expires as if the worker had died (at-least-once), but it is never given back unsent.
RESULT_GRACE_S = 5.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random.randrange(16**4):04x}"  # noqa: S311


class Worker:
    def __init__(
        self,
        store: SqlStore,
        config: Config,
        *,
        clock: Clock | None = None,
        worker_id: str | None = None,
        wake: asyncio.Event | None = None,
        rand: Callable[[], float] = random.random,
        breakers: Breakers | None = None,
        throttle: DestinationThrottle | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.worker_id = worker_id or default_worker_id()
        self.settings = config.worker
        self._wake = wake or asyncio.Event()
        self._rand = rand
        self._connectors = Connectors(config)
        self.breakers = breakers or Breakers(circuit_state_store(config, store), config)
        senders = [s for s in config.sources if can_send(s)]
        rate_limits = {d.id: d.rate_limit for d in config.destinations if d.rate_limit}
        rate_limits.update(
            {send_destination(s.id): s.send_rate_limit for s in senders if s.send_rate_limit}
        )
        self.throttle = throttle or DestinationThrottle(rate_limits, redis_url=config.redis.url)
        self._throttled_until: dict[str, int] = {}  # destination → Unix ms its budget refills
        # Leases to give back unsent (rate limit spent, circuit not closed), by when each is
        # due; kept until the store takes them: left to expire, they would cost an attempt.
        self._snoozed: dict[int, list[LeasedDelivery]] = {}
        self._store_down = False  # logged once per outage
        self._policies = {
            d.id: BackoffPolicy(
                base_s=d.backoff.base_s,
                factor=d.backoff.factor,
                max_s=d.backoff.max_s,
                jitter=d.backoff.jitter,
            )
            for d in config.destinations
        }
        ceiling = self.settings.max_attempt_s
        self._ceilings = {
            d.id: d.effective_timeout_s(ceiling) + CEILING_MARGIN_S for d in config.destinations
        }
        send_timeout_s = min(DEFAULT_TIMEOUTS_S["whatsapp_send"], ceiling)
        self._ceilings.update(
            {send_destination(s.id): send_timeout_s + CEILING_MARGIN_S for s in senders}
        )
        # The lease must outlive the slowest possible send, or a live send would be rescued.
        longest = max(self._ceilings.values(), default=0.0)
        self.lease_ms = int(max(self.settings.lease_s, longest + CEILING_MARGIN_S) * 1000)
        self._in_flight: dict[asyncio.Task[None], LeasedDelivery] = {}
        # Sends in `_in_flight` whose destination has answered (or timed out): on stop they
        # record their outcome; only the others may be given back as unsent.
        self._answered: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        # Every destination a lease may name: the configured ones and the providers' sends.
        self._destinations = [d.id for d in config.destinations]
        self._destinations += [send_destination(s.id) for s in senders]
        # Destinations of pending deliveries that the configuration no longer has, found
        # every rescue interval and leased with the rest, to be dead-lettered with the reason.
        self._orphans: set[str] = set()
        # Sends in flight per destination: the lease gives free slots to the destinations
        # with the fewest first, so a slow destination's backlog cannot take every slot.
        self._sending: dict[str, int] = {}
        # A destination with a `max_in_flight` is never given more room than its cap leaves.
        self._caps = {d.id: d.max_in_flight for d in config.destinations if d.max_in_flight}
        self._cap_freed = asyncio.Event()  # a capped destination at its cap freed a slot
        self._completions: GroupCommitter[CompletedAttempt, int] = GroupCommitter(
            self._flush_completions,
            max_batch=500,
            max_concurrent_flushes=1 if store.dialect == "sqlite" else 2,
        )
        # Attempts sent whose record is being committed: they no longer hold a slot.
        self._recording: set[asyncio.Task[None]] = set()
        self._next_rescue = 0.0
        self.sent = 0  # attempts made by this worker, for reports and tests
        # Fresh deliveries straight from ingest in this process (delivery/handoff.py).
        self._handoff = handoff
        self._handed: list[LeasedDelivery] = []  # committed, handed over, not started yet
        self._handed_ready = asyncio.Event()
        # Slots held for deliveries not in flight yet: an ingest batch whose commit is under
        # way, a lease statement under way, handed deliveries being started (the rate
        # limiter awaits). Nothing else may take them meanwhile.
        self._held = 0
        self._backlogged = True  # the last lease filled its batch: more may be waiting
        # When to lease (and refresh circuits, and rescue) again even if nothing wakes the
        # loop but hand-overs: retries come due in the store without anyone saying so.
        self._next_poll = 0.0
        self.leases = 0  # lease statements run, for tests

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, then shut down gracefully."""
        await self._connectors.start()
        log.info("worker_started", worker=self.worker_id, concurrency=self.settings.concurrency)
        if self._handoff is not None:
            self._handoff.attach(self)
        try:
            lease = True
            while not stop.is_set():
                await self._start_handed()
                leased = await self._step() if lease else 0
                if not leased:
                    lease = await self._idle(stop)
        finally:
            await self._shutdown()

    async def _step(self) -> int:
        """Rescue if due, probe open circuits, then lease as many as there are free slots;
        returns how many deliveries were taken (sent or snoozed)."""
        self._next_poll = time.monotonic() + self.settings.poll_interval_s
        # Cleared before the rooms are counted, not when idling after the lease: a send that
        # ends while the lease statement runs then wakes the loop for the room it left.
        self._slot_freed.clear()
        self._cap_freed.clear()
        try:
            await self._release_snoozed()
            await self._rescue_if_due()
            room = min(self.settings.batch_size, self._free_slots())
            if room <= 0:
                return 0
            with self._claim(room):  # given back once what was leased is in flight
                taken = await self._lease_and_start(room)
        except StoreUnavailable as exc:
            self._store_unavailable(exc)
            return 0
        if self._store_down:
            self._store_down = False
            log.info("store_available", worker=self.worker_id)
        return taken

    async def _lease_and_start(self, room: int) -> int:
        """Probe the circuits ready for it, then lease up to `room` in all and start what
        the rate limits allow; returns how many deliveries were taken (sent or snoozed)."""
        self._wake.clear()
        now = self.clock.now_ms()
        await self.breakers.refresh()
        taken = 0
        throttled = self._throttled(now)
        for destination_id in self.breakers.probe_ready(now):
            if destination_id in throttled:
                continue  # no budget for the probe now: claiming it would only block
            if taken < room and await self.breakers.try_probe(destination_id, now):
                probe = await self._lease(now, {destination_id: 1})
                if not probe or not await self._start(probe, now, probe=True):
                    # Nothing to send, or the rate limit held it back: another worker
                    # (or this one, later) may probe as soon as it can.
                    await self.breakers.give_back_probe(destination_id)
                taken += len(probe)
        blocked = self.breakers.not_closed() | self._throttled(now)
        limit = room - taken
        batch = await self._lease(now, self._rooms(limit, blocked), limit)
        self._backlogged = len(batch) >= limit
        await self._start(batch, now)
        taken += len(batch)
        return taken

    @contextlib.contextmanager
    def _claim(self, slots: int) -> Iterator[None]:
        self._held += slots
        try:
            yield
        finally:
            self._held -= slots

    def _rooms(self, limit: int, blocked: set[str]) -> dict[str, int]:
        """What each destination not `blocked` may take in a lease of `limit`: all of it,
        or less for one whose `max_in_flight` leaves less room."""
        rooms = {d: limit for d in self._destinations if d not in blocked}
        for destination_id, cap in self._caps.items():
            if destination_id in rooms:
                rooms[destination_id] = min(limit, cap - self._sending.get(destination_id, 0))
        rooms.update({d: limit for d in self._orphans})
        return rooms

    async def _lease(
        self, now: int, rooms: dict[str, int], limit: int | None = None
    ) -> list[LeasedDelivery]:
        """Due deliveries of the destinations named, up to each one's room and `limit` in
        all, fairly: the destinations with the fewest sends in flight first."""
        if not any(room > 0 for room in rooms.values()):
            return []
        self.leases += 1
        return await self.store.lease(
            now_ms=now,
            rooms=rooms,
            limit=limit,
            lease_ms=self.lease_ms,
            worker_id=self.worker_id,
            sending=self._sending,
        )

    def _free_slots(self) -> int:
        taken = len(self._in_flight) + len(self._handed) + self._held
        return self.settings.concurrency - taken

    # -- fresh deliveries from ingest in this process (delivery/handoff.py) ----------------

    def reserve(self, events: Sequence[NewEvent]) -> Reservation | None:
        """Keep free slots for the batch ingest is about to commit, if nothing older waits."""
        if self._backlogged or not self._taking():
            return None
        free = self._free_slots()
        if free <= 0:
            return None
        now = self.clock.now_ms()
        reservation = reserve(
            events,
            taker=self,
            free=free,
            blocked=self.breakers.not_closed() | self._throttled(now) | self._caps.keys(),
            lease=DirectLease(secrets.token_hex(8), now + self.lease_ms, self.worker_id),
        )
        if reservation is not None:
            self._held += reservation.count
        return reservation

    def take(self, reservation: Reservation, deliveries: list[LeasedDelivery]) -> bool:
        """The batch is committed: send its deliveries (False once stopping: not taken)."""
        self._held -= reservation.count
        if not self._taking():
            return False
        self._handed.extend(deliveries)
        self._handed_ready.set()
        return True

    def cancel(self, reservation: Reservation) -> None:
        self._held -= reservation.count
        self._slot_freed.set()  # a loop waiting for a slot may lease again

    def _taking(self) -> bool:
        """Whether ingest may hand deliveries over: from start until shutdown begins."""
        return self._handoff is not None and self._handoff.attached(self)

    async def _start_handed(self) -> None:
        if self._handed:
            handed, self._handed = self._handed, []
            try:
                with self._claim(len(handed)):  # out of `_handed`, not yet in flight
                    await self._start(handed, self.clock.now_ms())
            except StoreUnavailable as exc:  # a snooze not recorded: tried again next step
                self._store_unavailable(exc)

    def _store_unavailable(self, exc: StoreUnavailable) -> None:
        if not self._store_down:  # once per outage, not once per poll
            self._store_down = True
            log.warning("store_unavailable", worker=self.worker_id, error=str(exc))

    def _throttled(self, now: int) -> set[str]:
        return {d for d, until in self._throttled_until.items() if until > now}

    async def _start(self, batch: list[LeasedDelivery], now: int, *, probe: bool = False) -> int:
        """Send each leased delivery its destination's rate limit allows now; snooze the
        others until their budget refills (no attempt counted). Returns how many were sent.

        A circuit may have opened since the batch was leased or handed over (the commit or
        the lease statement takes milliseconds, and failing sends record meanwhile): its
        deliveries go back pending, due now, and the lease holds them back until the circuit
        lets a probe through. A `probe` is the one delivery its half-open circuit admitted."""
        snoozed: dict[int, list[LeasedDelivery]] = {}
        held: set[str] = set() if probe else self.breakers.not_closed()
        loop = asyncio.get_running_loop()  # once per batch: each lookup is a getpid() call
        for delivery in batch:
            if delivery.destination_id in held:
                snoozed.setdefault(now, []).append(delivery)
                continue
            wait_s = await self.throttle.acquire(delivery.destination_id)
            if wait_s is not None:
                due = now + max(1, round(wait_s * 1000))
                self._throttled_until[delivery.destination_id] = due
                snoozed.setdefault(due, []).append(delivery)
                continue
            # The attempt starts when the limiter admits it: its `started_at` is then the
            # moment counted in the destination's window, not a later turn of the loop.
            task = loop.create_task(self._attempt(delivery, self.clock.now_ms()))
            self._in_flight[task] = delivery
            task.add_done_callback(self._finished)
            self._sending[delivery.destination_id] = (
                self._sending.get(delivery.destination_id, 0) + 1
            )
        for due, deliveries in snoozed.items():
            self._snoozed.setdefault(due, []).extend(deliveries)
        await self._release_snoozed()
        return len(batch) - sum(len(deliveries) for deliveries in snoozed.values())

    async def _release_snoozed(self) -> None:
        """Give the snoozed leases back, pending until they are due; what the store does not
        take now (StoreUnavailable) is tried again at the next step."""
        while self._snoozed:
            due, deliveries = next(iter(self._snoozed.items()))
            await self.store.release(deliveries, self.clock.now_ms(), due_at=due)
            del self._snoozed[due]

    def _free_slot(self) -> None:
        """The send is over: its slot may take new work while its record is committed
        (the lease token guards the record, so nothing waits on it but bookkeeping)."""
        task = asyncio.current_task()
        if task is None:
            return
        delivery = self._in_flight.pop(task, None)
        if delivery is not None:
            self._left_flight(delivery)
            self._recording.add(task)
            self._slot_freed.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        delivery = self._in_flight.pop(task, None)
        if delivery is not None:
            self._left_flight(delivery)
        self._answered.discard(task)
        self._recording.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("attempt_crashed", exc_info=task.exception())

    def _left_flight(self, delivery: LeasedDelivery) -> None:
        """A send left `_in_flight`: a capped destination that was at its cap has room."""
        sending = self._sending[delivery.destination_id]
        self._sending[delivery.destination_id] = sending - 1
        cap = self._caps.get(delivery.destination_id)
        if cap is not None and sending >= cap:
            self._cap_freed.set()

    async def _idle(self, stop: asyncio.Event) -> bool:
        """Wait for new work, a free slot (when full), stop, or the poll interval; returns
        whether to lease next (False when only deliveries were handed over before the poll
        interval was up: nothing new waits in the store for them)."""
        self._handed_ready.clear()
        wait_s = self._next_poll - time.monotonic()
        if wait_s <= 0:
            return True
        if self._handed:
            return False
        stopped = asyncio.ensure_future(stop.wait())
        handed = asyncio.ensure_future(self._handed_ready.wait())
        if self._free_slots() <= 0:
            other = asyncio.ensure_future(self._slot_freed.wait())
        else:
            other = asyncio.ensure_future(self._wake.wait())
        waiters = [stopped, handed, other]
        if self._caps:
            waiters.append(asyncio.ensure_future(self._cap_freed.wait()))
        try:
            done, _ = await asyncio.wait(
                waiters,
                timeout=wait_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        return bool(done - {handed}) or time.monotonic() >= self._next_poll

    # -- one attempt ------------------------------------------------------------------------

    async def _attempt(self, delivery: LeasedDelivery, started_at: int) -> None:
        outcome = await self._send(delivery)
        task = asyncio.current_task()
        if task is not None:
            self._answered.add(task)
        self.sent += 1
        await self._record_circuit(delivery.destination_id, outcome, started_at)
        series(ATTEMPTS, delivery.destination_id, outcome.kind.value).inc()
        series(ATTEMPT_SECONDS, delivery.destination_id).observe(outcome.duration_ms / 1000)
        transition = decide(
            attempts_before=delivery.attempts,
            max_attempts=delivery.max_attempts,
            outcome=outcome,
            now_ms=self.clock.now_ms(),
            policy=self._policies.get(delivery.destination_id, DEFAULT_BACKOFF),
            rand=self._rand(),
            retry_after_floor_s=RETRY_AFTER_FLOOR_S,
        )
        if transition.to_state is DeliveryState.DEAD:
            DEAD_LETTERED.labels(delivery.destination_id).inc()
        self._free_slot()
        try:
            await self._completions.submit(
                CompletedAttempt(
                    delivery=delivery,
                    outcome=outcome,
                    transition=transition,
                    started_at=started_at,
                    attempt_id=new_id("att", started_at),
                )
            )
        except StoreUnavailable:
            # The lease expires and the delivery is retried: at-least-once, nothing lost.
            log.warning("attempt_not_recorded", delivery=delivery.id, worker=self.worker_id)

    async def _record_circuit(self, destination_id: str, outcome: Outcome, started_at: int) -> None:
        try:
            await self.breakers.record(
                destination_id, outcome, started_at=started_at, now_ms=self.clock.now_ms()
            )
        except StoreUnavailable:
            log.warning("circuit_not_recorded", destination=destination_id)

    async def _send(self, delivery: LeasedDelivery) -> Outcome:
        connector = self._connectors.get(delivery.destination_id)
        if connector is None:
            return Outcome(
                OutcomeKind.PERMANENT,
                0.0,
                error_class="unknown_destination",
                response_excerpt=f"no destination {delivery.destination_id!r} is configured",
            )
        ceiling = self._ceilings.get(delivery.destination_id, self.settings.max_attempt_s)
        started = time.perf_counter()
        expiry = Expiry(ceiling)
        try:
            return await connector.deliver(delivery)
        except asyncio.CancelledError:
            if not expiry.ended_it():
                raise
            return Outcome(
                OutcomeKind.RETRYABLE,
                (time.perf_counter() - started) * 1000,
                error_class="timeout",
            )
        finally:
            expiry.disarm()

    async def _flush_completions(self, batch: Sequence[CompletedAttempt]) -> list[int]:
        await self.store.complete(batch, self.clock.now_ms())
        # The next delivery of a key may be leased once this one left the queue: lease now,
        # not at the next poll. (A retry stays pending, and its successors wait for it.)
        if any(
            c.delivery.ordering_key is not None
            and c.transition.to_state is not DeliveryState.PENDING
            for c in batch
        ):
            self._wake.set()
        return [1] * len(batch)

    # -- leases of workers that died --------------------------------------------------------

    async def _rescue_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_rescue:
            return
        self._next_rescue = now + self.settings.rescue_interval_s
        await self.rescue_expired()
        orphans = await self.store.pending_destinations() - set(self._destinations)
        if orphans - self._orphans:
            log.warning("unknown_destinations", destinations=sorted(orphans))
        self._orphans = orphans

    async def rescue_expired(self) -> int:
        """Take over deliveries whose worker died mid-send and schedule their retry."""
        now_ms = self.clock.now_ms()
        claimed = await self.store.claim_expired(
            now_ms=now_ms, lease_ms=self.lease_ms, worker_id=self.worker_id
        )
        if not claimed:
            return 0
        lost = Outcome(
            OutcomeKind.RETRYABLE,
            0.0,
            error_class="lease_expired",
            response_excerpt="the worker sending it stopped before recording a result",
        )
        batch = [
            CompletedAttempt(
                delivery=d,
                outcome=lost,
                transition=decide(
                    attempts_before=d.attempts,
                    max_attempts=d.max_attempts,
                    outcome=lost,
                    now_ms=now_ms,
                    policy=self._policies.get(d.destination_id, DEFAULT_BACKOFF),
                    rand=self._rand(),
                ),
                started_at=now_ms,
                attempt_id=new_id("att", now_ms),
            )
            for d in claimed
        ]
        await self.store.complete(batch, now_ms)
        log.warning("leases_rescued", count=len(batch), worker=self.worker_id)
        return len(batch)

    # -- stopping ---------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._handoff is not None:
            self._handoff.detach(self)
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=self.settings.shutdown_grace_s)
        # Sends still waiting for an answer are cut short and given back unsent. One already
        # answered must keep its outcome (given back, it would be sent again): it records it.
        unfinished = {t: d for t, d in self._in_flight.items() if t not in self._answered}
        await self._cancel(unfinished)
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=RESULT_GRACE_S)
            await self._cancel(list(self._in_flight))  # not recorded: their leases expire
        await self._completions.close()
        if self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)
        unsent = [*unfinished.values(), *self._handed]
        self._handed = []
        if unsent:
            try:
                released = await self.store.release(unsent, self.clock.now_ms())
                log.info("leases_released", count=released, worker=self.worker_id)
            except StoreUnavailable:
                log.warning("leases_not_released", count=len(unsent))
        try:
            await self._release_snoozed()
        except StoreUnavailable:
            log.warning("leases_not_released", count=sum(map(len, self._snoozed.values())))
        await self._connectors.close()
        await self.throttle.aclose()
        log.info("worker_stopped", worker=self.worker_id, attempts=self.sent)

    @staticmethod
    async def _cancel(tasks: Collection[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

"""The delivery worker: lease due deliveries, send them, record what happened.

One worker runs one loop and at most `worker.concurrency` sends at a time:

    lease a batch ─► one task per delivery: connector.deliver ─► decide ─► complete (batched)
       ▲                                                                        │
       └─ woken by new deliveries, a freed slot, a key's next one, or the poll ◄┘

Leases carry a deadline longer than any send may take; a worker that dies loses its leases
and any other worker rescues them once the deadline passes (counted as a failed attempt, so
a delivery that kills its worker cannot loop forever). On stop, the worker leases nothing
more (and starts no more of a batch being started: given back unsent), lets in-flight sends
finish for `shutdown_grace_s`, and gives back those still waiting for an answer (a send
already answered records its result instead).

This module is the loop and its slot accounting: what to lease, for which destinations and
how many, and when. The rest is composed from the modules beside it:

* attempts.py: the sends in flight, each from its send to its record (the hot path), and
  the end of them on stop;
* snooze.py: leases given back unsent (rate limit spent, circuit opened), and when each
  destination's rate limit refills;
* rescue.py: expired leases of workers that died, and destinations no longer configured;
* breakers.py and throttle.py: the circuits and rate limits the lease obeys;
* handoff.py: fresh deliveries ingest in this process hands over (`reserve`, `take`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import structlog
from redis.asyncio import Redis

from estafeta.clock import Clock, SystemClock
from estafeta.config import Config
from estafeta.connectors.registry import Connectors
from estafeta.delivery.attempts import (
    CEILING_MARGIN_S,
    Attempts,
    attempt_ceilings,
    attempt_limits,
    destination_tenants,
)
from estafeta.delivery.backoff import BackoffPolicy
from estafeta.delivery.breakers import Breakers, circuit_state_store
from estafeta.delivery.circuit_store import CircuitStateStore, close_circuits
from estafeta.delivery.handoff import Handoff, Reservation, reserve
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.presence import named_destinations
from estafeta.delivery.rescue import Rescue
from estafeta.delivery.snooze import Snoozes
from estafeta.delivery.throttle import DestinationThrottle
from estafeta.errors import LeaseRaced, StoreUnavailable
from estafeta.messaging.facts import send_destination
from estafeta.messaging.outbound import can_send
from estafeta.observability.log_throttle import LogThrottle
from estafeta.observability.metrics import LEASE_RACES
from estafeta.redis_client import connect_redis
from estafeta.store.records import DirectLease, NewEvent
from estafeta.store.sqlstore import SqlStore

log = structlog.get_logger("estafeta.worker")


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
        started_ms: int | None = None,
    ) -> None:
        """`started_ms`: when the process started (its presence's start, delivery/presence.py);
        by default, now."""
        self.store = store
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.worker_id = worker_id or default_worker_id()
        self.settings = config.worker
        self._wake = wake or asyncio.Event()
        self._connectors = Connectors(config)
        # The Redis client of circuits this worker opens itself (`estafeta worker`), closed
        # at shutdown; given breakers (`serve`: the hub's) are their owner's to close.
        self._own_redis: Redis | None = None
        self._own_circuits: CircuitStateStore | None = None
        if breakers is None:
            if config.redis.url:
                self._own_redis = connect_redis(config.redis.url)
            self._own_circuits = circuit_state_store(config, store, self._own_redis)
            breakers = Breakers(self._own_circuits, config)
        self.breakers = breakers
        senders = [s for s in config.sources if can_send(s)]
        rate_limits = {d.id: d.rate_limit for d in config.destinations if d.rate_limit}
        rate_limits.update(
            {send_destination(s.id): s.send_rate_limit for s in senders if s.send_rate_limit}
        )
        self.throttle = throttle or DestinationThrottle(
            rate_limits, redis_url=config.redis.url, key_prefix=config.redis.key_prefix
        )
        self._snoozes = Snoozes(store, self.clock)  # leases given back unsent (snooze.py)
        self._store_down = False  # since the last step that failed for it
        # `store_unavailable` and `store_available`: once per outage, a store that fails
        # every other step (out of descriptors, pooled connections answer and new ones
        # fail) logged a pair at each; now at most a pair a minute (log_throttle.py).
        self._store_lines = LogThrottle()
        self._down_logged = False  # this outage's `store_unavailable` was logged
        policies = {
            d.id: BackoffPolicy(
                base_s=d.backoff.base_s,
                factor=d.backoff.factor,
                max_s=d.backoff.max_s,
                jitter=d.backoff.jitter,
            )
            for d in config.destinations
        }
        # The attempts each destination allows, this configuration's: not those a delivery
        # was stored with (attempts.py: governed).
        limits = attempt_limits(config)
        ceilings = attempt_ceilings(config, senders)
        # The lease must outlive the slowest possible send, or a live send would be rescued.
        longest = max(ceilings.values(), default=0.0)
        self.lease_ms = int(max(self.settings.lease_s, longest + CEILING_MARGIN_S) * 1000)
        # What of its lease a send needs left when it starts (`_start_in_turn`).
        self._ceilings_ms = {d: int(ceiling * 1000) for d, ceiling in ceilings.items()}
        self._slot_freed = asyncio.Event()
        # Slots kept for destinations with nothing in flight: without them a slow
        # destination's backlog held every slot, and another tenant's fresh delivery waited
        # for its answers (up to its timeout_s), round after round, until the backlog was sent.
        self._spare = self.settings.concurrency // 10
        # Every destination a lease may name: the configured ones and the providers' sends.
        self._destinations = named_destinations(config)
        self._named = frozenset(self._destinations)
        # A destination with a `max_in_flight` is never given more room than its cap leaves.
        self._caps = {d.id: d.max_in_flight for d in config.destinations if d.max_in_flight}
        # The tenant of each destination a lease may name: a delivery of another tenant is
        # never sent (attempts.py), nor does it spend the destination's rate limit.
        self._owners = destination_tenants(config)
        self._cap_freed = asyncio.Event()  # a capped destination at its cap freed a slot
        self._attempts = Attempts(  # the sends in flight, and their records (attempts.py)
            store,
            connectors=self._connectors,
            breakers=self.breakers,
            clock=self.clock,
            rand=rand,
            policies=policies,
            limits=limits,
            ceilings=ceilings,
            max_attempt_s=self.settings.max_attempt_s,
            caps=self._caps,
            slot_freed=self._slot_freed,
            cap_freed=self._cap_freed,
            wake=self._wake,
            worker_id=self.worker_id,
        )
        self._rescue = Rescue(  # expired leases and unknown destinations (rescue.py)
            store,
            clock=self.clock,
            rand=rand,
            policies=policies,
            limits=limits,
            lease_ms=self.lease_ms,
            worker_id=self.worker_id,
            destinations=self._destinations,
            interval_s=self.settings.rescue_interval_s,
            started_ms=self.clock.now_ms() if started_ms is None else started_ms,
            breakers=self.breakers,
        )
        # Fresh deliveries straight from ingest in this process (delivery/handoff.py).
        self._handoff = handoff
        self._handed: list[LeasedDelivery] = []  # committed, handed over, not started yet
        self._handed_ready = asyncio.Event()
        # Slots held for deliveries not in flight yet: an ingest batch whose commit is under
        # way, a lease statement under way, handed deliveries being started (the rate
        # limiter awaits). Nothing else may take them meanwhile.
        self._held = 0
        self._backlogged = True  # the last lease filled its batch: more may be waiting
        # Destinations the last lease left out (circuit not closed, rate limit spent) or
        # whose deliveries were given back unsent since: it says nothing of what they have
        # waiting, so none is handed fresh deliveries ahead of those until a lease names it.
        self._left_out: set[str] = set()
        # Destinations whose rate limit capped the last lease (`_budgets`), or caps the one
        # under way: what they have waiting is not known either.
        self._capped: set[str] = set()
        # Probes claimed, not sent, whose give-back met a store outage: destination → when
        # claimed. Made at the next poll the store answers, or the circuit stayed half-open,
        # every worker holding the destination back, until the probe timeout (up to 60 s).
        self._probes_owed: dict[str, int] = {}
        # When to lease (and refresh circuits, and rescue) again even if nothing wakes the
        # loop but hand-overs: retries come due in the store without anyone saying so.
        self._next_poll = 0.0
        # `run`'s: set on stop, when a batch being started starts no more of its sends.
        self._stop: asyncio.Event | None = None
        self.leases = 0  # lease statements run, for tests

    @property
    def sent(self) -> int:
        """Attempts made by this worker, for reports and tests."""
        return self._attempts.sent

    async def rescue_expired(self) -> int:
        """Take over deliveries whose worker died mid-send and schedule their retry."""
        return await self._rescue.expired()

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, then shut down gracefully."""
        self._stop = stop
        await self._connectors.start()
        log.info(
            "worker_started",
            worker=self.worker_id,
            concurrency=self.settings.concurrency,
            engine=self.store.dialect,  # so an operator can tell a worker on the wrong store
        )
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
            await self._snoozes.release()
            while self._probes_owed:
                destination_id, claimed_at = next(iter(self._probes_owed.items()))
                await self._give_back_probe(destination_id, claimed_at)
            await self._rescue.if_due()
            free = self._free_slots()
            room = min(self.settings.batch_size, free)
            if room <= 0:
                return 0
            with self._claim(room):  # given back once what was leased is in flight
                taken = await self._lease_and_start(room, unreserved=free - self._spare)
        except StoreUnavailable as exc:
            self._store_unavailable(exc)
            return 0
        if self._store_down:
            self._store_down = False
            if self._down_logged:
                self._down_logged = False
                log.info("store_available", worker=self.worker_id)
        return taken

    async def _give_back_probe(self, destination_id: str, claimed_at: int) -> None:
        """Give back the probe claimed at `claimed_at`, unsent; owed until the store takes it
        (a later probe, claimed once this one timed out, is not given back by it)."""
        self._probes_owed[destination_id] = claimed_at
        await self.breakers.give_back_probe(destination_id, started_at=claimed_at)
        del self._probes_owed[destination_id]

    async def _lease_and_start(self, room: int, *, unreserved: int) -> int:
        """Probe the circuits ready for it, then lease up to `room` in all and start what
        the rate limits allow; returns how many deliveries were taken (sent or snoozed).
        `unreserved`: how many of the free slots are not the spare ones (`_spare`)."""
        self._wake.clear()
        now = self.clock.now_ms()
        await self.breakers.refresh()
        taken = 0
        throttled = self._snoozes.throttled(now)
        sending = self._attempts.sending
        for destination_id in self.breakers.probe_ready(now):
            if destination_id not in self._named:
                # A circuit of a destination this configuration lacks (shared state names
                # every process's): its deliveries are another process's to send, or an
                # orphan's, leased with the rest; probed here, one would be dead-lettered.
                continue
            if destination_id in throttled or await self.throttle.room(destination_id) == 0:
                continue  # no budget for the probe now: claiming it would only block
            cap = self._caps.get(destination_id)
            if cap is not None and sending.get(destination_id, 0) >= cap:
                continue  # at its max_in_flight: the probe waits for a send to end
            if taken >= room:
                continue
            # The delivery first, then the probe: claimed with nothing to send, it was given
            # back at once, and every poll logged a probe that never went out.
            probe = await self._lease(now, {destination_id: 1})
            # Another tenant's delivery to a reused id is dead-lettered unsent (`_start`): it
            # tells nothing of the destination, so it is not the probe. Taken as one, it was
            # given back, and the destination's own deliveries waited a poll for each.
            while probe and self._owners.get(destination_id) != probe[0].tenant_id:
                taken += await self._start(probe, now)
                probe = await self._lease(now, {destination_id: 1}) if taken < room else []
            if not probe:
                continue
            taken += len(probe)
            try:
                claimed = await self.breakers.try_probe(destination_id, now)
            except StoreUnavailable:
                # Leased, unsent: given back once the store answers. Dropped, it waited in
                # flight for its lease to expire and was rescued as an attempt never made.
                self._give_back(probe)
                raise
            if not claimed:
                self._give_back(probe)  # another worker holds the probe: no attempt counted
            elif not await self._start(probe, now, probe=True):
                # The rate limit held it back: another worker (or this one, later) may probe
                # as soon as it can.
                await self._give_back_probe(destination_id, now)
        blocked = self.breakers.not_closed() | self._snoozes.throttled(now)
        limit = room - taken
        unreserved -= taken
        if unreserved > 0:
            limit = min(limit, unreserved)  # the spare slots stay free for now
            rooms = self._rooms(limit, blocked)
        else:
            # Only the spare slots are free: one each for destinations with nothing in
            # flight. Those sending are left out, so their fresh deliveries are not handed
            # over ahead of what they have waiting.
            blocked |= {d for d, n in self._attempts.sending.items() if n > 0}
            rooms = {d: min(1, r) for d, r in self._rooms(limit, blocked).items()}
        budgets = await self._budgets(rooms)
        rooms.update(budgets)
        # Before the lease: what is given back meanwhile stays. A destination whose budget
        # takes no send now is left out like a spent one.
        self._left_out = blocked | {d for d, budget in budgets.items() if budget <= 0}
        # One whose budget caps its lease may have more waiting: fresh deliveries to it are
        # not handed over ahead of those (the budget may refill before they start), from
        # now, while the lease statement runs, until a lease its budget did not fill.
        self._capped = set(budgets)
        batch = await self._lease(now, rooms, limit)
        self._backlogged = len(batch) >= limit
        leased = Counter(d.destination_id for d in batch)
        self._capped = {d for d, budget in budgets.items() if leased[d] >= budget}
        if self._rescue.orphans:  # only then may the batch hold deliveries it cannot send
            batch = await self._give_back_named(batch, now)
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
        sending = self._attempts.sending
        for destination_id, cap in self._caps.items():
            if destination_id in rooms:
                rooms[destination_id] = min(limit, cap - sending.get(destination_id, 0))
        rooms.update({d: limit for d in self._rescue.orphans})
        return rooms

    async def _budgets(self, rooms: dict[str, int]) -> dict[str, int]:
        """The destinations of `rooms` whose rate limit takes fewer sends now than their room,
        each with how many it takes: a lease beyond it only gave the rest back, a write for
        each lease and one for each give-back, the whole batch again at every refill."""
        limited = self.throttle.limited
        asked = [d for d, room in rooms.items() if room > 0 and d in limited]
        if len(asked) > 1 and self.throttle.using_redis:
            # One store read instead of a Redis round trip for each: a destination with
            # nothing waiting takes nothing of its room. Hundreds of rate-limited tenants'
            # destinations, all asked, cost an idle worker about 20 ms at every poll.
            waiting = await self.store.pending_destinations()
            asked = [d for d in asked if d in waiting]
        # All at once: with a shared limit each is a Redis round trip, and the lease waits.
        answers = await asyncio.gather(*(self.throttle.room(d) for d in asked))
        return {
            d: budget
            for d, budget in zip(asked, answers, strict=True)
            if budget is not None and budget < rooms[d]
        }

    async def _lease(
        self, now: int, rooms: dict[str, int], limit: int | None = None
    ) -> list[LeasedDelivery]:
        """Due deliveries of the destinations named, up to each one's room and `limit` in
        all, fairly: the destinations with the fewest sends in flight first."""
        if not any(room > 0 for room in rooms.values()):
            return []
        self.leases += 1
        try:
            return await self.store.lease(
                now_ms=now,
                rooms=rooms,
                limit=limit,
                lease_ms=self.lease_ms,
                worker_id=self.worker_id,
                sending=self._attempts.sending,
            )
        except LeaseRaced:
            # Another worker's lease took one of an ordering key this one also chose: this
            # lease took nothing, and the next one (at once: the slots are still free) sees
            # which of the key is in flight.
            log.info("lease_raced", worker=self.worker_id)
            LEASE_RACES.inc()
            self._wake.set()
            return []

    async def _give_back_named(self, batch: list[LeasedDelivery], now: int) -> list[LeasedDelivery]:
        """`batch` without the deliveries to orphans that a process started since the last
        rescue names: those go back pending, due now, no attempt counted (snooze.py), for
        it to send, instead of being dead-lettered as `unknown_destination`."""
        try:
            named = await self._rescue.given_back(batch)
        except StoreUnavailable:
            # Whether a process names them now is unknown: the orphans' deliveries go back
            # (no attempt counted), the rest is sent. Raised, the batch would be dropped,
            # its leases left to expire and be rescued as attempts never made.
            named = [d for d in batch if d.destination_id in self._rescue.orphans]
        if not named:
            return batch
        self._give_back(named)
        ids = {d.id for d in named}
        return [d for d in batch if d.id not in ids]

    def _free_slots(self) -> int:
        taken = len(self._attempts.in_flight) + len(self._handed) + self._held
        return self.settings.concurrency - taken

    # -- fresh deliveries from ingest in this process (delivery/handoff.py) ----------------

    def reserve(self, events: Sequence[NewEvent]) -> Reservation | None:
        """Keep free slots for the batch ingest is about to commit, if nothing older waits."""
        if self._backlogged or not self._taking():
            return None
        # Never the spare slots: a steady stream to a slow destination took them too. A
        # lease gives them out, one to each destination with nothing in flight.
        free = self._free_slots() - self._spare
        if free <= 0:
            return None
        now = self.clock.now_ms()
        reservation = reserve(
            events,
            taker=self,
            free=free,
            blocked=self.breakers.not_closed()
            | self._snoozes.throttled(now)
            | self._left_out
            | self._capped
            | self._caps.keys(),
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
        """The batch's commit failed; it may have landed all the same (the store's answer
        was lost): its deliveries would then wait in flight under this lease until it
        expired and be rescued as an attempt never made. Given back at the next step like
        a snooze, due now (a no-op for rows never stored, or stored again under another)."""
        self._held -= reservation.count
        self._give_back(reservation.leased())
        self._slot_freed.set()  # a loop waiting for a slot may lease again
        self._wake.set()  # and one waiting for work gives them back now, not at its poll

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
        """Logged once per outage, not once per poll; an outage within a minute of the last
        line waits for the minute to pass (and is counted in `outages` then)."""
        began = not self._store_down
        self._store_down = True
        if self._down_logged:
            return
        outages = self._store_lines.due("store_unavailable", 1 if began else 0)
        if outages is not None:
            self._down_logged = True
            log.warning("store_unavailable", worker=self.worker_id, error=str(exc), outages=outages)

    async def _start(self, batch: list[LeasedDelivery], now: int, *, probe: bool = False) -> int:
        """Send each leased delivery its destination's rate limit allows now; give the others
        back in their place in the queue (no attempt counted), their destination skipped by
        leases and hand-overs until its budget refills. Once one is given back, so are the
        batch's later deliveries to its destination, as are those whose lease the asks
        before them left too short for their send. Returns how many were sent.

        A circuit may have opened since the batch was leased or handed over (the commit or
        the lease statement takes milliseconds, and failing sends record meanwhile): its
        deliveries go back pending, due now, and the lease holds them back until the circuit
        lets a probe through. A `probe` is the one delivery its half-open circuit admitted.

        A delivery whose destination id now names another tenant's destination (or none
        configured here) is started at once, to be dead-lettered unsent: it takes nothing
        of the rate limit the destination's own deliveries wait for, nor waits for its
        circuit."""
        held: set[str] = set() if probe else self.breakers.not_closed()
        loop = asyncio.get_running_loop()  # once per batch: each lookup is a getpid() call
        owners = self._owners
        queues: dict[str, list[LeasedDelivery]] = {}
        for delivery in batch:
            owner = owners.get(delivery.destination_id)
            if owner != delivery.tenant_id:
                # None: no destination of that id here (attempts.py says so, unsent). Not
                # sent, it waits for neither the destination's circuit nor its rate limit.
                self._attempts.start(loop, delivery, foreign=owner is not None)
            else:
                queues.setdefault(delivery.destination_id, []).append(delivery)
        # Each destination's deliveries in turn, the destinations all at once: with a shared
        # rate limit each send's ask is a Redis round trip, and a slow Redis (answering in
        # 0.3 s, within its timeout) held every other destination's deliveries behind one
        # limited destination's, one round trip each (a batch of 40 took 15 s to start).
        turns = [
            self._start_in_turn(loop, queue, now, held=destination_id in held, probe=probe)
            for destination_id, queue in queues.items()
        ]
        # One destination (the usual batch, and every probe) needs no task of its own.
        snoozed = [await turns[0]] if len(turns) == 1 else await asyncio.gather(*turns)
        self._give_back([delivery for given in snoozed for delivery in given])
        await self._snoozes.release()
        return len(batch) - sum(len(given) for given in snoozed)

    async def _start_in_turn(
        self,
        loop: asyncio.AbstractEventLoop,
        deliveries: list[LeasedDelivery],
        now: int,
        *,
        held: bool,
        probe: bool,
    ) -> list[LeasedDelivery]:
        """Start one destination's deliveries in their order as its rate limit allows;
        returns those not started (all of them when `held`: its circuit is not closed)."""
        if held:
            return deliveries
        ceiling_ms = self._ceilings_ms.get(deliveries[0].destination_id, 0)
        stop = self._stop
        for n, delivery in enumerate(deliveries):
            # Taken before asking: a shared budget counts the send when asked, and its answer
            # (a Redis round trip, other tasks running meanwhile) comes back a varying while
            # later; stamped then, the attempts of one second showed more than the limit.
            asked_at = self.clock.now_ms()
            wait_s = await self.throttle.acquire(delivery.destination_id)
            if wait_s is not None:
                self._snoozes.spent(delivery.destination_id, now + max(1, round(wait_s * 1000)))
                # The rest of the batch's deliveries to it wait behind this one: asked again,
                # a moving window that freed a slot meanwhile sent a later one ahead of it.
                return deliveries[n:]
            if n and delivery.lease_expires_at - self.clock.now_ms() < ceiling_ms:
                # The asks before it took so long (a slow Redis: one round trip each) that
                # its send could outlive its lease, and another worker rescue it and send
                # it again. Given back unsent with the rest, to be leased afresh (its count
                # in the budget stays: a send fewer in the window, never one more). The
                # first of a turn always goes: one ask late at most, which the lease allows.
                return deliveries[n:]
            if stop is not None and stop.is_set():
                # Stopping since the batch was leased: its later sends are given back, not
                # asked for one round trip each and started, the stop waiting for them all.
                return deliveries[n:]
            self._attempts.start(loop, delivery, started_at=asked_at, probe=probe)
        return []

    def _give_back(self, deliveries: list[LeasedDelivery]) -> None:
        """Keep these leases to give back unsent at the next release, in their place in the
        queue; fresh deliveries to their destinations wait for a lease behind them."""
        self._snoozes.add(deliveries)
        self._left_out.update(d.destination_id for d in deliveries)

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
        free = self._free_slots()
        waiters = [stopped, handed]
        if free <= self._spare:  # a freed slot lets the destinations already sending lease
            waiters.append(asyncio.ensure_future(self._slot_freed.wait()))
        if free > 0:
            waiters.append(asyncio.ensure_future(self._wake.wait()))
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

    # -- stopping ---------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        try:
            await self._give_back_unsent()
        finally:  # whatever that met, the connections this worker opened are closed
            await self._connectors.close()
            await self.throttle.aclose()
            if self._own_circuits is not None:
                await close_circuits(self._own_circuits)
            if self._own_redis is not None:
                await self._own_redis.aclose()
        log.info("worker_stopped", worker=self.worker_id, attempts=self.sent)

    async def _give_back_unsent(self) -> None:
        if self._handoff is not None:
            self._handoff.detach(self)
        unfinished = await self._attempts.stop(self.settings.shutdown_grace_s)
        unsent = [*unfinished, *self._handed]
        self._handed = []
        if unsent:
            try:
                released = await self.store.release(unsent, self.clock.now_ms())
                log.info("leases_released", count=released, worker=self.worker_id)
            except StoreUnavailable:
                log.warning("leases_not_released", count=len(unsent))
        try:
            await self._snoozes.release()
        except StoreUnavailable:
            log.warning("leases_not_released", count=len(self._snoozes))

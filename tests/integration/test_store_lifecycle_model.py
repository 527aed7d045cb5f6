"""The delivery store's lifecycle against a model, on SQLite and the real PostgreSQL.

Hypothesis drives the store through random runs of what ingest, workers and operators do
(store events of two tenants, some handed straight to a worker as `estafeta serve` does,
lease, complete, release, snooze, let leases expire and rescue them, as a worker's rescue
does too, send late results under stale tokens, replay and discard dead letters) while a
plain Python model of docs/state_machine.md says what each step must return and leave
behind. After every step the whole `deliveries` table, the count of each delivery's recorded
attempts, and the queue's counts as /metrics, the alerts, a tenant's stats and `dlq summary`
read them must equal the model, and each delivery must have moved along one edge of
ALLOWED_TRANSITIONS at most. A lease must take exactly what due.sql and the lease
statements' order (priority, the destination's level, due time, id) choose; a rescue the
expired leases with the earliest deadlines, at most its limit (raised to take a tie whole);
a worker's rescue every expired lease, each with a `lease_expired` attempt that counts; a
dead-letter move exactly what `list_dead` shows, and `list_dead` page by page the same as in
one piece.

`derandomize=True` (and ids made from a counter, not at random) so that CI runs the same
examples every time; a failure prints the steps that reproduce it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, func, select

from estafeta.config import Config
from estafeta.delivery.handoff import Reservation, reserve
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import OutcomeKind
from estafeta.delivery.rescue import Rescue
from estafeta.delivery.state import ALLOWED_TRANSITIONS, DeliveryState
from estafeta.store import open_store
from estafeta.store import schema as s
from estafeta.store.records import (
    CompletedAttempt,
    DeadLetterFilter,
    DirectLease,
    InsertResult,
    NewEvent,
)
from estafeta.store.sqlstore import SqlStore
from tests.clocks import ManualClock
from tests.integration.store_support import NOW, attempt, event

# About 25 s per engine here; the limit leaves room for a slow CI machine.
pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

DESTINATIONS = ("crm", "billing", "erp")
EVENT_TYPES = ("message.received", "appointment.booked")
IDEMPOTENCY_KEYS = ("wamid.1", "wamid.2", "wamid.3")
# The base configuration's two tenants, each with a source: a key is one tenant's own.
SOURCES = {"clinica-sol": "crm-events", "outra": "outra-in"}
TENANTS = tuple(SOURCES)
ORDERING_KEYS = ("maria", "joao")
WORKERS = ("w1", "w2")
RESCUER = "w3"
PENDING, IN_FLIGHT, SUCCEEDED, DEAD, DISCARDED = (state.value for state in DeliveryState)
MAX_EVENTS = 12  # a queue small enough that its keys and destinations keep meeting
# The attempt a worker's rescue records for a lease whose worker died (delivery/rescue.py).
LOST = "lease_expired: the worker sending it stopped before recording a result"

SETTINGS = settings(
    derandomize=True,
    database=None,
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    # No shrinking: on this store it can outlast the timeout. A failure prints its whole run,
    # which replays as it is (derandomized, ids from a counter).
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass
class Delivery:
    """What the store should hold for one delivery."""

    id: str
    tenant: str
    event_id: str
    event_type: str
    destination: str
    priority: int
    ordering_key: str | None
    max_attempts: int
    due: int  # next_attempt_at, while pending
    state: str = PENDING
    attempts: int = 0
    token: str | None = None
    expires: int | None = None
    holder: str | None = None
    last_error: str | None = None
    replays: int = 0
    moved_at: int = 0  # updated_at of a dead (the DLQ's order) or discarded delivery
    logged: int = 0  # attempts recorded, late ones included

    def lease_order(self) -> tuple[int, int, str]:
        return (self.priority, self.due, self.id)


@st.composite
def new_events(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "tenant": draw(st.sampled_from(TENANTS)),
        "key": draw(st.sampled_from((None, *IDEMPOTENCY_KEYS))),
        "type": draw(st.sampled_from(EVENT_TYPES)),
        "destinations": tuple(
            draw(st.lists(st.sampled_from(DESTINATIONS), min_size=1, max_size=3, unique=True))
        ),
        "priority": draw(st.integers(0, 4)),
        "ordering_key": draw(st.sampled_from((None, *ORDERING_KEYS))),
        "offset": draw(st.integers(-3000, 3000)),  # a process whose clock is behind, or ahead
        "max_attempts": draw(st.integers(1, 3)),
    }


outcomes = st.sampled_from((OutcomeKind.SUCCESS, OutcomeKind.RETRYABLE, OutcomeKind.PERMANENT))
limits = st.none() | st.integers(1, 4)


class Taker:
    """The worker's side of a handoff (delivery/handoff.py): takes all it is given."""

    def reserve(self, events: Any) -> Reservation | None:
        raise AssertionError("the model reserves with handoff.reserve itself")

    def take(self, reservation: Reservation, deliveries: list[LeasedDelivery]) -> bool:
        return True

    def cancel(self, reservation: Reservation) -> None:
        raise AssertionError("a commit of the model's never fails")


class StoreLifecycle(RuleBasedStateMachine):
    runner: ClassVar[asyncio.Runner]
    store: ClassVar[SqlStore]

    def __init__(self) -> None:
        super().__init__()
        self.run(_empty(self.store))
        self.now = NOW
        self.counter = 0
        self.deliveries: dict[str, Delivery] = {}
        self.events: set[str] = set()
        # (tenant, idempotency key) → the event stored with it
        self.keys: dict[tuple[str, str], str] = {}
        self.tenant_of: dict[str, str] = {}  # event id → its tenant
        self.held: dict[str, LeasedDelivery] = {}  # delivery id → the lease holding it now
        self.stale: list[LeasedDelivery] = []  # leases that no longer hold their delivery
        self.batches: list[list[NewEvent]] = []  # every batch stored, to import again
        self.counted: tuple[Any, ...] = ()  # what check_counts last read
        self.summarised: set[tuple[Any, ...]] = set()  # the DLQ's summary when last read
        self.seen: dict[str, str] = {}  # each delivery's state in the store after the last step

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def make_id(self, prefix: str, at: int) -> str:
        """Time-sortable like new_id, but the same in every run (no random bits)."""
        self.counter += 1
        return f"{prefix}_{at:013d}{self.counter:013d}"

    # -- what the model says --------------------------------------------------------------

    def leasable(self) -> list[Delivery]:
        """Due by now, and not waiting behind its key (due.sql)."""

        def waits(d: Delivery) -> bool:
            return d.ordering_key is not None and any(
                o.destination == d.destination
                and o.ordering_key == d.ordering_key
                and (o.state == IN_FLIGHT or (o.state == PENDING and o.id < d.id))
                for o in self.deliveries.values()
                if o is not d
            )

        return [
            d
            for d in self.deliveries.values()
            if d.state == PENDING and d.due <= self.now and not waits(d)
        ]

    def expected_lease(
        self, rooms: dict[str, int], limit: int | None, sending: dict[str, int]
    ) -> list[str]:
        """The lease statements' choice: each destination's best due deliveries up to its
        room, then the best `limit` of those by priority, level (in flight after this one),
        due time, id."""
        rooms = {dest: room for dest, room in rooms.items() if room > 0}
        total = sum(rooms.values()) if limit is None else min(limit, sum(rooms.values()))
        if total <= 0:
            return []
        due = self.leasable()
        candidates: list[tuple[int, int, int, str]] = []
        for dest, room in rooms.items():
            best = sorted((d for d in due if d.destination == dest), key=Delivery.lease_order)
            for rank, d in enumerate(best[: min(room, total)], start=1):
                candidates.append((d.priority, sending.get(dest, 0) + rank, d.due, d.id))
        chosen = [self.deliveries[c[3]] for c in sorted(candidates)[:total]]
        return [d.id for d in sorted(chosen, key=Delivery.lease_order)]

    def dead_selection(self, f: DeadLetterFilter) -> list[str]:
        """What a dead-letter list or move with this filter takes: oldest death first."""
        dead = [
            d
            for d in self.deliveries.values()
            if d.state == DEAD
            and (f.tenant_id is None or d.tenant == f.tenant_id)
            and (not f.delivery_ids or d.id in f.delivery_ids)
            and (f.destination_id is None or d.destination == f.destination_id)
            and (f.event_type is None or d.event_type == f.event_type)
            and (f.since is None or d.moved_at >= f.since)
            and (f.until is None or d.moved_at < f.until)
        ]
        dead.sort(key=lambda d: (d.moved_at, d.id))
        return [d.id for d in dead[: f.batch]]

    def check_pages(self, f: DeadLetterFilter) -> None:
        """`dlq list` a page of 2 at a time, each from where the last ended: every selected
        dead delivery once, in the order of one whole list."""
        whole = self.dead_selection(dataclasses.replace(f, limit=None))
        paged: list[str] = []
        after: tuple[int, str] | None = None
        while True:
            page = self.run(self.store.list_dead(dataclasses.replace(f, limit=2, after=after)))
            paged.extend(d.id for d in page)
            if len(page) < 2:
                break
            after = (page[-1].updated_at, page[-1].id)
            assert len(paged) <= len(whole)
        assert paged == whole

    def expired(self) -> dict[str, int]:
        """The deadline of each lease that has passed by now."""
        return {
            d.id: d.expires
            for d in self.deliveries.values()
            if d.state == IN_FLIGHT and d.expires is not None and d.expires <= self.now
        }

    def check_view(self, event_id: str) -> None:
        """The API's view of an event: its deliveries as the model has them, each with one
        entry in its attempt log per attempt recorded."""
        tenant = self.tenant_of[event_id]
        other = next(t for t in TENANTS if t != tenant)
        assert self.run(self.store.get_event(event_id, other)) is None
        view = self.run(self.store.get_event(event_id, tenant))
        assert view is not None
        mine = sorted(i for i, d in self.deliveries.items() if d.event_id == event_id)
        assert [d.id for d in view.deliveries] == mine
        for seen in view.deliveries:
            d = self.deliveries[seen.id]
            assert (seen.state, seen.attempts, seen.replays, seen.last_error) == (
                d.state,
                d.attempts,
                d.replays,
                d.last_error,
            )
            assert len(seen.attempt_log) == d.logged

    def give_up(self, lease: LeasedDelivery) -> None:
        """The lease no longer holds its delivery: anything sent under it is late."""
        self.held.pop(lease.id, None)
        self.stale.append(lease)

    # -- rules ----------------------------------------------------------------------------

    @initialize(batch=st.lists(new_events(), min_size=2, max_size=6))
    def store_first_events(self, batch: list[dict[str, Any]]) -> None:
        self.store_events(batch)

    @rule(
        batch=st.lists(new_events(), min_size=1, max_size=3),
        how=st.sampled_from(("ingest", "spool", "handoff", "again")),
        again=st.integers(0, 99),
        worker=st.sampled_from(WORKERS),
        free=st.integers(1, 4),
        blocked=st.frozensets(st.sampled_from(DESTINATIONS), max_size=1),
        lease_ms=st.sampled_from((1000, 5000)),
    )
    def store_events(
        self,
        batch: list[dict[str, Any]],
        how: str = "ingest",
        again: int = 0,
        worker: str = WORKERS[0],
        free: int = 1,
        blocked: frozenset[str] = frozenset(),
        lease_ms: int = 1000,
    ) -> None:
        """Ingest; the spool's import (`by_id`), which takes the general transaction;
        ingest in `estafeta serve` (`handoff`), where the deliveries its worker may take at
        once are stored in flight under that worker's lease and handed to it
        (delivery/handoff.py); or, and always once the queue is full, a batch stored before
        imported again from the spool after a crash (`by_id`): every event of it already
        stored is a duplicate of itself, and one that was a duplicate of its key still is.
        (One rule, not two: Hypothesis picked a rule of its own for the import again half
        the time, at the others' expense.)"""
        if how == "again" or len(self.events) >= MAX_EVENTS:
            self.ingest(self.batches[again % len(self.batches)], by_id=True)
            return
        made = [
            event(
                spec["key"],
                tenant=spec["tenant"],
                source=SOURCES[spec["tenant"]],
                at=self.now + spec["offset"],
                event_type=spec["type"],
                destinations=spec["destinations"],
                priority=spec["priority"],
                ordering_key=spec["ordering_key"],
                max_attempts=spec["max_attempts"],
                make_id=self.make_id,
            )
            for spec in batch
        ]
        self.batches.append(made)  # as accepted (and spooled): never leased
        if how != "handoff":
            self.ingest(made, by_id=how == "spool")
            return
        lease = DirectLease(self.make_id("h", self.now), self.now + lease_ms, worker)
        reservation = reserve(made, taker=Taker(), free=free, blocked=blocked, lease=lease)
        if reservation is None:
            self.ingest(made, by_id=False)
            return
        results = self.ingest(reservation.events, by_id=False)
        handed, taken = reservation.settle(results)
        assert taken
        # Exactly the stored deliveries the model put in flight under this lease.
        assert sorted(d.id for d in handed) == sorted(
            i for i, d in self.deliveries.items() if d.token == lease.token
        )
        for got in handed:
            d = self.deliveries[got.id]
            assert got.ordering_key is None and d.ordering_key is None
            assert got.destination_id not in blocked
            assert (got.event_id, got.destination_id, got.attempts, got.max_attempts) == (
                d.event_id,
                d.destination,
                0,
                d.max_attempts,
            )
            self.held[got.id] = got

    def ingest(self, made: list[NewEvent], *, by_id: bool) -> list[InsertResult]:
        results = self.run(self.store.insert_events(made, by_id=by_id))
        expected: list[tuple[str, bool]] = []
        for e in made:
            key = None if e.idempotency_key is None else (e.tenant_id, e.idempotency_key)
            if by_id and e.id in self.events:
                expected.append((e.id, True))
                continue
            if key is not None and key in self.keys:
                expected.append((self.keys[key], True))
                continue
            expected.append((e.id, False))
            if key is not None:
                self.keys[key] = e.id
            self.events.add(e.id)
            self.tenant_of[e.id] = e.tenant_id
            for d in e.deliveries:
                self.deliveries[d.id] = Delivery(
                    id=d.id,
                    tenant=e.tenant_id,
                    event_id=e.id,
                    event_type=e.type,
                    destination=d.destination_id,
                    priority=d.priority,
                    ordering_key=d.ordering_key,
                    max_attempts=d.max_attempts,
                    due=e.received_at,
                )
                if d.lease is not None:  # handed over: in flight as it is stored
                    self.deliveries[d.id].state = IN_FLIGHT
                    self.deliveries[d.id].token = d.lease.token
                    self.deliveries[d.id].expires = d.lease.expires_at
                    self.deliveries[d.id].holder = d.lease.worker_id
        assert [(r.event_id, r.duplicate) for r in results] == expected
        return results

    @rule(
        ms=st.integers(0, 8000),
        rescuer=st.sampled_from((None, "claim", "worker")),
        limit=st.integers(1, 3),
        lease_ms=st.sampled_from((1000, 5000)),
    )
    def time_passes(self, ms: int, rescuer: str | None, limit: int, lease_ms: int) -> None:
        """Time passes, and a worker may then look for leases that expired meanwhile (as
        the rules below do at any time: here so that they often find some)."""
        self.now += ms
        if rescuer is not None and self.expired():
            if rescuer == "claim":
                self.rescue(limit, lease_ms)
            else:
                self.worker_rescues(lease_ms)

    @precondition(lambda self: bool(self.leasable()))
    @rule(
        worker=st.sampled_from(WORKERS),
        rooms=st.fixed_dictionaries({d: st.integers(0, 3) for d in DESTINATIONS}),
        limit=limits,
        lease_ms=st.sampled_from((1000, 5000)),
    )
    def lease(self, worker: str, rooms: dict[str, int], limit: int | None, lease_ms: int) -> None:
        waiting = {d.destination for d in self.deliveries.values() if d.state == PENDING}
        assert self.run(self.store.pending_destinations()) == waiting
        sending = Counter(
            self.deliveries[i].destination for i in self.held if self.deliveries[i].holder == worker
        )
        due = {d.id for d in self.leasable()}
        expected = self.expected_lease(rooms, limit, dict(sending))
        leased = self.run(
            self.store.lease(
                now_ms=self.now,
                rooms=rooms,
                limit=limit,
                lease_ms=lease_ms,
                worker_id=worker,
                sending=dict(sending),
            )
        )
        # What holds whatever the fairness: only due deliveries, within the rooms and the
        # limit, best first, one per key; then exactly the model's choice.
        assert {d.id for d in leased} <= due
        assert limit is None or len(leased) <= limit
        for dest, n in Counter(d.destination_id for d in leased).items():
            assert n <= rooms.get(dest, 0)
        order = [self.deliveries[d.id].lease_order() for d in leased]
        assert order == sorted(order)
        keyed = [(d.destination_id, d.ordering_key) for d in leased if d.ordering_key]
        assert len(keyed) == len(set(keyed))
        assert [d.id for d in leased] == expected
        for got in leased:
            d = self.deliveries[got.id]
            assert (got.tenant_id, got.event_id, got.destination_id, got.attempts) == (
                d.tenant,
                d.event_id,
                d.destination,
                d.attempts,
            )
            assert (got.priority, got.ordering_key) == (d.priority, d.ordering_key)
            assert got.lease_expires_at == self.now + lease_ms
            d.state, d.token, d.expires, d.holder = (
                IN_FLIGHT,
                got.lease_token,
                got.lease_expires_at,
                worker,
            )
            self.held[d.id] = got

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        ids = data.draw(
            st.lists(st.sampled_from(sorted(self.held)), min_size=1, max_size=3, unique=True)
        )
        late = data.draw(st.lists(st.sampled_from(self.stale), max_size=1)) if self.stale else []
        batch: list[CompletedAttempt] = []
        for lease in [self.held[i] for i in ids] + late:
            kind = data.draw(outcomes)
            to = self._decide(lease, kind)
            batch.append(
                attempt(
                    lease,
                    to,
                    kind=kind,
                    at=self.now,
                    next_at=self.now + data.draw(st.integers(0, 5000)),
                    attempt_id=self.make_id("att", self.now),
                )
            )
        applied = self.run(self.store.complete(batch, self.now))
        assert applied == len(ids)
        for item in batch:
            d = self.deliveries[item.delivery.id]
            d.logged += 1
            if item.delivery.lease_token != d.token:
                continue  # late (maybe beside the lease that holds it now): changes nothing
            t = item.transition
            d.state, d.attempts, d.last_error = t.to_state.value, t.attempts, t.last_error
            d.token = d.expires = d.holder = None
            if t.next_attempt_at is not None:
                d.due = t.next_attempt_at
            if d.state == DEAD:
                d.moved_at = self.now
            self.give_up(item.delivery)
        self.check_view(batch[-1].delivery.event_id)

    @staticmethod
    def _decide(lease: LeasedDelivery, kind: OutcomeKind) -> DeliveryState:
        """decide()'s rule for the state (docs/state_machine.md, "Deciding")."""
        if kind is OutcomeKind.SUCCESS:
            return DeliveryState.SUCCEEDED
        if kind is OutcomeKind.PERMANENT or lease.attempts + 1 >= lease.max_attempts:
            return DeliveryState.DEAD
        return DeliveryState.PENDING

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), snooze=st.none() | st.integers(0, 5000))
    def release(self, data: st.DataObject, snooze: int | None) -> None:
        ids = data.draw(
            st.lists(st.sampled_from(sorted(self.held)), min_size=1, max_size=3, unique=True)
        )
        given = [self.held[i] for i in ids]
        late = data.draw(st.lists(st.sampled_from(self.stale), max_size=1)) if self.stale else []
        due_at = None if snooze is None else self.now + snooze
        applied = self.run(self.store.release(given + late, self.now, due_at=due_at))
        assert applied == len(given)
        for lease in given:
            d = self.deliveries[lease.id]
            # By default due at once in its place: its due time, unless that is later.
            d.state, d.due = PENDING, min(d.due, self.now) if due_at is None else due_at
            d.token = d.expires = d.holder = None
            self.give_up(lease)

    @precondition(lambda self: bool(self.stale))
    @rule(data=st.data(), kind=outcomes, as_release=st.booleans())
    def late_result(self, data: st.DataObject, kind: OutcomeKind, as_release: bool) -> None:
        """A worker whose lease was taken over (or that already finished) reports again."""
        lease = data.draw(st.sampled_from(self.stale))
        if as_release:
            assert self.run(self.store.release([lease], self.now)) == 0
            return
        late = attempt(
            lease,
            self._decide(lease, kind),
            kind=kind,
            at=self.now,
            attempt_id=self.make_id("att", self.now),
        )
        assert self.run(self.store.complete([late], self.now)) == 0
        self.deliveries[lease.id].logged += 1
        self.check_view(lease.event_id)

    @precondition(lambda self: bool(self.expired()))
    @rule(limit=st.integers(1, 3), lease_ms=st.sampled_from((1000, 5000)))
    def rescue(self, limit: int, lease_ms: int) -> None:
        expired = self.expired()
        # A limit that would cut a group of equal deadlines takes the whole group: which
        # of them the store takes is its choice, and the next draws must not depend on it
        # (Hypothesis fails a run whose same choices lead elsewhere).
        deadlines = sorted(expired.values())
        while limit < len(deadlines) and deadlines[limit] == deadlines[limit - 1]:
            limit += 1
        claimed = self.run(
            self.store.claim_expired(
                now_ms=self.now, lease_ms=lease_ms, worker_id=RESCUER, limit=limit
            )
        )
        ids = {c.id for c in claimed}
        assert len(claimed) == len(ids) == min(limit, len(expired))
        assert ids <= set(expired)
        left = [deadline for i, deadline in expired.items() if i not in ids]
        if claimed and left:  # the earliest deadlines first (ties in any order)
            assert max(expired[i] for i in ids) < min(left)
        for got in sorted(claimed, key=lambda c: c.id):  # RETURNING has no order
            d = self.deliveries[got.id]
            assert got.lease_token != d.token
            assert (got.attempts, got.max_attempts, got.ordering_key) == (
                d.attempts,
                d.max_attempts,
                d.ordering_key,
            )
            assert got.lease_expires_at == self.now + lease_ms
            self.give_up(self.held[got.id])
            d.token, d.expires, d.holder = got.lease_token, got.lease_expires_at, RESCUER
            self.held[got.id] = got

    @precondition(lambda self: bool(self.expired()))
    @rule(lease_ms=st.sampled_from((1000, 5000)))
    def worker_rescues(self, lease_ms: int) -> None:
        """A worker's rescue (delivery/rescue.py): takes over every expired lease and records
        the lost attempt, which counts: a retry after the default backoff, or the DLQ."""
        expired = self.expired()
        rescue = Rescue(
            self.store,
            clock=ManualClock(self.now),
            rand=lambda: 0.5,  # no jitter: the delay is the backoff's own
            policies={},
            limits={},
            lease_ms=lease_ms,
            worker_id=RESCUER,
            destinations=DESTINATIONS,
            interval_s=5,
            started_ms=NOW,
        )
        assert self.run(rescue.expired()) == len(expired)
        for i in expired:
            d = self.deliveries[i]
            self.give_up(self.held[i])
            d.attempts += 1
            d.logged += 1
            d.last_error = LOST
            d.token = d.expires = d.holder = None
            if d.attempts >= d.max_attempts:
                d.state, d.moved_at = DEAD, self.now
            else:  # DEFAULT_BACKOFF: 1 s, doubling
                d.state, d.due = PENDING, self.now + 1000 * 2 ** (d.attempts - 1)
        for event_id in {self.deliveries[i].event_id for i in expired}:
            self.check_view(event_id)

    @precondition(lambda self: any(d.state == DEAD for d in self.deliveries.values()))
    @rule(
        data=st.data(),
        action=st.sampled_from(("replay", "discard")),
        tenant=st.none() | st.sampled_from(TENANTS),
        destination=st.none() | st.sampled_from(DESTINATIONS),
        by_ids=st.booleans(),
        event_type=st.none() | st.sampled_from(EVENT_TYPES),
        since_ms=st.none() | st.integers(0, 20_000),
        until_ms=st.none() | st.integers(0, 5_000),
        limit=st.none() | st.integers(1, 3),
    )
    def move_dead(
        self,
        data: st.DataObject,
        action: str,
        tenant: str | None,
        destination: str | None,
        by_ids: bool,
        event_type: str | None,
        since_ms: int | None,
        until_ms: int | None,
        limit: int | None,
    ) -> None:
        ids: tuple[str, ...] = ()
        if by_ids and self.deliveries:
            ids = tuple(
                data.draw(
                    st.lists(
                        st.sampled_from(sorted(self.deliveries)),
                        min_size=1,
                        max_size=4,
                        unique=True,
                    )
                )
            )
        f = DeadLetterFilter(
            tenant_id=tenant,
            delivery_ids=ids,
            destination_id=destination,
            event_type=event_type,
            since=None if since_ms is None else self.now - since_ms,
            until=None if until_ms is None else self.now - until_ms,
            limit=limit,
        )
        expected = self.dead_selection(f)
        assert [d.id for d in self.run(self.store.list_dead(f))] == expected
        self.check_pages(f)
        move = self.store.replay if action == "replay" else self.store.discard
        assert self.run(move(f, actor="model", now_ms=self.now)) == sorted(expected)
        for i in expected:
            d = self.deliveries[i]
            if action == "replay":
                d.state, d.attempts, d.due, d.replays = PENDING, 0, self.now, d.replays + 1
            else:
                d.state, d.moved_at = DISCARDED, self.now

    # -- after every step -----------------------------------------------------------------

    @invariant()
    def the_store_holds_what_the_model_says(self) -> None:
        rows, logged, events = self.run(_snapshot(self.store))
        assert events == len(self.events)
        assert set(rows) == set(self.deliveries)
        # Each step moves a delivery along one edge of the machine at most (a new one is
        # pending, or in flight when handed over), never out of succeeded or discarded.
        for i, r in rows.items():
            before = self.seen.get(i)
            if before is None:
                assert r.state in (PENDING, IN_FLIGHT), i
            elif before != r.state:
                assert (DeliveryState(before), DeliveryState(r.state)) in ALLOWED_TRANSITIONS, i
        self.seen = {i: r.state for i, r in rows.items()}
        for i, r in rows.items():
            d = self.deliveries[i]
            assert (r.state, r.attempts, r.replays, r.last_error) == (
                d.state,
                d.attempts,
                d.replays,
                d.last_error,
            ), i
            assert logged.get(i, 0) == d.logged, i
            if d.state == PENDING:
                assert r.next_attempt_at == d.due, i
            if d.state == IN_FLIGHT:
                assert (r.lease_token, r.lease_expires_at, r.leased_by) == (
                    d.token,
                    d.expires,
                    d.holder,
                ), i
            else:
                assert (r.lease_token, r.lease_expires_at, r.leased_by) == (None, None, None), i
            if d.state in (DEAD, DISCARDED):
                assert r.updated_at == d.moved_at, i
        in_flight = [
            (r.destination_id, r.ordering_key)
            for r in rows.values()
            if r.state == IN_FLIGHT and r.ordering_key is not None
        ]
        assert len(in_flight) == len(set(in_flight)), "two of one key in flight"
        self.check_counts()
        self.check_summary()

    def check_counts(self) -> None:
        """The queue's counts as each reader asks for them. Read again only when what they
        count changed (the rows are compared with the model after every step anyway): six
        reads a step made the run twice as long."""
        by_state = Counter(d.state for d in self.deliveries.values())
        theirs = Counter(d.state for d in self.deliveries.values() if d.tenant == "outra")
        due = [d.due for d in self.deliveries.values() if d.state == PENDING]
        oldest = min(due) if due else None
        counted = (frozenset(by_state.items()), frozenset(theirs.items()), oldest)
        if counted == self.counted:
            return
        assert self.run(self.store.queue_stats(history=True)).by_state == by_state
        # What /metrics and /health/detailed show: the queue, without the history.
        queue = {state: n for state, n in by_state.items() if state in (PENDING, IN_FLIGHT, DEAD)}
        stats = self.run(self.store.queue_stats())
        assert (stats.by_state, stats.oldest_pending_at) == (queue, oldest)
        # A tenant's own (GET /api/v1/stats): only its deliveries.
        assert self.run(self.store.queue_stats("outra", history=True)).by_state == theirs
        # What the alerts watch.
        depths = self.run(self.store.queue_depths())
        assert (depths.pending, depths.in_flight, depths.dead) == (
            by_state[PENDING],
            by_state[IN_FLIGHT],
            by_state[DEAD],
        )
        self.counted = counted

    def check_summary(self) -> None:
        """`dlq summary`: the dead counted by destination and reason, the largest groups
        first. Read again only when the dead-letter queue changed (the rows are compared
        after every step anyway)."""
        groups: dict[tuple[str, str, str | None], list[int]] = {}
        for d in self.deliveries.values():
            if d.state == DEAD:
                groups.setdefault((d.tenant, d.destination, d.last_error), []).append(d.moved_at)
        expected = {
            (tenant, dest, error, len(at), min(at), max(at))
            for (tenant, dest, error), at in groups.items()
        }
        if expected == self.summarised:
            return
        summary = self.run(self.store.dead_summary(DeadLetterFilter()))
        assert {
            (g.tenant_id, g.destination_id, g.last_error, g.count, g.first_dead_at, g.last_dead_at)
            for g in summary
        } == expected
        counts = [g.count for g in summary]
        assert counts == sorted(counts, reverse=True)
        self.summarised = expected


async def _empty(store: SqlStore) -> None:
    async with store.engine.begin() as conn:
        for table in (s.audit_log, s.attempts, s.deliveries, s.events):
            await conn.execute(delete(table))


async def _snapshot(store: SqlStore) -> tuple[dict[str, Any], dict[str, int], int]:
    """Every delivery's row, each delivery's number of recorded attempts, and the events."""
    a = s.attempts
    async with store.engine.connect() as conn:
        rows = {r.id: r for r in (await conn.execute(select(s.deliveries))).all()}
        counted = await conn.execute(
            select(a.c.delivery_id, func.count()).group_by(a.c.delivery_id)
        )
        logged = {i: int(n) for i, n in counted.all()}
        events = int((await conn.execute(select(func.count()).select_from(s.events))).scalar_one())
    return rows, logged, events


async def _opened(config: Config) -> SqlStore:
    store = open_store(config.storage.url)
    await store.migrate()
    await store.sync_config(config, NOW)
    return store


def test_the_store_follows_the_model_of_the_delivery_lifecycle(config: Config) -> None:
    """Sync, with its own event loop: Hypothesis runs each step to the end, one at a time."""
    with asyncio.Runner() as runner:
        store = runner.run(_opened(config))
        try:

            class OnThisStore(StoreLifecycle):
                pass

            OnThisStore.runner = runner
            OnThisStore.store = store
            run_state_machine_as_test(OnThisStore, settings=SETTINGS)
        finally:
            runner.run(store.close())

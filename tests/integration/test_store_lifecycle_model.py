"""The delivery store's lifecycle against a model, on SQLite and the real PostgreSQL.

Hypothesis drives the store through random runs of what ingest, workers and operators do
(store events, lease, complete, release, snooze, let leases expire and rescue them, send late
results under stale tokens, replay and discard dead letters) while a plain Python model of
docs/state_machine.md says what each step must return and leave behind. After every step the
whole `deliveries` table, and the count of each delivery's recorded attempts, must equal the
model. A lease must take exactly what due.sql and the lease statements' order (priority, the
destination's level, due time, id) choose; a rescue the expired leases with the earliest
deadlines, at most its limit; a dead-letter move exactly what `list_dead` shows.

`derandomize=True` (and ids made from a counter, not at random) so that CI runs the same
examples every time; a failure prints the steps that reproduce it.
"""

from __future__ import annotations

import asyncio
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
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import OutcomeKind
from estafeta.delivery.state import DeliveryState
from estafeta.store import open_store
from estafeta.store import schema as s
from estafeta.store.records import CompletedAttempt, DeadLetterFilter, NewEvent
from estafeta.store.sqlstore import SqlStore
from tests.integration.store_support import NOW, attempt, event

# About 20 s per engine here; the limit leaves room for a slow CI machine.
pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

DESTINATIONS = ("crm", "billing", "erp")
EVENT_TYPES = ("message.received", "appointment.booked")
IDEMPOTENCY_KEYS = ("wamid.1", "wamid.2", "wamid.3")
ORDERING_KEYS = ("maria", "joao")
WORKERS = ("w1", "w2")
RESCUER = "w3"
PENDING, IN_FLIGHT, SUCCEEDED, DEAD, DISCARDED = (state.value for state in DeliveryState)
MAX_EVENTS = 12  # a queue small enough that its keys and destinations keep meeting

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
        self.keys: dict[str, str] = {}  # idempotency key → the event stored with it
        self.held: dict[str, LeasedDelivery] = {}  # delivery id → the lease holding it now
        self.stale: list[LeasedDelivery] = []  # leases that no longer hold their delivery
        self.batches: list[list[NewEvent]] = []  # every batch stored, to import again

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
            and (not f.delivery_ids or d.id in f.delivery_ids)
            and (f.destination_id is None or d.destination == f.destination_id)
            and (f.event_type is None or d.event_type == f.event_type)
            and (f.since is None or d.moved_at >= f.since)
            and (f.until is None or d.moved_at < f.until)
        ]
        dead.sort(key=lambda d: (d.moved_at, d.id))
        return [d.id for d in dead[: f.batch]]

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
        view = self.run(self.store.get_event(event_id, "clinica-sol"))
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

    @precondition(lambda self: len(self.events) < MAX_EVENTS)
    @rule(batch=st.lists(new_events(), min_size=1, max_size=3), by_id=st.booleans())
    def store_events(self, batch: list[dict[str, Any]], by_id: bool = False) -> None:
        """Ingest, or (`by_id`) the spool's import, which takes the general transaction."""
        made = [
            event(
                spec["key"],
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
        self.batches.append(made)
        self.ingest(made, by_id=by_id)

    @precondition(lambda self: bool(self.batches))
    @rule(data=st.data())
    def import_again(self, data: st.DataObject) -> None:
        """A spool segment imported again after a crash (`by_id`): every event of it already
        stored is a duplicate of itself, and one that was a duplicate of its key still is."""
        self.ingest(data.draw(st.sampled_from(self.batches)), by_id=True)

    def ingest(self, made: list[NewEvent], *, by_id: bool) -> None:
        results = self.run(self.store.insert_events(made, by_id=by_id))
        expected: list[tuple[str, bool]] = []
        for e in made:
            key = e.idempotency_key
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
            for d in e.deliveries:
                self.deliveries[d.id] = Delivery(
                    id=d.id,
                    event_id=e.id,
                    event_type=e.type,
                    destination=d.destination_id,
                    priority=d.priority,
                    ordering_key=d.ordering_key,
                    max_attempts=d.max_attempts,
                    due=e.received_at,
                )
        assert [(r.event_id, r.duplicate) for r in results] == expected

    @rule(ms=st.integers(0, 8000))
    def time_passes(self, ms: int) -> None:
        self.now += ms

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
            assert (got.event_id, got.destination_id, got.attempts, got.priority) == (
                d.event_id,
                d.destination,
                d.attempts,
                d.priority,
            )
            assert got.ordering_key == d.ordering_key
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
        late = [lease for lease in late if lease.id not in ids]
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
            if item.delivery.id not in ids:
                continue  # late: recorded, changes nothing
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
        late = [lease for lease in late if lease.id not in ids]
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
            assert max(expired[i] for i in ids) <= min(left)
        for got in claimed:
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

    @precondition(lambda self: any(d.state == DEAD for d in self.deliveries.values()))
    @rule(
        data=st.data(),
        action=st.sampled_from(("replay", "discard")),
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
            delivery_ids=ids,
            destination_id=destination,
            event_type=event_type,
            since=None if since_ms is None else self.now - since_ms,
            until=None if until_ms is None else self.now - until_ms,
            limit=limit,
        )
        expected = self.dead_selection(f)
        assert [d.id for d in self.run(self.store.list_dead(f))] == expected
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
        by_state = Counter(d.state for d in self.deliveries.values())
        assert self.run(self.store.queue_stats(history=True)).by_state == by_state
        # What /metrics and /health/detailed show: the queue, without the history.
        queue = {state: n for state, n in by_state.items() if state in (PENDING, IN_FLIGHT, DEAD)}
        assert self.run(self.store.queue_stats()).by_state == queue


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

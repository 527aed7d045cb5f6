"""Which fresh deliveries ingest hands straight to the worker in its process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from estafeta.delivery.handoff import Handoff, Reservation, reserve
from estafeta.delivery.model import LeasedDelivery
from estafeta.store.records import DirectLease, InsertResult, NewDelivery, NewEvent
from tests.events import new_event

LEASE = DirectLease(token="t0k3n", expires_at=61_000, worker_id="w1")


class Taker:
    """The worker's side, recording what it was given."""

    def __init__(self, *, taking: bool = True) -> None:
        self.taking = taking
        self.taken: list[LeasedDelivery] = []
        self.cancelled = 0

    def reserve(self, events: Sequence[NewEvent]) -> Reservation | None:
        return reserve(events, taker=self, free=10, blocked=(), lease=LEASE)

    def take(self, reservation: Reservation, deliveries: list[LeasedDelivery]) -> bool:
        if self.taking:
            self.taken.extend(deliveries)
        return self.taking

    def cancel(self, reservation: Reservation) -> None:
        self.cancelled += 1


def event(n: int, *deliveries: NewDelivery) -> NewEvent:
    return new_event(f"evt_{n}", *deliveries, at=1_000)


def delivery(
    name: str, destination: str = "crm", priority: int = 5, ordering_key: str | None = None
) -> NewDelivery:
    return NewDelivery(
        id=name,
        destination_id=destination,
        priority=priority,
        max_attempts=3,
        ordering_key=ordering_key,
    )


def leased_ids(events: Sequence[NewEvent]) -> list[str]:
    return [d.id for e in events for d in e.deliveries if d.lease is not None]


def test_deliveries_with_an_ordering_key_or_to_a_blocked_destination_stay_pending() -> None:
    batch = [
        event(1, delivery("a"), delivery("b", ordering_key="+5511")),
        event(2, delivery("c", destination="billing"), delivery("d")),
    ]
    taken = reserve(batch, taker=Taker(), free=10, blocked={"billing"}, lease=LEASE)
    assert taken is not None
    assert leased_ids(taken.events) == ["a", "d"] and taken.count == 2
    assert taken.leaves_pending  # "b" and "c": the worker is woken to lease them
    assert {d.lease for e in taken.events for d in e.deliveries} == {LEASE, None}
    assert leased_ids(batch) == []  # the batch as accepted is left alone (it may be spooled)


def test_with_fewer_free_slots_the_best_priority_goes_first_then_arrival_order() -> None:
    batch = [
        event(1, delivery("late-low", priority=9)),
        event(2, delivery("urgent", priority=0), delivery("normal-1")),
        event(3, delivery("normal-2")),
    ]
    taken = reserve(batch, taker=Taker(), free=2, blocked=(), lease=LEASE)
    assert taken is not None
    assert sorted(leased_ids(taken.events)) == ["normal-1", "urgent"]
    assert taken.leaves_pending
    everything = reserve(batch, taker=Taker(), free=4, blocked=(), lease=LEASE)
    assert everything is not None and not everything.leaves_pending


def test_nothing_is_reserved_without_a_free_slot_or_an_eligible_delivery() -> None:
    taker = Taker()
    assert reserve([event(1, delivery("a"))], taker=taker, free=0, blocked=(), lease=LEASE) is None
    keyed = [event(1, delivery("a", ordering_key="k")), event(2)]
    assert reserve(keyed, taker=taker, free=5, blocked=(), lease=LEASE) is None


def test_only_the_deliveries_of_stored_events_are_handed_over_under_the_lease() -> None:
    taker = Taker()
    handoff = Handoff()
    batch = [event(1, delivery("a"), delivery("b")), event(2, delivery("c"))]
    assert handoff.reserve(batch) is None  # no worker runs here
    handoff.attach(taker)
    reservation = handoff.reserve(batch)
    assert reservation is not None
    stored = [InsertResult("evt_1", duplicate=False), InsertResult("evt_0", duplicate=True)]
    leased, taken = reservation.settle(stored)
    assert taken and taker.taken == leased
    assert [(d.id, d.event_id, d.lease_token, d.attempts) for d in leased] == [
        ("a", "evt_1", "t0k3n", 0),
        ("b", "evt_1", "t0k3n", 0),
    ]
    assert leased[0].payload == b'{"id":"evt_1"}' and leased[0].lease_expires_at == 61_000
    handoff.detach(taker)
    assert handoff.reserve(batch) is None


def test_a_stopping_worker_refuses_and_a_failed_commit_gives_the_slots_back() -> None:
    taker = Taker(taking=False)
    reservation = taker.reserve([event(1, delivery("a"))])
    assert reservation is not None
    leased, taken = reservation.settle([InsertResult("evt_1", duplicate=False)])
    assert not taken and [d.id for d in leased] == ["a"]  # the caller releases them
    reservation.cancel()
    assert taker.cancelled == 1


def test_a_failed_commit_names_every_lease_it_may_have_stored_to_be_given_back() -> None:
    """A commit that failed may have landed (its answer lost): the worker gives back each
    delivery the batch took under the lease, whatever became of its event."""
    batch = [event(1, delivery("a"), delivery("k", ordering_key="k")), event(2, delivery("c"))]
    reservation = Taker().reserve(batch)
    assert reservation is not None
    assert [(d.id, d.lease_token) for d in reservation.leased()] == [
        ("a", "t0k3n"),
        ("c", "t0k3n"),
    ]


def test_an_event_with_other_deliveries_keeps_every_other_field() -> None:
    # Every field a distinct value (types do not matter to the copy), so none can be lost.
    values: dict[str, Any] = {f.name: f"value-{f.name}" for f in msgspec.structs.fields(NewEvent)}
    original = NewEvent(**{**values, "deliveries": (delivery("a"),)})
    changed = original.with_deliveries((delivery("b"),))
    assert [d.id for d in changed.deliveries] == ["b"]
    assert msgspec.structs.replace(changed, deliveries=original.deliveries) == original

"""Fresh deliveries leased as ingest stores them, for the worker in the same process.

`estafeta serve` ingests and delivers in one process. Left to itself, its worker would learn
of a fresh delivery only after ingest committed it pending, and then spend a statement to
lease it back: PostgreSQL's fixed cost per write statement is the largest part of its CPU
per delivery (bench/README.md). Instead, while the worker has free slots and its last lease
found nothing more waiting, ingest stores the deliveries it may take already in flight under
a lease of that worker, and hands them over once the commit is done: one write less per
delivery, and no wait for the worker's next lease.

What is never handed over, so that leasing's rules still hold:
* a delivery with an ordering key (it may have to wait for an earlier one of its key);
* a delivery to a destination whose circuit is not closed or whose rate limit is spent,
  or that the worker's last lease left out or whose deliveries it gave back unsent since
  (those wait in the store, and go first);
* a delivery to a destination with a `max_in_flight` (the worker leases those for the room
  each has left);
* anything while the worker has a backlog (the last lease filled its batch): fresh
  deliveries then wait their turn behind older ones of the same priority.

A circuit that opens while the batch commits is seen when the worker starts the handed-over
deliveries: those to it go back pending unsent (`Worker._start`), as leased ones do.

A handed-over delivery is an ordinary lease: if the process dies before sending it, the
lease expires and any worker rescues it, as for a lease taken the usual way. A commit that
fails may have landed all the same (the connection dropped after the store committed, before
it answered): the worker gives that batch's leases back as it does a snooze (snooze.py), so
its deliveries do not wait for the lease to expire and spend an attempt never made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Protocol

import msgspec

from estafeta.delivery.model import LeasedDelivery
from estafeta.store.records import DirectLease, InsertResult, NewEvent


class Taker(Protocol):
    """The worker's side (delivery/worker.py)."""

    def reserve(self, events: Sequence[NewEvent]) -> Reservation | None: ...

    def take(self, reservation: Reservation, deliveries: list[LeasedDelivery]) -> bool: ...

    def cancel(self, reservation: Reservation) -> None: ...


class Handoff:
    """Where ingest finds the worker running in its process, if one is."""

    def __init__(self) -> None:
        self._taker: Taker | None = None

    def attach(self, taker: Taker) -> None:
        self._taker = taker

    def detach(self, taker: Taker) -> None:
        if self._taker is taker:
            self._taker = None

    def attached(self, taker: Taker) -> bool:
        return self._taker is taker

    def reserve(self, events: Sequence[NewEvent]) -> Reservation | None:
        """The batch to store, with the deliveries the worker takes under its lease; None
        when no worker runs here or it takes none of them."""
        return None if self._taker is None else self._taker.reserve(events)


@dataclasses.dataclass(frozen=True, slots=True)
class Reservation:
    """Slots a worker keeps for a batch while ingest commits it."""

    taker: Taker
    lease: DirectLease
    events: list[NewEvent]  # the batch as it is stored: taken deliveries under `lease`
    count: int  # deliveries taken (those of events found to be duplicates are dropped)
    leaves_pending: bool  # some deliveries of the batch were not taken: stored pending

    def settle(self, results: Sequence[InsertResult]) -> tuple[list[LeasedDelivery], bool]:
        """After the commit: the taken deliveries of the events stored (a duplicate's were
        never inserted), handed to the worker; and whether the worker took them. When it did
        not (it is stopping), they are the caller's to release."""
        stored = [e for e, result in zip(self.events, results, strict=True) if not result.duplicate]
        leased = self.leased(stored)
        return leased, self.taker.take(self, leased)

    def leased(self, events: Sequence[NewEvent] | None = None) -> list[LeasedDelivery]:
        """The deliveries taken under the lease, of `events` (default: the whole batch)."""
        leased: list[LeasedDelivery] = []
        token, expires_at = self.lease.token, self.lease.expires_at
        for event in self.events if events is None else events:
            payload = event.payload.encode()  # once per event, whatever its fan-out
            leased.extend(
                LeasedDelivery(
                    d.id,
                    event.tenant_id,
                    event.id,
                    d.destination_id,
                    0,  # attempts made before
                    d.max_attempts,
                    d.priority,
                    None,  # ordering key: never handed over with one
                    token,
                    expires_at,
                    payload,
                )
                for d in event.deliveries
                if d.lease is not None
            )
        return leased

    def cancel(self) -> None:
        """The commit failed: the slots are free again. It may have landed all the same
        (the store's answer lost), so the worker gives the lease's deliveries back."""
        self.taker.cancel(self)


def reserve(
    events: Sequence[NewEvent],
    *,
    taker: Taker,
    free: int,
    blocked: Collection[str],
    lease: DirectLease,
) -> Reservation | None:
    """Take up to `free` of the batch's deliveries that may go straight to the worker, best
    priority first (then in arrival order); None when none may."""
    eligible = [
        (d.priority, n, i)
        for n, event in enumerate(events)
        for i, d in enumerate(event.deliveries)
        if d.ordering_key is None and d.destination_id not in blocked
    ]
    if not eligible or free <= 0:
        return None
    leaves_pending = len(eligible) > free or len(eligible) < sum(
        len(event.deliveries) for event in events
    )
    if len(eligible) > free:
        eligible = sorted(eligible)[:free]
    taken: dict[int, set[int]] = {}
    for _, n, i in eligible:
        taken.setdefault(n, set()).add(i)
    stored = list(events)
    for n, indexes in taken.items():
        event = stored[n]
        stored[n] = event.with_deliveries(
            tuple(
                msgspec.structs.replace(d, lease=lease) if i in indexes else d
                for i, d in enumerate(event.deliveries)
            )
        )
    return Reservation(
        taker=taker,
        lease=lease,
        events=stored,
        count=len(eligible),
        leaves_pending=leaves_pending,
    )

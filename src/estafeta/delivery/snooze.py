"""Leases a worker gives back unsent, and when each spent rate limit refills.

A leased (or handed-over) delivery the worker may not send now goes back pending with no
attempt counted, in its place in the queue (its due time unchanged): its destination's rate
limit is spent (delivery/throttle.py), or its circuit opened since the lease (the lease then
holds it back until the circuit lets a probe through). So do those of an ingest batch
reserved for the worker whose commit failed, in case it landed all the same
(delivery/handoff.py). Such a "snooze" is kept here until the store takes it: left to expire,
the lease would be rescued as a failed attempt never made, so a snooze the store refused
(unreachable) is given back at the worker's next step, or when it stops.

Rate-limit snoozes are rare: a lease takes no more of a destination than its budget sends
now (worker.py `_budgets`), so one is given back when other processes spent a shared budget
between the lease and the send, or a fresh delivery handed over found it spent. A spent rate
limit's refill time lets the lease and ingest's hand-over skip the destination until then,
rather than lease its deliveries only to give them back. The time is kept here,
not as the deliveries' due time: due at the refill, they went behind every delivery to the
destination accepted meanwhile, and under a steady stream at the limit never came first.
"""

from __future__ import annotations

from estafeta.clock import Clock
from estafeta.delivery.model import LeasedDelivery
from estafeta.store.sqlstore import SqlStore


class Snoozes:
    """One worker's leases to give back unsent, and its destinations' spent rate limits."""

    def __init__(self, store: SqlStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._throttled_until: dict[str, int] = {}  # destination → Unix ms its budget refills
        # Leases to give back unsent (rate limit spent, circuit not closed); kept until the
        # store takes them: left to expire, they would cost an attempt.
        self._snoozed: list[LeasedDelivery] = []

    def throttled(self, now: int) -> set[str]:
        """The destinations whose rate limit is spent at `now`."""
        return {d for d, until in self._throttled_until.items() if until > now}

    def spent(self, destination_id: str, refills_at: int) -> None:
        """The destination's rate limit is spent until `refills_at` (Unix ms)."""
        self._throttled_until[destination_id] = refills_at

    def add(self, snoozed: list[LeasedDelivery]) -> None:
        """Keep these leases until `release` gives them back."""
        self._snoozed.extend(snoozed)

    async def release(self) -> None:
        """Give the snoozed leases back, pending in their place in the queue; what the store
        does not take now (StoreUnavailable) is tried again at the next step."""
        if self._snoozed:
            await self.store.release(self._snoozed, self.clock.now_ms())
            self._snoozed = []

    def __len__(self) -> int:
        """How many leases are kept, not given back yet."""
        return len(self._snoozed)

"""Leases a worker gives back unsent, and when each spent rate limit refills.

A leased (or handed-over) delivery the worker may not send now goes back pending with no
attempt counted: due when its destination's rate limit refills (delivery/throttle.py), or
due now when its circuit opened since the lease (the lease then holds it back until the
circuit lets a probe through). So do those of an ingest batch reserved for the worker whose
commit failed, in case it landed all the same (delivery/handoff.py). Such a "snooze" is kept
here until the store takes it: left to expire, the lease would be rescued as a failed
attempt never made, so a snooze the store refused (unreachable) is given back at the
worker's next step, or when it stops.

The refill times let the lease and ingest's hand-over skip a destination whose budget is
spent, rather than lease its deliveries only to give them back.
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
        # Leases to give back unsent (rate limit spent, circuit not closed), by when each is
        # due; kept until the store takes them: left to expire, they would cost an attempt.
        self._snoozed: dict[int, list[LeasedDelivery]] = {}

    def throttled(self, now: int) -> set[str]:
        """The destinations whose rate limit is spent at `now`."""
        return {d for d, until in self._throttled_until.items() if until > now}

    def spent(self, destination_id: str, refills_at: int) -> None:
        """The destination's rate limit is spent until `refills_at` (Unix ms)."""
        self._throttled_until[destination_id] = refills_at

    def add(self, snoozed: dict[int, list[LeasedDelivery]]) -> None:
        """Keep these leases, by when each is due, until `release` gives them back."""
        for due, deliveries in snoozed.items():
            self._snoozed.setdefault(due, []).extend(deliveries)

    async def release(self) -> None:
        """Give the snoozed leases back, pending until they are due; what the store does not
        take now (StoreUnavailable) is tried again at the next step."""
        while self._snoozed:
            due, deliveries = next(iter(self._snoozed.items()))
            await self.store.release(deliveries, self.clock.now_ms(), due_at=due)
            del self._snoozed[due]

    def __len__(self) -> int:
        """How many leases are kept, not given back yet."""
        return sum(map(len, self._snoozed.values()))

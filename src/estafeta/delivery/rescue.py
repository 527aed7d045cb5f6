"""What a worker looks for every `worker.rescue_interval_s`, besides its own leases.

* Leases of workers that died: a worker that dies mid-send loses its leases, and any worker
  takes them over once their deadline passes. Each counts as a failed `lease_expired`
  attempt (decide() then retries it with backoff, or dead-letters it), so a delivery that
  kills its worker every time cannot loop forever.
* Destinations the configuration no longer has: their pending deliveries would wait for
  ever, as no lease names them. The worker's loop leases them with the rest, to be
  dead-lettered with the reason (`unknown_destination`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import structlog

from estafeta.clock import Clock
from estafeta.delivery.backoff import DEFAULT_BACKOFF, BackoffPolicy
from estafeta.delivery.decision import decide
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.ids import new_id
from estafeta.store.records import CompletedAttempt
from estafeta.store.sqlstore import SqlStore

log = structlog.get_logger("estafeta.worker")


class Rescue:
    """One worker's share of the rescue, and the orphaned destinations it last found."""

    def __init__(
        self,
        store: SqlStore,
        *,
        clock: Clock,
        rand: Callable[[], float],
        policies: dict[str, BackoffPolicy],
        lease_ms: int,
        worker_id: str,
        destinations: Collection[str],
        interval_s: float,
    ) -> None:
        self.store = store
        self.clock = clock
        self.lease_ms = lease_ms
        self.worker_id = worker_id
        self._rand = rand
        self._policies = policies
        self._destinations = destinations  # every destination a lease may name
        self._interval_s = interval_s
        self._next_rescue = 0.0
        # Destinations of pending deliveries that the configuration no longer has, found
        # every rescue interval and leased with the rest, to be dead-lettered with the reason.
        self.orphans: set[str] = set()

    async def if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_rescue:
            return
        self._next_rescue = now + self._interval_s
        await self.expired()
        orphans = await self.store.pending_destinations() - set(self._destinations)
        if orphans - self.orphans:
            log.warning("unknown_destinations", destinations=sorted(orphans))
        self.orphans = orphans

    async def expired(self) -> int:
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

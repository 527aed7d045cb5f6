"""What a worker looks for every `worker.rescue_interval_s`, besides its own leases.

* Leases of workers that died: a worker that dies mid-send loses its leases, and any worker
  takes them over once their deadline passes. Each counts as a failed `lease_expired`
  attempt (decide() then retries it with backoff, or dead-letters it), so a delivery that
  kills its worker every time cannot loop forever.
* Destinations the configuration does not have. One that a live process names (presence.py:
  a rolling change of the configuration is under way, and processes on the newer file send
  its deliveries) is left to them, and logged once as `destination_configured_elsewhere`.
  One that no live process names is an orphan: its pending deliveries would wait for ever,
  as no lease names them. They are made due (those waiting for a retry too), and the
  worker's loop leases them with the rest, to be dead-lettered with the reason
  (`unknown_destination`). Its circuit, if one is on record, is forgotten:
  nothing would ever probe it again.

Both reads run every rescue interval, and the second only while some pending delivery or
circuit on record names a destination this worker does not know (the write that makes
orphans' deliveries due, only while there are orphans): the lease itself reads nothing
more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import structlog

from estafeta.clock import Clock
from estafeta.delivery.attempts import governed
from estafeta.delivery.backoff import DEFAULT_BACKOFF, BackoffPolicy
from estafeta.delivery.breakers import Breakers
from estafeta.delivery.decision import decide
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.delivery.presence import LIVE_WINDOW_S
from estafeta.ids import new_id
from estafeta.observability.metrics import ATTEMPTS, DEAD_LETTERED, series
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
        limits: dict[str, int],
        lease_ms: int,
        worker_id: str,
        destinations: Collection[str],
        interval_s: float,
        started_ms: int,
        breakers: Breakers | None = None,
    ) -> None:
        """`breakers`: the worker's, whose circuits of destinations no process names any
        more are forgotten (none: circuits are left alone)."""
        self.store = store
        self._breakers = breakers
        self.clock = clock
        self.lease_ms = lease_ms
        self.worker_id = worker_id
        self._rand = rand
        self._policies = policies
        self._limits = limits
        self._destinations = destinations  # every destination a lease may name
        self._interval_s = interval_s
        self._started_ms = started_ms  # the process's start (store/processes.py says why)
        self._next_rescue = 0.0
        # Destinations of pending deliveries that the configuration does not have and no
        # live process names, found every rescue interval and leased with the rest, to be
        # dead-lettered with the reason.
        self.orphans: set[str] = set()
        # Those another live process names: left to it (logged when the set grows).
        self.elsewhere: set[str] = set()

    async def if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_rescue:
            return
        self._next_rescue = now + self._interval_s
        await self.expired()
        known = set(self._destinations)
        unknown = await self.store.pending_destinations() - known
        circuits = self._breakers.on_record() - known if self._breakers else set()
        live = await self._live() if unknown or circuits else set()
        elsewhere = unknown & live
        orphans = unknown - elsewhere
        if orphans - self.orphans:
            log.warning("unknown_destinations", destinations=sorted(orphans))
        self.orphans = orphans
        if orphans:
            # Those waiting for a retry (up to backoff.max_s, an hour by default) would be
            # dead-lettered only then, long after the rest were discarded: due now, they go
            # with them.
            await self.store.due_now(orphans, self.clock.now_ms())
        self._configured_elsewhere(elsewhere)
        if self._breakers is not None:
            for destination_id in sorted(circuits - live):
                await self._breakers.forget(destination_id)

    async def given_back(self, batch: list[LeasedDelivery]) -> list[LeasedDelivery]:
        """Of a leased batch, the deliveries to orphans that a live process names now (one
        that started since the last rescue): not to be dead-lettered, but given back unsent
        for it to send. Their destinations are orphans no more."""
        leased = {d.destination_id for d in batch} & self.orphans
        if not leased:
            return []
        named = leased & await self._live()
        if not named:
            return []
        self.orphans -= named
        self._configured_elsewhere(self.elsewhere | named)
        return [d for d in batch if d.destination_id in named]

    async def _live(self) -> set[str]:
        """The destinations that live processes name (presence.py, store/processes.py)."""
        return await self.store.live_destinations(
            seen_since_ms=self.clock.now_ms() - int(LIVE_WINDOW_S * 1000),
            started_ms=self._started_ms,
        )

    def _configured_elsewhere(self, elsewhere: set[str]) -> None:
        if elsewhere - self.elsewhere:
            log.warning(
                "destination_configured_elsewhere",
                destinations=sorted(elsewhere),
                worker=self.worker_id,
            )
        self.elsewhere = elsewhere

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
            for d in (governed(c, self._limits) for c in claimed)
        ]
        done = await self.store.complete_batch(batch, now_ms)
        for item in batch:  # as attempts.py counts the sends it records, and their deaths
            # The dead worker never counted this attempt (it counts once a send returns).
            series(ATTEMPTS, item.delivery.destination_id, lost.kind.value).inc()
            if item.delivery.id in done.dead:
                DEAD_LETTERED.labels(item.delivery.destination_id).inc()
        log.warning("leases_rescued", count=len(batch), worker=self.worker_id)
        return len(batch)

"""The alerts of a `serve` process, checked every 5 s:

* `queue_backlog`: pending deliveries pile up past `worker.alert_queue_depth`. Ingress keeps
  accepting (what it accepts is durable); an operator must hear that delivery falls behind.
  It fires when the depth crosses the threshold and resolves when it is back under 90 % of
  it (hysteresis, so a queue hovering at the line does not flap).
* `dead_letters`: deliveries wait in the dead-letter queue (`worker.alert_dead_letters`, 1 by
  default). Nothing retries them on their own, and a permanent refusal (a CRM's expired
  token answering 401) sends every delivery there at its first attempt without opening the
  circuit: only this says so. It resolves once they are replayed or discarded.
* `spool_stalled`: the spool holds events, the store answers, and the drain has got nowhere
  for a minute (`spool_watch.STALL_S`): the drainer is stuck, keeps crashing or does not run.
* `spool_unwritable`: no segment can be made in the spool's directory: the next store outage
  would be answered `503 spool_unavailable` instead of spooled.
* `spool_full`: the spool holds `storage.spool_max_bytes`: while the store cannot be reached,
  webhooks are answered `503 spool_full`, and providers retry them later or give up.
* `destination_down`: a destination's circuit has not closed for
  `worker.alert_destination_down_s`. Its deliveries wait pending without spending attempts
  (so nothing reaches the DLQ), and a small business's backlog may never reach
  `queue_backlog`'s depth: without this, a CRM down all day would go unheard.
* `no_workers`: deliveries wait and no process (`estafeta worker`, or a `serve` with its
  workers, this one included) has delivered for `worker.alert_no_workers_s`, by the store's
  record of processes (delivery/presence.py): none runs, or each one's delivery task keeps
  crashing. Ingest goes on accepting, so without this a worker that never started or keeps
  crashing was heard of only once the backlog reached `queue_backlog`'s depth, days later
  at a clinic's traffic. The time counts from this process's start, and from the last
  time it found the store unreachable (processes cannot record themselves then), at the
  earliest. It resolves when one delivers again or nothing waits.

Each fires once and resolves once; both are log events (`alert_fired` / `alert_resolved`),
the `estafeta_alert_firing` gauge, and a line in /health/detailed. `destination_down` does
so per destination (its log events name it), the gauge and the line while any is down.
Sending alerts elsewhere is the alerting issue's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from typing import Any

import structlog

from estafeta.clock import Clock, SystemClock, iso_from_ms
from estafeta.delivery.circuit import CircuitState
from estafeta.delivery.circuit_store import CircuitStateStore
from estafeta.errors import StoreUnavailable
from estafeta.ingress.spool import Spool
from estafeta.observability.metrics import ALERTS
from estafeta.observability.reads import within
from estafeta.observability.spool_watch import STALL_S, SpoolStatus, observe
from estafeta.store.records import QueueDepths
from estafeta.store.sqlstore import SqlStore

log = structlog.get_logger("estafeta.alerts")

BACKLOG = "queue_backlog"
DEAD_LETTERS = "dead_letters"
SPOOL_STALLED = "spool_stalled"
SPOOL_UNWRITABLE = "spool_unwritable"
SPOOL_FULL = "spool_full"
SPOOL_ALERTS = (SPOOL_STALLED, SPOOL_UNWRITABLE, SPOOL_FULL)
DESTINATION_DOWN = "destination_down"
NO_WORKERS = "no_workers"
RESOLVE_RATIO = 0.9


class AlertMonitor:
    def __init__(
        self,
        store: SqlStore,
        *,
        threshold: int,
        dead_threshold: int = 1,
        spool: Spool | None = None,
        circuits: CircuitStateStore | None = None,
        destinations: Collection[str] = (),
        down_after_s: float = 300.0,
        watch_workers: bool = False,
        no_workers_after_s: float = 120.0,
        clock: Clock | None = None,
        interval_s: float = 5.0,
    ) -> None:
        self.store = store
        self.threshold = threshold
        self.dead_threshold = dead_threshold
        self.spool = spool
        self.circuits = circuits
        # Those of this process's configuration: a circuit left open on record by a
        # destination since removed (no delivery will probe it again) is not an outage.
        self.destinations = frozenset(destinations)
        self.down_after_ms = round(down_after_s * 1000)
        self.clock: Clock = clock or SystemClock()
        self.interval_s = interval_s
        self.watch_workers = watch_workers
        self.no_workers_after_ms = round(no_workers_after_s * 1000)
        # A worker started just after this process is not missing, nor one that could not
        # record itself while the store was unreachable: its absence counts from the later
        # of the two at the earliest.
        self.started_ms = self.clock.now_ms()
        self._unreachable_ms = 0
        self.firing: set[str] = set()
        # Destinations whose circuit is not closed, since when (as first seen: its opened_at,
        # which a failed probe moves on, is kept from the outage's start), and those of them
        # alerted on.
        self._down_since: dict[str, int] = {}
        self.down: set[str] = set()
        alerts = [BACKLOG, DEAD_LETTERS]
        if spool is not None:
            alerts.extend(SPOOL_ALERTS)
        if circuits is not None:
            alerts.append(DESTINATION_DOWN)
        if watch_workers:
            alerts.append(NO_WORKERS)
        for alert in alerts:
            ALERTS.labels(alert).set(0)

    async def check(self) -> None:
        try:
            depths = await self.store.queue_depths()
        except StoreUnavailable:  # the spool covers that; the backlog waits for next round
            store_reachable = False
            self._unreachable_ms = self.clock.now_ms()
        else:
            store_reachable = True
            pending = depths.pending
            if pending >= self.threshold:
                self._fire(BACKLOG, pending=pending, threshold=self.threshold)
            elif pending < self.threshold * RESOLVE_RATIO:
                self._resolve(BACKLOG, pending=pending, threshold=self.threshold)
            if depths.dead >= self.dead_threshold:
                self._fire(DEAD_LETTERS, dead=depths.dead, threshold=self.dead_threshold)
            else:
                self._resolve(DEAD_LETTERS, dead=depths.dead, threshold=self.dead_threshold)
            if self.watch_workers:
                await self._check_workers(depths)
        if self.circuits is not None:
            await self._check_destinations(self.circuits)
        if self.spool is None:
            return
        state = await observe(
            self.spool, store_reachable=store_reachable, now_ms=self.clock.now_ms()
        )
        if state.status is SpoolStatus.UNWRITABLE:
            self._fire(SPOOL_UNWRITABLE, error=state.error)
        else:
            self._resolve(SPOOL_UNWRITABLE)
        # By its bytes, not its status: a full spool on a full disk is `unwritable` too.
        if state.stats.bytes >= self.spool.max_bytes:
            self._fire(SPOOL_FULL, bytes=state.stats.bytes, max_bytes=self.spool.max_bytes)
        else:
            self._resolve(SPOOL_FULL, bytes=state.stats.bytes)
        if state.stalled:
            self._fire(
                SPOOL_STALLED,
                segments=state.stats.segments,
                waiting_s=round(state.waiting_s or 0.0, 1),
                stall_s=STALL_S,
            )
        elif store_reachable or not state.stats.segments:  # an outage says nothing of it
            self._resolve(SPOOL_STALLED, segments=state.stats.segments)

    async def _check_destinations(self, circuits: CircuitStateStore) -> None:
        try:
            known = await within(circuits.get_all())
        except (StoreUnavailable, TimeoutError):  # unknown this round: nothing changes
            return
        now = self.clock.now_ms()
        down = {
            d: c
            for d, c in known.items()
            if c.state is not CircuitState.CLOSED and d in self.destinations
        }
        self._down_since = {
            d: self._down_since.get(d, min(c.opened_at or now, now)) for d, c in down.items()
        }
        for destination in sorted(self.down - down.keys()):
            self.down.discard(destination)
            log.info("alert_resolved", alert=DESTINATION_DOWN, destination=destination)
        for destination, since in sorted(self._down_since.items()):
            if destination not in self.down and now - since >= self.down_after_ms:
                self.down.add(destination)
                log.warning(
                    "alert_fired",
                    alert=DESTINATION_DOWN,
                    destination=destination,
                    circuit=down[destination].state.value,
                    since=iso_from_ms(since),
                    down_s=round((now - since) / 1000),
                )
        # The gauge and /health/detailed's line: while any destination is down.
        if self.down:
            self.firing.add(DESTINATION_DOWN)
        else:
            self.firing.discard(DESTINATION_DOWN)
        ALERTS.labels(DESTINATION_DOWN).set(1 if self.down else 0)

    async def _check_workers(self, depths: QueueDepths) -> None:
        # In flight too: leased to a worker that died, they wait for a live one's rescue.
        pending, in_flight = depths.pending, depths.in_flight
        if not pending and not in_flight:
            self._resolve(NO_WORKERS, pending=0, in_flight=0)
            return
        try:
            last = await within(self.store.last_delivering_at())
        except (StoreUnavailable, TimeoutError):  # unknown this round: nothing changes
            self._unreachable_ms = self.clock.now_ms()
            return
        now = self.clock.now_ms()
        since = max(last or 0, self.started_ms, self._unreachable_ms)
        if now - since >= self.no_workers_after_ms:
            self._fire(
                NO_WORKERS,
                pending=pending,
                in_flight=in_flight,
                last_seen=None if last is None else iso_from_ms(last),
            )
        else:
            self._resolve(NO_WORKERS, pending=pending, in_flight=in_flight)

    def _fire(self, alert: str, **fields: Any) -> None:
        if alert not in self.firing:
            self.firing.add(alert)
            ALERTS.labels(alert).set(1)
            log.warning("alert_fired", alert=alert, **fields)

    def _resolve(self, alert: str, **fields: Any) -> None:
        if alert in self.firing:
            self.firing.discard(alert)
            ALERTS.labels(alert).set(0)
            log.info("alert_resolved", alert=alert, **fields)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

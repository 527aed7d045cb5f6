"""The alerts of a `serve` process, checked every 5 s:

* `queue_backlog`: pending deliveries pile up past `worker.alert_queue_depth`. Ingress keeps
  accepting (what it accepts is durable); an operator must hear that delivery falls behind.
  It fires when the depth crosses the threshold and resolves when it is back under 90 % of
  it (hysteresis, so a queue hovering at the line does not flap).
* `spool_stalled`: the spool holds events, the store answers, and the drain has got nowhere
  for a minute (`spool_watch.STALL_S`): the drainer is stuck, keeps crashing or does not run.
* `spool_unwritable`: no segment can be made in the spool's directory: the next store outage
  would be answered `503 spool_unavailable` instead of spooled.
* `spool_full`: the spool holds `storage.spool_max_bytes`: while the store cannot be reached,
  webhooks are answered `503 spool_full`, and providers retry them later or give up.

Each fires once and resolves once; both are log events (`alert_fired` / `alert_resolved`),
the `estafeta_alert_firing` gauge, and a line in /health/detailed. Sending alerts elsewhere
is the alerting issue's.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from estafeta.clock import Clock, SystemClock
from estafeta.errors import StoreUnavailable
from estafeta.ingress.spool import Spool
from estafeta.observability.metrics import ALERTS
from estafeta.observability.spool_watch import STALL_S, SpoolStatus, observe
from estafeta.store.sqlstore import SqlStore

log = structlog.get_logger("estafeta.alerts")

BACKLOG = "queue_backlog"
SPOOL_STALLED = "spool_stalled"
SPOOL_UNWRITABLE = "spool_unwritable"
SPOOL_FULL = "spool_full"
SPOOL_ALERTS = (SPOOL_STALLED, SPOOL_UNWRITABLE, SPOOL_FULL)
RESOLVE_RATIO = 0.9


class AlertMonitor:
    def __init__(
        self,
        store: SqlStore,
        *,
        threshold: int,
        spool: Spool | None = None,
        clock: Clock | None = None,
        interval_s: float = 5.0,
    ) -> None:
        self.store = store
        self.threshold = threshold
        self.spool = spool
        self.clock: Clock = clock or SystemClock()
        self.interval_s = interval_s
        self.firing: set[str] = set()
        for alert in (BACKLOG, *SPOOL_ALERTS) if spool else (BACKLOG,):
            ALERTS.labels(alert).set(0)

    async def check(self) -> None:
        try:
            pending = await self.store.pending_count()
        except StoreUnavailable:  # the spool covers that; the backlog waits for next round
            store_reachable = False
        else:
            store_reachable = True
            if pending >= self.threshold:
                self._fire(BACKLOG, pending=pending, threshold=self.threshold)
            elif pending < self.threshold * RESOLVE_RATIO:
                self._resolve(BACKLOG, pending=pending, threshold=self.threshold)
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

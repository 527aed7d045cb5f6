"""The backlog alert: when pending deliveries pile up past `worker.alert_queue_depth`.

Ingress keeps accepting (what it accepts is durable); an operator must hear that delivery
falls behind. The alert fires once when the depth crosses the threshold and resolves once
when it is back under 90 % of it (hysteresis, so a queue hovering at the line does not
flap); both are log events (`alert_fired` / `alert_resolved`), the `estafeta_alert_firing`
gauge, and a line in /health/detailed. Sending alerts elsewhere is the alerting issue's.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from estafeta.errors import StoreUnavailable
from estafeta.observability.metrics import ALERTS
from estafeta.store.sqlstore import SqlStore

log = structlog.get_logger("estafeta.alerts")

BACKLOG = "queue_backlog"
RESOLVE_RATIO = 0.9


class BacklogMonitor:
    def __init__(self, store: SqlStore, *, threshold: int, interval_s: float = 5.0) -> None:
        self.store = store
        self.threshold = threshold
        self.interval_s = interval_s
        self.firing: set[str] = set()
        ALERTS.labels(BACKLOG).set(0)

    async def check(self) -> None:
        pending = await self.store.pending_count()
        if BACKLOG not in self.firing and pending >= self.threshold:
            self.firing.add(BACKLOG)
            ALERTS.labels(BACKLOG).set(1)
            log.warning("alert_fired", alert=BACKLOG, pending=pending, threshold=self.threshold)
        elif BACKLOG in self.firing and pending < self.threshold * RESOLVE_RATIO:
            self.firing.discard(BACKLOG)
            ALERTS.labels(BACKLOG).set(0)
            log.info("alert_resolved", alert=BACKLOG, pending=pending, threshold=self.threshold)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(StoreUnavailable):  # the spool covers that; next round
                await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

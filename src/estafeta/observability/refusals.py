"""Webhooks refused at `/in/{source}`, made visible.

A provider whose every webhook is refused retries for a while and then drops them: a
rotated WhatsApp app secret or Twilio auth token, a proxy that changes the URL Twilio
signed, a typo in the source id of the URL configured at the provider, a rate limit too
tight for a campaign. Each refusal is counted (`estafeta_ingest_refused_total`, by source
and error code) and logged as `ingest_refused`, at most once a minute per source and
error with how many there were since the last line: a flood of bad requests cannot flood
the log, and a steady failure is still seen every minute it lasts.

The refusals of each configured source since it last had an event accepted are kept as a
streak (`Streak`): the `webhooks_refused` alert (observability/monitor.py) fires on a streak
that lasts, and an accepted event ends it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from estafeta.clock import Clock, SystemClock
from estafeta.observability.log_throttle import LOG_EVERY_S, LogThrottle
from estafeta.observability.metrics import INGEST_REFUSED, series

log = structlog.get_logger("estafeta.ingress")

__all__ = ["LOG_EVERY_S", "Refusals", "Streak"]

_ID_LIMIT = 63  # a source id's longest form; what an unknown source's path says is cut to it


@dataclass(slots=True)
class Streak:
    """A configured source's refusals since it last had an event accepted (Unix ms)."""

    first_at: int
    count: int
    error: str  # the last one's


class Refusals:
    """Counts and logs this process's refused webhooks (see the module's docstring)."""

    def __init__(
        self, monotonic: Callable[[], float] = time.monotonic, clock: Clock | None = None
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        self._logged = LogThrottle(monotonic=monotonic)  # by (source, error)
        # Configured sources refused since their last accepted event.
        self.streaks: dict[str, Streak] = {}

    def accepted(self, source_id: str) -> None:
        """An event of `source_id` was accepted, or its handshake answered: whatever was
        refused before, it works now."""
        if self.streaks:  # on every event: a dict lookup only while some source is refused
            self.streaks.pop(source_id, None)

    def note(self, source_id: str, *, known: bool, status: int, error: str) -> None:
        """One refusal of a request to `/in/{source_id}` (`known`: a configured source)."""
        label = source_id if known else ""
        series(INGEST_REFUSED, label, error).inc()
        if known:
            streak = self.streaks.get(source_id)
            if streak is None:
                self.streaks[source_id] = Streak(self._clock.now_ms(), 1, error)
            else:
                streak.count, streak.error = streak.count + 1, error
        unlogged = self._logged.due((label, error))
        if unlogged is None:
            return
        log.warning(
            "ingest_refused",
            source=source_id[:_ID_LIMIT] if known else None,
            unknown_source=None if known else source_id[:_ID_LIMIT],
            status=status,
            error=error,
            count=unlogged,
        )

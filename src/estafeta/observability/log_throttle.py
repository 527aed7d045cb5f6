"""Log lines that a lasting failure would repeat for every request, kept few.

While the store is unreachable every webhook is spooled and every API call answered 503;
one line each would fill the log (and its storage bill) with the same line hundreds of
times a second, and bury whatever else the incident says. `LogThrottle` lets the first line
of a kind through at once, then at most one a minute carrying how many occurrences there
were since the last line: a failure is still seen at once and every minute it lasts, and
the metrics keep the exact counts. `ingest_refused` (refusals.py) is throttled the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

LOG_EVERY_S = 60.0


class LogThrottle:
    """When a line of each kind (`key`) is due, and the occurrences it carries."""

    def __init__(
        self, every_s: float = LOG_EVERY_S, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._every_s = every_s
        self._monotonic = monotonic
        # key → (when its last line was logged, occurrences since then)
        self._since_logged: dict[Hashable, tuple[float, int]] = {}

    def due(self, key: Hashable = None, count: int = 1) -> int | None:
        """Note `count` occurrences of `key`: the count to log if a line is due now (those
        since the last line, these included), else None."""
        now = self._monotonic()
        logged_at, unlogged = self._since_logged.get(key, (None, 0))
        unlogged += count
        if logged_at is not None and now - logged_at < self._every_s:
            self._since_logged[key] = (logged_at, unlogged)
            return None
        self._since_logged[key] = (now, 0)
        return unlogged

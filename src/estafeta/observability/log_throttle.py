"""Log lines that a lasting failure would repeat for every request, kept few.

While the store is unreachable every webhook is spooled and every API call answered 503;
one line each would fill the log (and its storage bill) with the same line hundreds of
times a second, and bury whatever else the incident says. `LogThrottle` lets the first line
of a kind through at once, then at most one a minute carrying how many occurrences there
were since the last line: a failure is still seen at once and every minute it lasts, and
the metrics keep the exact counts. `ingest_refused` (refusals.py) is throttled the same way,
and so are uvicorn's lines for each request it refuses itself (`ServerLines`).
"""

from __future__ import annotations

import logging
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


# uvicorn's lines for a request it refuses before estafeta sees it: one per request, so a
# flood of them (past `server.max_concurrent_requests`, or bytes that are no HTTP: a TLS
# handshake on the plain port, a scanner) wrote as many lines, when the process could least
# afford it.
PER_REQUEST_SERVER_LINES = frozenset(
    {
        "Exceeded concurrency limit.",
        # http_protocol.py's, the parser's reason its argument: one key whatever the reason.
        "Invalid HTTP request received: %s",
        "Unsupported upgrade request.",  # a CONNECT (an ignored h2c offer logs nothing)
    }
)


class ServerLines(logging.Filter):
    """Throttles uvicorn's per-request lines as `LogThrottle` does ours: the first at once,
    then at most one a minute saying how many there were since the last. Its other lines
    (a failed start, a bug's traceback) pass as they are."""

    def __init__(self, throttle: LogThrottle | None = None) -> None:
        super().__init__()
        self._throttle = throttle or LogThrottle()

    def filter(self, record: logging.LogRecord) -> bool:
        # Keyed by the message's format, not its text: reasons vary, the kind does not.
        if record.msg not in PER_REQUEST_SERVER_LINES:
            return True
        count = self._throttle.due(record.msg)
        if count is None:
            return False
        if count > 1:
            record.msg = f"{record.msg} ({count} since the last such line)"
        return True


def throttle_server_lines(logger: logging.Logger) -> None:
    """Give uvicorn's `logger` a `ServerLines` of its own, in place of any earlier one (a
    server's logging configuration keeps the filters of the one before)."""
    for earlier in [f for f in logger.filters if isinstance(f, ServerLines)]:
        logger.removeFilter(earlier)
    logger.addFilter(ServerLines())

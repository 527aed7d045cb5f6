"""Connections PostgreSQL is about to end for idleness (`idle_session_timeout`).

The server ends a session left idle that long. A process that sees the goodbye at once
replaces the connection before its next use (postgres.py, held.py), but one that is busy at
that instant (a second's work on the event loop, a machine short of CPU) reads it only
after it has handed the connection out again: the next statement then fails as in an
outage, every request that took an ended connection answered 503, every webhook spooled.
Nothing about such a connection shows it ended, so the limit itself is kept: each
connection reads it when made, and one idle for half of it is closed instead of used. The
other half is room for the lateness of a busy process, whose clock for the idle spell
starts when it sees the last answer, after the server's has.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

# Keys in the pool entry's `info`, which SQLAlchemy clears whenever it replaces the connection.
_LIMIT_S = "estafeta_idle_limit_s"
_IDLE_SINCE = "estafeta_idle_since"


def learn_limit(info: MutableMapping[str, Any], setting: str | None) -> None:
    """Keep the session's `idle_session_timeout` (its `pg_settings.setting`, milliseconds)."""
    limit_ms = int(setting) if setting else 0
    if limit_ms > 0:
        info[_LIMIT_S] = limit_ms / 1000


def went_idle(info: MutableMapping[str, Any]) -> None:
    """The connection's statement has ended; it waits for the next."""
    info[_IDLE_SINCE] = time.monotonic()


def nearly_ended(info: MutableMapping[str, Any]) -> bool:
    """Whether the server may end (or have ended) the connection before its next statement
    reaches it: idle for half the session's limit or more."""
    limit_s: float | None = info.get(_LIMIT_S)
    since: float | None = info.get(_IDLE_SINCE)
    if limit_s is None or since is None:
        return False
    return time.monotonic() - since >= limit_s / 2

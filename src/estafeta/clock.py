"""Time, injected: every policy takes `now_ms` so tests can drive the clock."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Protocol

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """The wall clock, in Unix milliseconds."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


def iso_from_ms(ms: int) -> str:
    """`2026-11-21T13:05:00.123Z` from Unix milliseconds."""
    return f"{_iso_second(ms // 1000)}.{ms % 1000:03d}Z"


@lru_cache(maxsize=64)
def _iso_second(seconds: int) -> str:
    # Every event of the same second shares this prefix: formatting it once is enough.
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def ms_from_iso(text: str) -> int:
    """Unix milliseconds from an ISO 8601 timestamp (a trailing `Z` means UTC)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)  # exact: no float rounding

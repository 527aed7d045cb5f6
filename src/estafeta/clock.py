"""Time, injected: every policy takes `now_ms` so tests can drive the clock."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Protocol

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# A timer that fires this much later than it was due shows the process was busy (its event
# loop blocked: a large body parsed, a GC pause, a machine short of CPU; uvloop's timers
# otherwise keep to a millisecond). An answer may then wait unread, to be read in the same
# turn as the timer runs, before the task waiting for it: a deadline found this late looks
# again instead of taking the answer for missing (delivery/expiry.py, store/group_commit.py).
LATE_S = 0.05


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """The wall clock, in Unix milliseconds."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


def _boottime_reader() -> Callable[[], int]:
    """A clock no one sets: CLOCK_BOOTTIME (counts a suspended VM's sleep), else monotonic.
    Chosen once, as a C callable: it is read for every timestamp of the hot paths."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic_ns
    return functools.partial(time.clock_gettime_ns, boottime)


_ticks_ns = _boottime_reader()

# A read of the store's time slower than this is not taken once the clock has one: taken as
# read halfway through, it may be off by half its round trip, and a busy process's read
# waits for a pooled connection (seconds) before the store answers at once. Two processes
# may then disagree by up to this much, within a slow destination's lease margin (1 s).
MAX_SYNC_ROUND_TRIP_MS = 500


class StoreClock:
    """Wall time as the store's own clock tells it, for the processes that share the store.

    Lease deadlines, due times and presence are written by one process and compared by
    another, on another machine: each process reading its own wall clock, one 2 minutes ahead
    took over live leases and sent them again. Every process instead reads the store's clock
    at `sync` (PostgreSQL's server; SQLite's is the machine's own) and counts on from it with
    a clock no one sets, so a wall clock stepped by NTP in between moves nothing either. Until
    the first `sync`, it counts on from `wall`.
    """

    def __init__(
        self,
        read_ms: Callable[[], Awaitable[int]],
        *,
        wall: Clock | None = None,
        ticks_ns: Callable[[], int] = _ticks_ns,
    ) -> None:
        self._read_ms = read_ms
        self._ticks_ns = ticks_ns
        self._base_ms = (wall or SystemClock()).now_ms()
        self._base_ticks = ticks_ns()
        self._synced = False

    def now_ms(self) -> int:
        return self._base_ms + (self._ticks_ns() - self._base_ticks) // 1_000_000

    async def sync(self) -> None:
        """Take the store's time again (raises what reading it raises: nothing changes; a
        read slower than MAX_SYNC_ROUND_TRIP_MS changes nothing either, but the first)."""
        before = self._ticks_ns()
        store_ms = await self._read_ms()
        after = self._ticks_ns()
        round_trip_ms = (after - before) // 1_000_000
        if self._synced and round_trip_ms > MAX_SYNC_ROUND_TRIP_MS:
            return  # counting on is closer than this guess (the wall clock is not: the first)
        # The store read its clock about halfway through the round trip.
        self._base_ms = store_ms + round_trip_ms // 2
        self._base_ticks = after
        self._synced = True


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

"""What state the spool is in, as an operator needs to hear it (`/health/detailed`, alerts).

* `ok`: empty, and a segment could be made in its directory now;
* `spooling`: it holds events and the store cannot be reached: they wait for the store;
* `draining`: it holds events and the store answers: the drainer imports them. `stalled`
  once the drain has got nowhere for `STALL_S`: counted from the latest of the oldest
  waiting event's arrival, the drain's last progress (a round that got through, a segment
  imported, or the spool found empty), the last time this process found the store
  unreachable (the alerts look every 5 s) and the process's start. So the events of a long
  outage are not "late" the moment the store is back, and a drainer that is stuck, keeps
  crashing or does not run is found within a minute;
* `unwritable`: no segment can be made in the directory (gone, not writable, disk full):
  ingest works while the store does, and would answer `503 spool_unavailable` once it did not;
* `full`: it holds `storage.spool_max_bytes` or more: while the store cannot be reached,
  ingest answers `503 spool_full` (providers retry later, or give up).

`degraded` (unwritable, full, or stalled) makes the health answer "degraded", never a 503: only
an unreachable store does that.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum

from estafeta.ingress.spool import Spool, SpoolStats

# A normal drain imports a segment (16 MiB at most) in seconds and gets through a round
# within the drainer's 1 s pause: a minute without progress is a drainer that does not work.
STALL_S = 60.0


class SpoolStatus(StrEnum):
    OK = "ok"
    SPOOLING = "spooling"
    DRAINING = "draining"
    UNWRITABLE = "unwritable"
    FULL = "full"


@dataclass(frozen=True, slots=True)
class SpoolHealth:
    status: SpoolStatus
    stats: SpoolStats
    waiting_s: float | None  # how long events have waited with no progress; None when empty
    stalled: bool
    error: str | None  # why it cannot be written

    @property
    def degraded(self) -> bool:
        return self.status in (SpoolStatus.UNWRITABLE, SpoolStatus.FULL) or self.stalled


def judge(
    stats: SpoolStats,
    *,
    unwritable: str | None,
    store_reachable: bool,
    progress_at: int,  # the latest of the drain's progress and an outage seen
    now_ms: int,
    max_bytes: int,
    stall_s: float = STALL_S,
) -> SpoolHealth:
    """The spool's state from what was observed of it (pure: no I/O, no clock)."""
    waiting_s: float | None = None
    if stats.segments and stats.oldest_at is not None:
        waiting_s = max(0.0, (now_ms - max(stats.oldest_at, progress_at)) / 1000)
    stalled = store_reachable and waiting_s is not None and waiting_s >= stall_s
    if unwritable is not None:
        status = SpoolStatus.UNWRITABLE
    elif stats.bytes >= max_bytes:
        status = SpoolStatus.FULL
    elif not stats.segments:
        status = SpoolStatus.OK
    else:
        status = SpoolStatus.DRAINING if store_reachable else SpoolStatus.SPOOLING
    return SpoolHealth(status, stats, waiting_s, stalled, unwritable)


def judged(
    spool: Spool,
    stats: SpoolStats,
    *,
    unwritable: str | None,
    store_reachable: bool,
    now_ms: int,
) -> SpoolHealth:
    """The spool's state now, given what it holds (`Spool.listed()`) and whether it can be
    written; an unreachable store is remembered, so that the drain's minute starts once the
    store is back."""
    if not store_reachable:
        spool.outage_seen_at = max(spool.outage_seen_at, now_ms)
    if not stats.segments:
        # Nothing waits, so the drain is up to date: counted from its last round with
        # something to drain instead (hours ago on a quiet hub), a file moved back from
        # quarantine/, named as old as its segment, read `stalled` the moment it was back.
        spool.progress_at = max(spool.progress_at, now_ms)
    return judge(
        stats,
        unwritable=unwritable,
        store_reachable=store_reachable,
        progress_at=max(spool.progress_at, spool.outage_seen_at),
        now_ms=now_ms,
        max_bytes=spool.max_bytes,
    )


async def observe(spool: Spool, *, store_reachable: bool, now_ms: int) -> SpoolHealth:
    """The spool's state now: its files and a check that it can be written, both bounded."""
    stats, unwritable = await asyncio.gather(spool.listed(), spool.unwritable())
    return judged(
        spool, stats, unwritable=unwritable, store_reachable=store_reachable, now_ms=now_ms
    )

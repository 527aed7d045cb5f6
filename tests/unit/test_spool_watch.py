"""The spool's state as /health/detailed and the alerts tell it (spool_watch.judge)."""

from __future__ import annotations

import pytest

from estafeta.ingress.spool import SpoolStats
from estafeta.observability.spool_watch import STALL_S, SpoolStatus, judge

NOW = 1_700_000_000_000
MINUTE = 60_000
EMPTY = SpoolStats(bytes=0, segments=0, oldest_at=None)
MAX_BYTES = 1 << 20


def held(since_ms: int) -> SpoolStats:
    return SpoolStats(bytes=100, segments=1, oldest_at=since_ms)


def full(since_ms: int) -> SpoolStats:
    return SpoolStats(bytes=MAX_BYTES, segments=3, oldest_at=since_ms)


@pytest.mark.parametrize(
    ("stats", "unwritable", "reachable", "progress_at", "status", "stalled"),
    [
        (EMPTY, None, True, NOW - 10 * MINUTE, SpoolStatus.OK, False),
        (EMPTY, None, False, NOW - 10 * MINUTE, SpoolStatus.OK, False),
        # The store is down: events wait for it, however long; that is the store's alert.
        (held(NOW - 10 * MINUTE), None, False, NOW - 10 * MINUTE, SpoolStatus.SPOOLING, False),
        # The store answers, the drainer has not come round yet.
        (held(NOW - 5_000), None, True, NOW - 10 * MINUTE, SpoolStatus.DRAINING, False),
        # The events of a ten-minute outage, the store just back and the drain under way.
        (held(NOW - 10 * MINUTE), None, True, NOW - 2_000, SpoolStatus.DRAINING, False),
        # A minute and more with the store answering and no progress: stuck.
        (held(NOW - 2 * MINUTE), None, True, NOW - 10 * MINUTE, SpoolStatus.DRAINING, True),
        (EMPTY, "ENOENT", True, NOW, SpoolStatus.UNWRITABLE, False),
        (held(NOW - 2 * MINUTE), "EACCES", True, NOW - 2 * MINUTE, SpoolStatus.UNWRITABLE, True),
        # At its bound: while the store is down, webhooks are answered 503 spool_full.
        (full(NOW - MINUTE), None, False, NOW - MINUTE, SpoolStatus.FULL, False),
        (full(NOW - 5_000), None, True, NOW - 2_000, SpoolStatus.FULL, False),
    ],
)
def test_the_spool_state(
    stats: SpoolStats,
    unwritable: str | None,
    reachable: bool,
    progress_at: int,
    status: SpoolStatus,
    stalled: bool,
) -> None:
    state = judge(
        stats,
        unwritable=unwritable,
        store_reachable=reachable,
        progress_at=progress_at,
        now_ms=NOW,
        max_bytes=MAX_BYTES,
    )
    assert (state.status, state.stalled) == (status, stalled)
    assert state.degraded is (stalled or status in (SpoolStatus.UNWRITABLE, SpoolStatus.FULL))
    assert state.error == unwritable


def test_stalled_exactly_at_the_bound() -> None:
    stats = held(NOW - int(STALL_S * 1000))
    state = judge(
        stats,
        unwritable=None,
        store_reachable=True,
        progress_at=0,
        now_ms=NOW,
        max_bytes=MAX_BYTES,
    )
    assert state.stalled and state.waiting_s == STALL_S

"""A clock the test moves by hand, for a hub, its spool, an alert monitor or a presence."""

from __future__ import annotations


class ManualClock:
    """Wall time (Unix ms) that moves only when the test sets or advances `now`."""

    def __init__(self, now: int = 1_700_000_000_000) -> None:
        self.now = now

    def now_ms(self) -> int:
        return self.now

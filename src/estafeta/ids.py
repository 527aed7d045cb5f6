"""Prefixed, time-sortable identifiers: `evt_`, `dlv_`, `att_` + a 26-character ULID.

The first 10 characters encode the creation time in milliseconds, so ids sort by creation
time as strings, which keeps FIFO ordering and index locality without a separate sequence.
"""

from __future__ import annotations

import random
import time
from functools import lru_cache

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every 10-bit value as its two Crockford characters: a ULID is 13 table lookups, which
# keeps id generation (twice per webhook) off the ingest hot path's profile.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_random = random.Random()  # noqa: S311 - ids need uniqueness, not secrecy


_RANDOM_MAX = (1 << 80) - 1
_last = [0, 0]  # the millisecond and random bits of the previous id (monotonic mode)


def ulid(now_ms: int | None = None) -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, Crockford base32.

    Monotonic within a process (the ULID specification's monotonic mode): an id made in the
    same millisecond as the previous one takes the previous random bits plus one, so ids of
    one process sort in the order they were made; per-key delivery ordering relies on it.
    So does an id made after the clock stepped back (a store clock's sync can move it back a
    millisecond or two, a step of the store's own clock by more): it takes the previous
    id's millisecond, which sorted a key's later delivery before its earlier one.
    The random bits come from `random.getrandbits`, which costs no system call (unlike
    `os.urandom`); ids are not credentials.
    """
    ms = max(time.time_ns() // 1_000_000 if now_ms is None else now_ms, _last[0])
    same_ms = ms == _last[0] and _last[1] < _RANDOM_MAX
    # 79 fresh bits leave room to count up within the millisecond.
    bits = _last[1] + 1 if same_ms else _random.getrandbits(79)
    _last[0], _last[1] = ms, bits
    p = _PAIRS
    # Written out rather than a comprehension and a join over the shifts, which took a
    # third of each id's instructions (ingest makes two ids per webhook).
    return (
        _time_part(ms)
        + p[(bits >> 70) & 1023]
        + p[(bits >> 60) & 1023]
        + p[(bits >> 50) & 1023]
        + p[(bits >> 40) & 1023]
        + p[(bits >> 30) & 1023]
        + p[(bits >> 20) & 1023]
        + p[(bits >> 10) & 1023]
        + p[bits & 1023]
    )


@lru_cache(maxsize=16)
def _time_part(ms: int) -> str:
    """The 10 leading characters; every id made in the same millisecond shares them."""
    p = _PAIRS
    return (
        p[(ms >> 40) & 1023]
        + p[(ms >> 30) & 1023]
        + p[(ms >> 20) & 1023]
        + p[(ms >> 10) & 1023]
        + p[ms & 1023]
    )


def new_id(prefix: str, now_ms: int | None = None) -> str:
    """A new id such as `evt_01JD3M...`."""
    return f"{prefix}_{ulid(now_ms)}"

"""Free-form JSON that estafeta can store and deliver exactly as it was sent, and what not.

orjson writes every event estafeta stores and delivers, and it cannot write everything a
sender may send: an integer outside [-2**63, 2**64) (which orjson also reads as the nearest
double, silently), NaN and the infinities (written as `null`), and arrays and objects nested
more than `ORJSON_MAX_DEPTH` deep (refused: the request failed with a 500 after it was
parsed, or the answers that hold it did). Such JSON is refused where it enters — a generic
source's body (ingress/generic.py), a provider's JSON webhook (ingress/providers/base.py),
the API's free-form fields (api/fields.py) — naming the place, with one walk shared by all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INT64_MIN, UINT64_END = -(2**63), 2**64
# Arrays and objects orjson writes one inside another; a deeper value raises "Recursion
# limit reached".
ORJSON_MAX_DEPTH = 254
# The arrays and objects around an event's `data` where it is written deepest: the answer of
# `GET /api/v1/events/{id}` (`{"event": {"data": …}}`) and a conversation's page, whose
# entries are `data`'s members in an object in the `messages` list.
DATA_LEVELS_ABOVE = 2

WIDE_INTEGER = "an integer beyond 64 bits would reach destinations rounded; send it as a string"
NOT_FINITE = "NaN, Infinity or a number beyond a double (read as infinity) has no JSON form"


@dataclass(frozen=True, slots=True)
class Unstorable:
    """The first part of a value that cannot be stored as sent: where, and why."""

    path: tuple[str, ...]  # keys and list indexes from the value walked; () is the value
    reason: str

    def at(self, root: str) -> str:
        """`root.path.to.it: reason`, as error details name places."""
        return f"{'.'.join((root, *self.path))}: {self.reason}"


def may_nest_too_deep(text: bytes) -> bool:
    """Whether a JSON text has brackets enough to nest an event's `data` past what estafeta
    writes back: two scans in C, so that only such a text is walked (~0.5 µs at 0.7 KB)."""
    return text.count(b"{") + text.count(b"[") > ORJSON_MAX_DEPTH - DATA_LEVELS_ABOVE


def unstorable(value: object, *, levels_above: int) -> Unstorable | None:
    """The first part of `value` (JSON as Python reads it) that estafeta cannot store and
    deliver as it is, if any. `levels_above`: the arrays and objects that the deepest
    document estafeta writes it in puts around it (`DATA_LEVELS_ABOVE` for an event's
    `data`).

    Walked without recursion, so a value nested deeper than Python's stack is answered too.
    """
    room = ORJSON_MAX_DEPTH - levels_above  # containers `value` may nest, itself included
    stack: list[tuple[tuple[str, ...], object]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict | list):
            if len(path) >= room:  # named as a whole: the path would be `room` keys long
                return Unstorable((), f"arrays and objects nested more than {room} deep")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend(((*path, str(k)), v) for k, v in reversed(list(pairs)))
        elif isinstance(item, int) and not INT64_MIN <= item < UINT64_END:
            return Unstorable(path, WIDE_INTEGER)
        elif isinstance(item, float) and not math.isfinite(item):
            return Unstorable(path, NOT_FINITE)
    return None

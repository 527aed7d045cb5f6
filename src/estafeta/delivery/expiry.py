"""A deadline for one await in the current task, cheaper than `asyncio.timeout`.

The worker bounds every send by a ceiling (the destination's timeout plus a margin) in case
a connector does not bound itself, and every HTTP exchange is bounded by its timeout
(connectors/exchange.py). `asyncio.timeout` costs ~4.6 µs per use on uvloop (a context
object that reschedules its timer); one timer callback that cancels the task, taken back if
it was the one that fired, costs ~2.4 µs, on every delivery.

A deadline that fires late was missed by a busy process, not by the destination: the event
loop blocked past it (a large body parsed, a GC pause, a machine short of CPU) reads, in the
turn it comes back, the answer that came meanwhile and runs the timers that fell due, both
before the waiting task can run. Cancelled then, a send answered in time counted as a
timeout: retried (the destination got it twice) and a mark in its circuit. So a deadline
found late waits a little more, until the loop is on time at it (the task has had a turn
to read what came), at most `LATE_GRACE_S` after it came back: a process late at every
turn still ends its waits.
"""

from __future__ import annotations

import asyncio

from estafeta.clock import LATE_S

# The most a deadline found late waits more, from when it was first found late.
LATE_GRACE_S = 1.0


class Expiry:
    """Cancels the current task `seconds` from now unless disarmed first:

    expiry = Expiry(seconds)
    try:
        return await send()
    except asyncio.CancelledError:
        if not expiry.ended_it():
            raise  # cancelled by someone else (a shutdown): not a timeout
        return ...the timeout's outcome
    finally:
        expiry.disarm()
    """

    __slots__ = ("_cancelling", "_due", "_ended_it", "_fired", "_handle", "_latest", "_task")

    def __init__(self, seconds: float, task: asyncio.Task[object] | None = None) -> None:
        """`task`: the current task, when the caller has it (looking it up, and the loop,
        costs a getpid() each)."""
        if task is None:
            task = asyncio.current_task()
            if task is None:
                raise RuntimeError("Expiry needs a running task")
        self._task = task
        self._cancelling = task.cancelling()  # requests already pending are not ours
        self._fired = False
        self._ended_it: bool | None = None  # once asked: whether the cancellation was ours alone
        self._latest: float | None = None  # once found late: the most it waits for
        loop = task.get_loop()
        self._due = loop.time() + seconds  # when the timer is due; `_fire` moves it
        self._handle = loop.call_at(self._due, self._fire)

    def _fire(self) -> None:
        loop = self._task.get_loop()
        now = loop.time()
        if now - self._due > LATE_S:
            # Late: what came while the process was busy is read in this very turn, and the
            # task waiting for it runs in the next. It may: the deadline looks again then,
            # as often as it finds itself late, until LATE_GRACE_S after it first did.
            latest = self._latest if self._latest is not None else now + LATE_GRACE_S
            if now < latest:
                self._latest = latest
                self._due = min(now + LATE_S, latest)
                self._handle = loop.call_at(self._due, self._fire)
                return
        self._fired = True
        self._task.cancel()

    def disarm(self) -> None:
        self._handle.cancel()

    def ended_it(self) -> bool:
        """Whether the CancelledError being handled is this expiry's, and only its: it is
        then taken back (so the task goes on), else it must propagate. Taken back once: a
        caller may look again as the error propagates (a body's read, then its exchange),
        and a second `uncancel` took back another's request (a shutdown) in its place."""
        if not self._fired:
            return False
        if self._ended_it is None:
            self._ended_it = self._task.uncancel() <= self._cancelling
        return self._ended_it

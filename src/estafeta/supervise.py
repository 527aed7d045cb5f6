"""Background tasks that must not die quietly: the worker loop and the spool drainer.

A task that raises is logged at once with its traceback (`task_crashed`) and started again
after a pause that doubles up to 30 s, until the process is asked to stop; a loop that dies
silently would leave a hub that answers 202 and delivers nothing. The pause starts again
from the first after a run of 30 s or more: it is there for a task that keeps dying at once,
not to hold back one that crashed once after working well for hours. Between a crash and
its restart the task is down, and says so to whoever watches (`Tasks`: the worker's
/health, `serve`'s /health/detailed, and the process's presence, which stops counting as
delivering while its delivery task keeps crashing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from estafeta.observability.metrics import TASK_CRASHES

log = structlog.get_logger("estafeta.supervise")

FIRST_PAUSE_S = 1.0
LONGEST_PAUSE_S = 30.0


class Tasks:
    """The supervised tasks' health: those down (crashed, and not started again yet), and how
    often each has crashed since the process started."""

    def __init__(self) -> None:
        self.down: dict[str, str] = {}  # task → the class of the error it crashed with
        self.crashes: dict[str, int] = {}  # task → crashes so far

    def crashed(self, name: str, error: Exception) -> None:
        self.down[name] = type(error).__name__
        self.crashes[name] = self.crashes.get(name, 0) + 1
        TASK_CRASHES.labels(name).inc()

    def crashed_now(self) -> list[dict[str, str]]:
        """The tasks down, as /health lists them."""
        return [{"task": name, "error": error} for name, error in sorted(self.down.items())]


async def supervised(
    name: str,
    start: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    *,
    first_pause_s: float = FIRST_PAUSE_S,
    monotonic: Callable[[], float] = time.monotonic,
    tasks: Tasks | None = None,
) -> None:
    """Run `start()` until it returns; restart it whenever it raises, until `stop` is set.
    While it is down, `tasks` (when given) names it."""
    pause = first_pause_s
    tasks = tasks or Tasks()
    while True:
        started = monotonic()
        try:
            tasks.down.pop(name, None)
            await start()
            return
        except Exception as exc:
            tasks.crashed(name, exc)
            if stop.is_set():
                log.error("task_crashed", task=name, restarting=False, exc_info=exc)
                return
            if monotonic() - started >= LONGEST_PAUSE_S:
                pause = first_pause_s  # it had been working: not the crash loop pauses are for
            log.error("task_crashed", task=name, restart_in_s=pause, exc_info=exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        if stop.is_set():
            return
        pause = min(pause * 2, LONGEST_PAUSE_S)

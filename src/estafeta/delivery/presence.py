"""A process's presence: the store knows which destinations each running process names.

During a rolling change of the configuration (a destination added, the processes restarted
one by one), processes on the old file and on the new one share the store. Deliveries to
the new destination, stored by a process on the new file, must wait for one that can send
them, not be dead-lettered by a worker still on the old file as `unknown_destination`.
So every process that holds a configuration (`serve`, with or without workers, and
`worker`) records the destinations its configuration names at start, before it serves,
and every `ANNOUNCE_EVERY_S` after; a worker dead-letters deliveries to a destination it
does not know only when no process seen within `LIVE_WINDOW_S` names it (rescue.py).

`LIVE_WINDOW_S` is six announcements: a process whose announcement is late (the store
slow or briefly unreachable, the event loop busy, clocks a few seconds apart between
machines) is not taken for gone, at the cost of dead-lettering a removed destination's
deliveries up to a minute later when the last process that named it died without stopping.
A process stopped gracefully stops naming them at once for processes started after it
(store/processes.py says why not for the others).

A process that delivers also records, at each announcement, whether its delivery task ran
the whole time since the one before (`delivering_at`): a worker whose task keeps crashing
(a bug, a database that rejects every lease) still runs and announces, but delivers
nothing, and `serve`'s `no_workers` alert must hear of it as of a worker gone.

With Redis configured, a process also records itself under its Redis key prefix after each
announcement, and refuses to start, or logs an error while it runs, when processes of another
store use that prefix (redis_prefix.py).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from estafeta.clock import Clock, StoreClock
from estafeta.config import Config
from estafeta.errors import StoreUnavailable
from estafeta.messaging.facts import send_destination
from estafeta.messaging.outbound import can_send
from estafeta.redis_client import REDIS_ERRORS
from estafeta.redis_prefix import STORE_SEEN_S, PrefixProcesses, refusal
from estafeta.store.sqlstore import SqlStore
from estafeta.supervise import Tasks

log = structlog.get_logger("estafeta.presence")

ANNOUNCE_EVERY_S = 10.0
LIVE_WINDOW_S = 60.0
# Rows of processes not seen for this long are deleted: a crash loop leaves no pile of them.
FORGET_AFTER_S = 10 * LIVE_WINDOW_S
# The supervised task that delivers, in `serve` and in `worker`.
DELIVERY_TASK = "worker"


def named_destinations(config: Config) -> list[str]:
    """Every destination a delivery stored under `config` may name: the configured ones and
    the sends through each provider source configured to send."""
    names = [d.id for d in config.destinations]
    names += [send_destination(s.id) for s in config.sources if can_send(s)]
    return names


class Presence:
    """One process's row in the store's `processes`, kept up to date while it runs."""

    def __init__(
        self,
        store: SqlStore,
        config: Config,
        *,
        process_id: str,
        clock: Clock,
        delivers: bool = True,
        tasks: Tasks | None = None,
        every_s: float = ANNOUNCE_EVERY_S,
        redis: PrefixProcesses | None = None,
    ) -> None:
        self.store = store
        # The processes under this process's Redis key prefix, this one recorded among them.
        self.redis = redis
        self._foreign_seen: set[str] = set()  # another store's, as the last look found them
        self.process_id = process_id
        self.delivers = delivers  # False for `serve --no-workers`
        # The process's supervised tasks, its delivery task among them when it delivers.
        self.tasks = tasks or Tasks()
        self._crashes_seen = 0  # the delivery task's crashes at the last announcement
        self._down_seen = False  # whether it was down (crashed, not restarted) then
        self.clock = clock
        self.every_s = every_s
        self.destinations = named_destinations(config)
        self.started_ms = clock.now_ms()

    async def announce(self) -> None:
        """Record that this process runs, naming its destinations (raises StoreUnavailable)."""
        if isinstance(self.clock, StoreClock):
            # The store's time, taken again as often as the process shows it is alive: the
            # process's clock follows the store's, however its own machine's drifts.
            await self.clock.sync()
        now = self.clock.now_ms()
        await self.store.announce_process(
            self.process_id,
            self.destinations,
            delivers=self.delivers,
            delivering=self._delivering(),
            started_ms=self.started_ms,
            now_ms=now,
            forget_before_ms=now - int(FORGET_AFTER_S * 1000),
        )
        if self.redis is not None:
            await self._record_in_redis(self.redis)

    async def refuse_shared_prefix(self) -> None:
        """Before the first announcement: raise RedisKeyPrefixShared when processes of
        another store use this process's Redis key prefix. An unreachable Redis does not stop
        the start (what it holds has a fallback in memory): each announcement looks again."""
        if self.redis is None:
            return
        try:
            others = await self.redis.others(record=False)
        except REDIS_ERRORS:
            return
        foreign = await self._foreign(others)
        if foreign:
            raise refusal(self.redis.prefix, foreign)

    async def _record_in_redis(self, redis: PrefixProcesses) -> None:
        try:
            others = await redis.others(record=True)
        except REDIS_ERRORS:
            return  # logged by the components that use Redis (`redis_unavailable`)
        foreign = await self._foreign(others)
        if foreign - self._foreign_seen:
            log.error(
                "redis_key_prefix_shared",
                key_prefix=redis.prefix,
                processes=sorted(foreign),
                process=self.process_id,
            )
        self._foreign_seen = foreign

    async def _foreign(self, others: set[str]) -> set[str]:
        """Those of `others` (processes under this Redis key prefix) this store has not seen
        lately: another store's. Raises StoreUnavailable."""
        if not others:
            return set()
        since = self.clock.now_ms() - round(STORE_SEEN_S * 1000)
        return others - await self.store.seen_processes(others, seen_since_ms=since)

    def _delivering(self) -> bool:
        """Whether the delivery task has run without a crash since the last time asked: a
        task that keeps crashing is up between its restarts, and must not count for that."""
        if not self.delivers:
            return False
        crashes = self.tasks.crashes.get(DELIVERY_TASK, 0)
        down = DELIVERY_TASK in self.tasks.down
        # Down at the last announcement and restarted since is not the whole time: a task
        # restarted after its 30 s pause that crashes again within seconds would otherwise
        # count as delivering once in every few announcements.
        steady = crashes == self._crashes_seen and not down and not self._down_seen
        self._crashes_seen, self._down_seen = crashes, down
        return steady

    async def run(self, stop: asyncio.Event) -> None:
        """Announce every `every_s` until `stop` is set, then retire. A crash (an error
        other than an outage) does not retire: the process runs on, and `supervised` starts
        this again, well within the window."""
        crashed = False
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.every_s)
                if not stop.is_set():
                    # A store outage is logged by ingest and the workers; the next
                    # announcement comes in ANNOUNCE_EVERY_S, well within the window.
                    with contextlib.suppress(StoreUnavailable):
                        await self.announce()
        except Exception:
            crashed = not stop.is_set()
            raise
        finally:
            if not crashed:
                await self.retire()

    async def retire(self) -> None:
        """This process stops: processes started from now on no longer count its
        destinations (a row the store does not take now ages out of the window)."""
        with contextlib.suppress(StoreUnavailable):
            await self.store.retire_process(
                self.process_id, self.clock.now_ms(), delivering=self._delivering()
            )

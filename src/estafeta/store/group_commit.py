"""Group commit: many concurrent callers, one transaction.

Durable ingest costs one fsync (SQLite) or one WAL flush (PostgreSQL) per commit; at a few
thousand commits a second that is the ceiling. Callers here submit one item each and await
its result; a flusher takes everything that queued up while the previous flush ran and
commits it as one batch. Under light load a batch is one item and adds no delay; under heavy
load batches grow by themselves, so no timer tuning is needed.

Several flushes may run at once (PostgreSQL commits them in parallel), but a second one
starts only when `min_parallel_batch` items wait (that may go beside the running ones,
below): a flush of one or two events pays a whole commit for them and slows the flush
already running (measured at half the full ingest rate on PostgreSQL: commits 2.6 ms →
1.7 ms, ingest p99 11–16 ms → 7–9 ms), while under full load the queue fills and the
parallel flushes start.

Items that must not be committed out of their order name keys (`keys_of`): a batch that
starts while others flush leaves behind every item carrying a key a running batch carries,
and every item behind it sharing one of its keys, so the later of two items of a key never
commits before the earlier. (Without it, a burst on PostgreSQL could commit a key's later
event first and a worker send it ahead of the earlier one.) Too few free to go beside the
running batches, the queue waits for a flush to end or for `min_parallel_batch` new items,
not for each new item, and a few batches' worth of it is looked through at most once then,
however long the queue of held items. An item that fails as unreachable (`StoreUnavailable`:
its batch's, or given up, queued or flushing) takes with it the later items sharing its
keys, queued or flushing (those given up at the watchdog's next look if they come while its
batch still hangs), and those behind them sharing theirs: its caller spools it, and they
must follow it there, not reach the store ahead of it.

If a batch fails for a reason other than the store being unreachable, its items are retried
one by one, so one bad item cannot fail the requests that happened to share its batch.

With `give_up_after_s`, a caller waits no longer than that, queued or flushing: a store that
hangs (connections open, nothing answered) fails it with `StoreUnavailable` well before the
driver's own timeout, so ingest spools it and answers while the provider still waits. Its
item is dropped if still queued; a flush already running goes on, and if it commits after
all, the spooled copy is a duplicate by event id when the spool drains. One watchdog scans
the waiting callers a few times per period: no timer per call on the hot path. A look that
comes late (the process was busy) is put off to the next one, so that a store that answered
in time is not given up before its answer is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Hashable, Sequence
from typing import Generic, TypeVar

from estafeta.cancelling import cancel_and_wait
from estafeta.clock import LATE_S
from estafeta.errors import StoreUnavailable

T = TypeVar("T")
R = TypeVar("R")

# An item, the future its caller awaits, when it was submitted (the loop's clock) and the
# keys that order it (`keys_of`; empty for most items).
Entry = tuple[T, "asyncio.Future[R]", float, Collection[Hashable]]

NO_KEYS: tuple[Hashable, ...] = ()

# How many batches' worth of the queue a batch started beside a running one looks through
# for items no running batch holds back.
SCAN_BATCHES = 4


def failed_as_unreachable(future: asyncio.Future[R]) -> bool:
    """Whether a done caller's future failed as the store unreachable."""
    return not future.cancelled() and isinstance(future.exception(), StoreUnavailable)


class GroupCommitter(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 500,
        max_concurrent_flushes: int = 1,
        min_parallel_batch: int = 1,
        give_up_after_s: float | None = None,
        keys_of: Callable[[T], Collection[Hashable]] | None = None,
    ) -> None:
        self._flush = flush
        self._keys_of = keys_of
        self._max_batch = max_batch
        self._min_parallel_batch = min_parallel_batch
        self._give_up_after_s = give_up_after_s
        self._in_flight = 0
        self._queue: list[Entry[T, R]] = []
        self._flushing: dict[int, list[Entry[T, R]]] = {}  # the batches being flushed
        # Each key the batches being flushed carry, and how many of them carry it.
        self._carried: dict[Hashable, int] = {}
        self._flush_ended = asyncio.Event()  # set as each flush ends
        self._slots = asyncio.Semaphore(max_concurrent_flushes)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one loop it serves
        self._closed = False

    async def submit(self, item: T) -> R:
        """Queue an item and wait until the batch that holds it is committed."""
        if self._closed:
            raise RuntimeError("the group committer is closed")
        if self._loop is None:
            # Looked up once: asyncio's lookup calls getpid(), a system call per request
            # that the ingest profile showed at 3 % of the server's CPU.
            self._loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = self._loop.create_future()
        keys = NO_KEYS if self._keys_of is None else self._keys_of(item)
        self._queue.append((item, future, self._loop.time(), keys))
        self._wakeup.set()
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name="group-commit")
            if self._give_up_after_s is not None:
                self._watchdog = self._loop.create_task(
                    self._watch(self._give_up_after_s), name="group-commit-watchdog"
                )
        return await future

    async def _watch(self, give_up_after_s: float) -> None:
        """Fail the callers that have waited `give_up_after_s`, checked ten times as often."""
        loop = asyncio.get_running_loop()
        failure = f"the store gave no answer within {give_up_after_s:g} s"
        period = give_up_after_s / 10
        skipped = False
        while not self._closed:
            looks_at = loop.time() + period
            await asyncio.sleep(period)
            if loop.time() - looks_at > LATE_S and not skipped:
                # Late: the process was busy, and the store's answers that came meanwhile
                # are read in this very turn, before the flushes waiting for them run (a
                # flush's COMMIT is one more round trip). Failed now, the callers of a
                # store that answered in time were spooled. The next look fails them,
                # late or not: a process behind at every turn still gives up.
                skipped = True
                continue
            skipped = False
            self._fail_in_order(StoreUnavailable(failure), due=loop.time() - give_up_after_s)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        while not (self._closed and not self._queue):
            if not self._queue or (self._in_flight and len(self._queue) < self._min_parallel_batch):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            if not self._queue:  # given up while this waited for a slot
                self._slots.release()
                continue
            if self._carried:
                batch, rest = self._free_of_carried_keys()
                if len(batch) < self._min_parallel_batch:
                    # Too few may go beside the running batches (the rest wait for their
                    # keys): all wait until one ends, as too few queued items would, or
                    # until enough new ones queued that they may go beside it after all
                    # (a slow flush holds up no other key's items): looked through again
                    # once per `min_parallel_batch` new items, not for each.
                    self._slots.release()
                    enough = len(self._queue) + self._min_parallel_batch
                    self._flush_ended.clear()
                    while not self._flush_ended.is_set() and len(self._queue) < enough:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    continue
                self._queue = rest
            else:
                batch = self._queue[: self._max_batch]
                self._queue = self._queue[self._max_batch :]
            self._in_flight += 1
            self._carry(batch, 1)
            task = loop.create_task(self._commit(batch))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    def _free_of_carried_keys(self) -> tuple[list[Entry[T, R]], list[Entry[T, R]]]:
        """The next batch (in queue order, of items no running batch orders) and what stays
        queued: the items sharing a key with a running batch or with an item left behind."""
        carried = self._carried
        held: set[Hashable] = set()
        batch: list[Entry[T, R]] = []
        rest: list[Entry[T, R]] = []
        # Looked at no further than a few batches' worth: a flood of one key queued behind
        # its running batch would otherwise be read whole at every flush (quadratic).
        scan_limit = SCAN_BATCHES * self._max_batch
        for i, entry in enumerate(self._queue):
            if len(batch) == self._max_batch or i == scan_limit:
                rest.extend(self._queue[i:])
                break
            keys = entry[3]
            if keys and any(key in carried or key in held for key in keys):
                rest.append(entry)
                held.update(keys)
            else:
                batch.append(entry)
        return batch, rest

    def _fail_in_order(self, exc: StoreUnavailable, due: float = float("-inf")) -> None:
        """Fail with `exc` the items submitted by `due` and every item after one that failed
        as unreachable sharing one of its keys (its caller spools it, and they must follow
        it there, not reach the store ahead of it), oldest first: the batches being flushed,
        then the queue, from which the failed are dropped. Their callers resume, and spool
        them, in that order."""
        failed_keys: set[Hashable] = set()
        failed = False
        for entries in (*self._flushing.values(), self._queue):
            for _, future, submitted_at, keys in entries:
                if future.done():  # failed as unreachable before, its batch still running?
                    if keys and failed_as_unreachable(future):
                        failed_keys.update(keys)
                    continue
                if submitted_at <= due or (keys and not failed_keys.isdisjoint(keys)):
                    future.set_exception(exc)
                    failed = True
                    failed_keys.update(keys)
        if failed:
            self._queue = [entry for entry in self._queue if not entry[1].done()]

    def _carry(self, batch: list[Entry[T, R]], change: int) -> None:
        """Count the keys of a batch as carried (+1, as it starts) or no longer (-1)."""
        carried = self._carried
        for entry in batch:
            for key in entry[3]:
                count = carried.get(key, 0) + change
                if count:
                    carried[key] = count
                else:
                    del carried[key]

    async def _commit(self, batch: list[Entry[T, R]]) -> None:
        self._flushing[id(batch)] = batch
        try:
            unreachable = await self._commit_batch(batch)
            if unreachable is not None:
                # Before this batch's keys are released: the later items of their keys must
                # not be stored while these go to the spool.
                self._fail_in_order(unreachable)
        finally:
            del self._flushing[id(batch)]
            self._carry(batch, -1)
            self._in_flight -= 1
            self._slots.release()
            self._flush_ended.set()
            self._wakeup.set()

    async def _commit_batch(self, batch: list[Entry[T, R]]) -> StoreUnavailable | None:
        """Commit the batch, its callers answered; the failure if the store was unreachable
        for some of its items (the later items of their keys are to follow them)."""
        # A caller may be gone (given up, or cancelled): its future is done, left as it is.
        try:
            results = await self._flush([entry[0] for entry in batch])
        except StoreUnavailable as exc:
            for _, future, _, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return exc
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return None
            unreachable: StoreUnavailable | None = None
            failed_keys: set[Hashable] = set()  # of the items refused as unreachable
            for single in batch:  # isolate the item that failed the batch
                keys = single[3]
                if unreachable is not None and keys and not failed_keys.isdisjoint(keys):
                    # An earlier item of its key was refused as unreachable: so is this one.
                    if not single[1].done():
                        single[1].set_exception(unreachable)
                elif (outcome := await self._commit_batch([single])) is not None:
                    unreachable = outcome
                else:
                    continue
                failed_keys.update(keys)
            return unreachable
        for (_, future, _, _), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
        return None

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._watchdog is not None:
            await cancel_and_wait(self._watchdog)

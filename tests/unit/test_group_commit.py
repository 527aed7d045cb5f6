"""The group committer: concurrent callers share commits, and one bad item fails alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estafeta.errors import StoreUnavailable
from estafeta.store.group_commit import GroupCommitter


class Store:
    """A flush that records its batches and can be held open, or made to fail."""

    def __init__(self, *, held: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()  # flushes wait here while it is clear
        if not held:
            self.gate.set()
        self.running = 0
        self.most_running = 0
        self.bad: set[int] = set()
        self.down = False

    async def flush(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate_of(len(self.batches) - 1).wait()
        finally:
            self.running -= 1
        if self.down:
            raise StoreUnavailable("the store is down")
        if self.bad & set(items):
            raise ValueError("a bad item")
        return [item * 10 for item in items]

    def gate_of(self, flush: int) -> asyncio.Event:
        """What the `flush`-th flush (counted from 0) waits for: the one gate of them all."""
        return self.gate


class GatePerFlush(Store):
    """A held store whose flushes are let through one by one, in the order a test picks;
    `committed` lists the items in the order their flushes returned."""

    def __init__(self) -> None:
        super().__init__(held=True)
        self.gates: list[asyncio.Event] = []
        self.committed: list[int] = []

    def gate_of(self, flush: int) -> asyncio.Event:
        self.gates.append(asyncio.Event())
        return self.gates[flush]

    async def flush(self, items: Sequence[int]) -> list[int]:
        results = await super().flush(items)
        self.committed.extend(items)
        return results

    def running_flushes(self) -> list[int]:
        """The flushes still held at their gates, by number."""
        return [n for n, gate in enumerate(self.gates) if not gate.is_set()]


async def until(condition: object, *, turns: int = 100) -> None:
    """Let the loop run until `condition()` holds (a bounded number of turns, no sleeping)."""
    for _ in range(turns):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def submitted(committer: GroupCommitter[int, int], *items: int) -> list[asyncio.Future[int]]:
    """Each item submitted in a task of its own, in order."""
    return [asyncio.ensure_future(committer.submit(item)) for item in items]


async def outcomes(committer: GroupCommitter[int, int], count: int) -> list[object]:
    """Items 0..count-1 submitted at once: each one's result, or the exception it raised."""
    return await asyncio.gather(
        *(committer.submit(i) for i in range(count)), return_exceptions=True
    )


async def first_flush_held(
    committer: GroupCommitter[int, int], store: Store, item: int
) -> asyncio.Future[int]:
    """Submit `item` and wait until its flush runs, held at the store's gate."""
    [future] = submitted(committer, item)
    await until(lambda: store.running == 1)
    return future


async def settle(turns: int = 20) -> None:
    """Let the loop run a while, for asserting that something did *not* happen."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_concurrent_submits_share_one_flush_and_each_gets_its_result() -> None:
    store = Store()
    committer = GroupCommitter(store.flush)
    results = await asyncio.gather(*(committer.submit(i) for i in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert store.batches == [[0, 1, 2, 3, 4]]
    await committer.close()


async def test_items_queued_during_a_flush_go_together_in_the_next() -> None:
    store = Store(held=True)
    committer = GroupCommitter(store.flush)
    first = await first_flush_held(committer, store, 1)
    assert store.batches == [[1]]
    later = submitted(committer, 2, 3, 4)
    await until(lambda: all(not f.done() for f in later))
    store.gate.set()
    assert await first == 10
    assert [await f for f in later] == [20, 30, 40]
    assert store.batches == [[1], [2, 3, 4]]
    await committer.close()


async def test_a_parallel_flush_waits_until_enough_items_queue() -> None:
    store = Store(held=True)
    committer = GroupCommitter(store.flush, max_concurrent_flushes=2, min_parallel_batch=3)
    first = await first_flush_held(committer, store, 0)
    two = submitted(committer, 1, 2)
    await settle()
    assert store.batches == [[0]], "two waiting items must not start a second commit"
    [three] = submitted(committer, 3)
    await until(lambda: store.running == 2)
    assert store.batches == [[0], [1, 2, 3]]
    store.gate.set()
    assert [await f for f in (first, *two, three)] == [0, 10, 20, 30]
    assert store.most_running == 2
    await committer.close()


async def test_items_below_the_parallel_threshold_flush_when_the_running_one_ends() -> None:
    store = Store(held=True)
    committer = GroupCommitter(store.flush, max_concurrent_flushes=4, min_parallel_batch=16)
    first = await first_flush_held(committer, store, 0)
    [second] = submitted(committer, 1)
    await settle()
    assert store.batches == [[0]]
    store.gate.set()
    assert (await first, await second) == (0, 10)
    assert store.batches == [[0], [1]]
    assert store.most_running == 1
    await committer.close()


async def test_no_more_flushes_run_at_once_than_allowed() -> None:
    store = Store(held=True)
    committer = GroupCommitter(store.flush, max_batch=2, max_concurrent_flushes=2)
    futures = submitted(committer, *range(8))
    await until(lambda: store.running == 2)
    await settle()
    assert store.running == 2
    store.gate.set()
    assert [await f for f in futures] == [i * 10 for i in range(8)]
    assert store.most_running == 2
    assert all(len(batch) <= 2 for batch in store.batches)
    await committer.close()


async def test_one_bad_item_fails_alone_and_its_batch_mates_are_committed() -> None:
    store = Store()
    store.bad = {2}
    committer = GroupCommitter(store.flush)
    results = await outcomes(committer, 4)
    assert results[:2] == [0, 10] and results[3] == 30
    assert isinstance(results[2], ValueError)
    assert store.batches == [[0, 1, 2, 3], [0], [1], [2], [3]]
    await committer.close()


async def test_an_unreachable_store_fails_the_whole_batch_at_once() -> None:
    store = Store()
    store.down = True
    committer = GroupCommitter(store.flush)
    results = await outcomes(committer, 3)
    assert all(isinstance(o, StoreUnavailable) for o in results)
    assert store.batches == [[0, 1, 2]], "no one-by-one retry against a store that is down"
    await committer.close()


async def test_close_commits_what_is_queued_then_refuses_more() -> None:
    store = Store(held=True)
    committer = GroupCommitter(store.flush, max_concurrent_flushes=2, min_parallel_batch=10)
    futures = submitted(committer, *range(3))
    await until(lambda: store.running == 1)
    closing = asyncio.ensure_future(committer.close())
    await asyncio.sleep(0)
    store.gate.set()
    await closing
    assert [f.result() for f in futures] == [0, 10, 20]
    with pytest.raises(RuntimeError, match="closed"):
        await committer.submit(9)


GIVE_UP_S = 0.05  # the watchdog looks every 5 ms


async def test_a_store_that_hangs_fails_its_callers_after_the_bound_flushing_or_queued() -> None:
    store = Store(held=True)  # a flush that never returns until the gate opens: a hung store
    committer = GroupCommitter(store.flush, give_up_after_s=GIVE_UP_S)
    flushing = await first_flush_held(committer, store, 1)
    [queued] = submitted(committer, 2)  # behind it: one flush at a time
    started = asyncio.get_running_loop().time()
    results = await asyncio.wait_for(
        asyncio.gather(flushing, queued, return_exceptions=True), timeout=5
    )
    waited = asyncio.get_running_loop().time() - started
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert "no answer within 0.05 s" in str(results[0])
    assert waited < 1, waited  # the bound, not the hung flush, ended the wait
    # The queued item is dropped (its caller spools it); the hung flush goes on, and its
    # late result is nobody's to take.
    store.gate.set()
    await committer.close()
    assert store.batches == [[1]]


async def test_a_store_that_answered_while_the_process_was_busy_is_not_given_up() -> None:
    """The store answered within the bound, but the event loop was blocked past it (a large
    body parsed, a GC pause, a machine short of CPU): the watchdog's look, due meanwhile,
    ran before the flush could read its answer, and failed its callers as if the store
    were unreachable: their webhooks spooled, and every request for a second after them."""
    store = Store(held=True)

    async def statement_then_commit(items: Sequence[int]) -> list[int]:
        committed = await store.flush(items)
        await asyncio.sleep(0.001)  # a second round trip: its COMMIT
        return committed

    committer = GroupCommitter(statement_then_commit, give_up_after_s=0.2)  # a look per 20 ms
    flushing = await first_flush_held(committer, store, 1)
    asyncio.get_running_loop().call_later(0.01, store.gate.set)  # the store answers in time
    time.sleep(0.5)  # busy past the bound
    assert await asyncio.wait_for(flushing, timeout=5) == 10
    await committer.close()


# The keys that order items (as the hub names an event's deliveries' ordering keys).
KEYS = {1: ["a"], 2: ["a"], 5: ["a", "b"], 6: ["b"]}


def keyed_committer(
    store: Store,
    *,
    min_parallel_batch: int = 1,
    max_concurrent_flushes: int = 2,
    give_up_after_s: float | None = None,
) -> GroupCommitter[int, int]:
    """A committer of items ordered by KEYS."""
    return GroupCommitter(
        store.flush,
        max_concurrent_flushes=max_concurrent_flushes,
        min_parallel_batch=min_parallel_batch,
        give_up_after_s=give_up_after_s,
        keys_of=lambda item: KEYS.get(item, []),
    )


def burst_committer(store: Store, keys: dict[int, list[str]]) -> GroupCommitter[int, int]:
    """A committer of small batches, four at once, for the random bursts below."""
    return GroupCommitter(
        store.flush,
        max_batch=5,
        max_concurrent_flushes=4,
        min_parallel_batch=2,
        keys_of=lambda item: keys[item],
    )


async def test_a_parallel_flush_leaves_behind_the_key_a_running_flush_carries() -> None:
    store = GatePerFlush()
    committer = keyed_committer(store)
    first = await first_flush_held(committer, store, 1)  # key a, held
    second, third, fourth = submitted(committer, 2, 3, 4)  # 2: key a again
    await until(lambda: len(store.gates) == 2)
    assert store.batches == [[1], [3, 4]], "2 must wait for the flush that carries 1"
    store.gates[1].set()  # the parallel flush commits first
    assert (await third, await fourth) == (30, 40)
    await settle()
    assert not second.done() and store.batches == [[1], [3, 4]]
    store.gates[0].set()
    assert await first == 10
    await until(lambda: len(store.gates) == 3)
    store.gates[2].set()
    assert await second == 20
    assert store.committed == [3, 4, 1, 2]
    await committer.close()


async def test_an_item_left_behind_holds_back_the_later_items_of_each_of_its_keys() -> None:
    store = GatePerFlush()
    committer = keyed_committer(store)
    first = await first_flush_held(committer, store, 1)  # key a
    # 5 carries a and b: it waits for 1, and 6 (key b) must not go ahead of it; 7 may.
    later = submitted(committer, 5, 6, 7)
    await until(lambda: len(store.gates) == 2)
    assert store.batches == [[1], [7]]
    store.gates[1].set()
    await settle()
    store.gates[0].set()
    await until(lambda: len(store.gates) == 3)
    assert store.batches[2] == [5, 6]
    store.gates[2].set()
    assert [await f for f in (first, *later)] == [10, 50, 60, 70]
    await committer.close()


async def test_too_few_items_free_to_go_beside_a_running_flush_wait_for_it_to_end() -> None:
    """Two waiting items are enough for a second flush, but 2 waits for 1 (key a): 3 alone
    would pay a whole commit beside the running one, so it waits with 2 for the next."""
    store = GatePerFlush()
    committer = keyed_committer(store, min_parallel_batch=2)
    first = await first_flush_held(committer, store, 1)  # key a
    later = submitted(committer, 2, 3)
    await settle()
    assert store.batches == [[1]]
    store.gates[0].set()
    await until(lambda: len(store.gates) == 2)
    assert store.batches == [[1], [2, 3]]
    store.gates[1].set()
    assert [await f for f in (first, *later)] == [10, 20, 30]
    await committer.close()


async def test_enough_items_free_to_go_that_queue_later_go_beside_a_slow_flush() -> None:
    """1 (key a) is being written, slowly (a lock, a commit held up to the watchdog's bound);
    2 waits for it and 3 alone is too few to go beside it. 10 and 11 arrive, of no running
    batch's key: enough to go beside it, but they waited for 1's flush to end with the rest
    (every conversation's ingest held up by one slow commit). They go beside it."""
    store = GatePerFlush()
    committer = keyed_committer(store, min_parallel_batch=2)
    first = await first_flush_held(committer, store, 1)  # key a
    waiting = submitted(committer, 2, 3)
    await settle()
    later = submitted(committer, 10, 11)
    await until(lambda: len(store.gates) == 2)
    assert store.batches == [[1], [3, 10, 11]]
    store.gates[1].set()
    await until(lambda: store.committed == [3, 10, 11])
    store.gates[0].set()
    await until(lambda: len(store.gates) == 3)
    store.gates[2].set()
    assert [await f for f in (first, *waiting, *later)] == [10, 20, 30, 100, 110]
    assert store.batches == [[1], [3, 10, 11], [2]]
    await committer.close()


async def test_items_without_keys_go_in_parallel_flushes_as_before() -> None:
    store = GatePerFlush()
    committer = keyed_committer(store)
    first = await first_flush_held(committer, store, 3)
    later = submitted(committer, 4, 7, 8)
    await until(lambda: len(store.gates) == 2)
    assert store.batches == [[3], [4, 7, 8]]
    for gate in store.gates:
        gate.set()
    assert [await f for f in (first, *later)] == [30, 40, 70, 80]
    await committer.close()


# A scenario: bursts of items (each with a key of a small alphabet, or none), and which of
# the flushes then running the store lets through at each step.
bursts = st.lists(
    st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=12),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(bursts=bursts, picks=st.lists(st.integers(0, 3), min_size=40, max_size=40))
def test_items_of_a_key_commit_in_the_order_submitted_whatever_flush_ends_first(
    bursts: list[list[str | None]], picks: list[int]
) -> None:
    keys: dict[int, list[str]] = {}

    async def scenario() -> tuple[list[int], list[int]]:
        store = GatePerFlush()
        committer = burst_committer(store, keys)
        futures: list[asyncio.Future[int]] = []
        choices = iter(picks)
        for burst in bursts:
            for key in burst:
                keys[len(keys)] = [] if key is None else [key]
                futures.extend(submitted(committer, len(keys) - 1))
            await settle()
            if running := store.running_flushes():  # let one of them end
                store.gates[running[next(choices, 0) % len(running)]].set()
                await settle()
        while not all(f.done() for f in futures):  # then let the rest through, in turn
            if running := store.running_flushes():
                store.gates[running[-1]].set()
            await settle()
        await committer.close()
        return [f.result() // 10 for f in futures], store.committed

    results, committed = asyncio.run(scenario())
    assert results == list(keys), "every item committed, each with its own result"
    assert sorted(committed) == list(keys), "each item committed once"
    for key in "abc":
        of_key = [item for item in committed if keys[item] == [key]]
        assert of_key == sorted(of_key), f"key {key} committed out of order: {of_key}"


async def test_an_unreachable_store_fails_the_items_left_behind_for_its_keys_too() -> None:
    store = GatePerFlush()
    committer = keyed_committer(store)
    first = await first_flush_held(committer, store, 1)  # key a
    # 2 (key a) waits for 1; 6 (key b) goes beside it, and 5 (a and b) waits for both.
    second, sixth, fifth = submitted(committer, 2, 6, 5)
    await until(lambda: len(store.gates) == 2)
    assert store.batches == [[1], [6]]
    store.down = True
    store.gates[0].set()
    with pytest.raises(StoreUnavailable):
        await first
    # The store answers again: 1's caller spools it, so 2 and 5 must not be stored before it
    # is, but go to the spool behind it (refused as 1 was). 6 never waited for 1.
    store.down = False
    for _ in range(100):  # let every flush through as it comes, until all have answered
        for gate in store.gates:
            gate.set()
        await settle()
        if all(f.done() for f in (second, fifth, sixth)):
            break
    assert isinstance(second.exception(), StoreUnavailable)
    assert isinstance(fifth.exception(), StoreUnavailable)
    assert sixth.result() == 60
    await committer.close()
    assert store.committed == [6], "an item of key a stored while 1 goes to the spool"


async def test_a_retried_item_the_store_cannot_take_fails_the_later_ones_of_its_key() -> None:
    batches: list[list[int]] = []
    gate = asyncio.Event()

    async def flush(items: Sequence[int]) -> list[int]:
        # The batch fails for a bad item (3); as its items are retried one by one, the
        # store is unreachable for 1, then answers again.
        batches.append(list(items))
        if len(items) > 1:
            await gate.wait()
            raise ValueError("a bad item")
        if items == [1]:
            raise StoreUnavailable("the store is down")
        return [item * 10 for item in items]

    committer = GroupCommitter(flush, keys_of=lambda item: KEYS.get(item, []))
    failed: list[int] = []

    async def caller(item: int) -> int | None:
        try:
            return await committer.submit(item)
        except StoreUnavailable:
            failed.append(item)  # as its caller resumes: it spools the item now
            return None

    in_batch = [asyncio.ensure_future(caller(i)) for i in (1, 3, 2)]
    await until(lambda: batches == [[1, 3, 2]])
    queued = asyncio.ensure_future(caller(5))  # keys a and b, behind the batch
    await settle()
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*in_batch, queued), timeout=5)
    assert results == [None, 30, None, None]
    assert failed == [1, 2, 5], "the key's items spooled behind 1, in their order"
    assert [2] not in batches and [5] not in batches
    await committer.close()


async def test_a_queued_item_given_up_takes_the_later_ones_of_its_key_with_it() -> None:
    give_up_s = 0.2  # the watchdog looks every 20 ms
    store = Store(held=True)  # a hung store: one flush at a time, held
    committer = keyed_committer(store, max_concurrent_flushes=1, give_up_after_s=give_up_s)
    hung = await first_flush_held(committer, store, 3)
    [first] = submitted(committer, 1)  # key a, queued behind the hung flush
    await asyncio.sleep(give_up_s / 2)
    [second] = submitted(committer, 2)  # key a again, due 0.1 s after 1
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(first, timeout=5)
    # 1's caller spools it; the store answers again before 2 is due: 2 must not be stored
    # ahead of 1, but be given up with it.
    assert second.done(), "2 must be given up with 1, not left to be stored before it"
    assert isinstance(second.exception(), StoreUnavailable)
    store.gate.set()
    with pytest.raises(StoreUnavailable):
        await hung
    await committer.close()
    assert store.batches == [[3]]


async def test_callers_given_up_together_are_failed_in_the_order_they_submitted() -> None:
    store = Store(held=True)  # a hung store
    committer = keyed_committer(store, max_concurrent_flushes=1, give_up_after_s=GIVE_UP_S)
    failed: list[int] = []

    async def caller(item: int) -> None:
        try:
            await committer.submit(item)
        except StoreUnavailable:
            failed.append(item)  # as its caller resumes: it spools the item now

    callers = [asyncio.ensure_future(caller(1))]  # key a, flushing
    await until(lambda: store.running == 1)
    callers.append(asyncio.ensure_future(caller(2)))  # key a, queued behind it
    await asyncio.wait_for(asyncio.gather(*callers), timeout=5)
    # Given up in one look of the watchdog: 2 spooled ahead of 1 would be drained first.
    assert failed == [1, 2]
    store.gate.set()
    await committer.close()


@settings(max_examples=200, deadline=None)
@given(
    bursts=bursts,
    picks=st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=40, max_size=40),
)
def test_an_item_the_store_could_not_take_is_never_overtaken_by_a_later_one_of_its_key(
    bursts: list[list[str | None]], picks: list[tuple[int, bool]]
) -> None:
    """As the one above, some flushes finding the store unreachable: a caller refused so
    spools its item, and no item of its key submitted before then may be stored after all."""
    keys: dict[int, list[str]] = {}
    log: list[tuple[str, int]] = []  # ("submitted" | "refused", item), as it happens

    async def scenario() -> list[int]:
        store = GatePerFlush()
        committer = burst_committer(store, keys)

        async def caller(item: int) -> None:
            try:
                await committer.submit(item)
            except StoreUnavailable:
                log.append(("refused", item))

        callers: list[asyncio.Future[None]] = []
        choices = iter(picks)
        for burst in bursts:
            for key in burst:
                item = len(keys)
                keys[item] = [] if key is None else [key]
                log.append(("submitted", item))
                callers.append(asyncio.ensure_future(caller(item)))
            await settle()
            if running := store.running_flushes():  # let one of them end, or fail
                pick, down = next(choices, (0, False))
                store.down = down
                store.gates[running[pick % len(running)]].set()
                await settle()
                store.down = False
        while not all(f.done() for f in callers):  # then let the rest through, in turn
            if running := store.running_flushes():
                store.gates[running[-1]].set()
            await settle()
        await committer.close()
        return store.committed

    committed = set(asyncio.run(scenario()))
    for at, (what, item) in enumerate(log):
        if what != "refused" or not keys[item]:
            continue
        submitted_before = {i for w, i in log[:at] if w == "submitted"}
        overtaking = {
            later
            for later in submitted_before & committed
            if later > item and keys[later] == keys[item]
        }
        assert not overtaking, f"{item} refused, then {overtaking} of its key stored"
    refused = [item for what, item in log if what == "refused"]
    for key in "abc":
        of_key = [item for item in refused if keys[item] == [key]]
        assert of_key == sorted(of_key), f"key {key} spooled out of order: {of_key}"


class CountedKeys(list[str]):
    """An item's keys that count how often the committer reads them."""

    reads = 0

    def __iter__(self) -> Iterator[str]:
        CountedKeys.reads += 1
        return super().__iter__()


async def test_a_flood_of_one_key_costs_the_committer_in_proportion_to_its_size() -> None:
    """Thousands of one conversation's events wait behind its running batch: each batch
    started beside it looks at a bounded part of the queue, not all of it again."""
    store = Store()
    count = 3000
    keys = {item: CountedKeys(["a"]) for item in range(count)}
    committer = GroupCommitter(
        store.flush,
        max_batch=10,
        max_concurrent_flushes=2,
        min_parallel_batch=2,
        keys_of=lambda item: keys[item],
    )
    CountedKeys.reads = 0
    results = await asyncio.gather(*(committer.submit(i) for i in range(count)))
    assert results == [i * 10 for i in range(count)]
    assert [item for batch in store.batches for item in batch] == list(range(count))
    assert CountedKeys.reads < 20 * count, CountedKeys.reads  # ~300 * count before the bound
    await committer.close()


async def test_an_item_given_up_while_flushing_takes_the_later_ones_of_its_key_with_it() -> None:
    """1 (key a) is being written when the store hangs; 2 (key a) waits behind it. Given up,
    1 is spooled, and the store counts as down for a moment: a new event of key a goes
    straight to the spool. 2, given up only at its own time, was spooled after that one,
    out of its key's order. It is given up with 1."""
    store = Store(held=True)  # the flush hangs until the test ends
    committer = keyed_committer(store, give_up_after_s=GIVE_UP_S)
    first = await first_flush_held(committer, store, 1)
    await asyncio.sleep(GIVE_UP_S / 2)  # 2 comes later: due half a bound after 1
    [second] = submitted(committer, 2)
    with pytest.raises(StoreUnavailable):
        await first
    assert second.done(), "2 must be given up with 1, not half a bound later"
    assert isinstance(second.exception(), StoreUnavailable)
    store.gate.set()
    await committer.close()
    assert store.batches == [[1]]


async def test_an_item_queued_after_its_key_was_given_up_follows_it_at_the_next_look() -> None:
    """1 (key a) was given up while its flush hangs; 2 (key a) comes after that. Its own time
    not come, it still goes to the spool behind 1 at the watchdog's next look."""
    store = Store(held=True)
    committer = keyed_committer(store, give_up_after_s=0.4)  # looked at every 40 ms
    first = await first_flush_held(committer, store, 1)
    with pytest.raises(StoreUnavailable):
        await first
    loop = asyncio.get_running_loop()
    submitted_at = loop.time()
    [second] = submitted(committer, 2)
    with pytest.raises(StoreUnavailable):
        await second
    assert loop.time() - submitted_at < 0.2, "given up at the next look, not at its own time"
    store.gate.set()
    await committer.close()

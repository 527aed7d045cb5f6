"""The worker's per-send deadline: it ends only what it timed, and only when it fired."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import pytest

from estafeta.delivery.expiry import LATE_GRACE_S, Expiry
from tests.unit.late_loop import late_at_every_turn


async def unless_ended(expiry: Expiry, work: Awaitable[str], ended: str = "expired") -> str:
    """`work`'s result, or `ended` when `expiry` ended the wait (as the exchange asks)."""
    try:
        return await work
    except asyncio.CancelledError:
        if not expiry.ended_it():
            raise
        return ended


async def bounded(seconds: float, work: asyncio.Future[str], *, given: bool = False) -> str:
    """`work`'s result, or "expired" when the deadline ended the wait; `given`: the task is
    handed to the deadline (as the worker does) rather than looked up."""
    expiry = Expiry(seconds, asyncio.current_task()) if given else Expiry(seconds)
    try:
        return await unless_ended(expiry, work)
    finally:
        expiry.disarm()


@pytest.mark.parametrize("given", [False, True], ids=["looked_up", "given"])
async def test_a_wait_that_outlives_its_deadline_is_ended_and_the_task_goes_on(
    given: bool,
) -> None:
    never: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(bounded(0.01, never, given=given))
    assert await task == "expired"
    assert task.cancelling() == 0  # taken back: later awaits of the task are not cancelled


async def test_a_wait_that_ends_in_time_leaves_the_rest_of_the_task_alone() -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    loop.call_soon(done.set_result, "answered")

    async def send_then_record() -> str:
        answer = await bounded(0.05, done)
        await asyncio.sleep(0.1)  # later work past the deadline: a timer left armed ends it
        return answer

    assert await asyncio.create_task(send_then_record()) == "answered"


async def test_a_cancellation_from_elsewhere_is_not_mistaken_for_the_deadline() -> None:
    never: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(bounded(10, never))
    await asyncio.sleep(0)
    task.cancel()  # a shutdown, say
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_shutdown_arriving_with_the_deadline_still_stops_the_task() -> None:
    never: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(bounded(0, never))  # the deadline fires on the next turn
    await asyncio.sleep(0)  # the task armed it and waits
    task.cancel()  # and a shutdown asks in the same turn: whichever runs first, it stops
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_answer_that_came_while_the_process_was_busy_is_in_time() -> None:
    """The answer came before the deadline, but the event loop was blocked (a large body
    parsed, a GC pause, a machine short of CPU) until past it: the deadline fired in the
    same turn as the answer was read, before the waiting task could run, and the send
    counted as a timeout (retried: the destination got it twice; a mark in its circuit)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()
    task = asyncio.create_task(bounded(0.1, answer))
    await asyncio.sleep(0)  # the task armed its deadline and waits
    loop.call_later(0.02, answer.set_result, "answered")  # the destination answers in time
    time.sleep(0.1 + LATE_GRACE_S + 0.2)  # busy past the deadline, by more than its grace
    assert await task == "answered"


async def test_a_process_busy_for_ever_still_ends_the_wait() -> None:
    """The grace a late deadline gives is bounded: a destination that never answers, in a
    process whose loop is late at every turn, is still ended (by the deadline plus
    `LATE_GRACE_S` after it was first found late)."""
    loop = asyncio.get_running_loop()
    never: asyncio.Future[str] = loop.create_future()
    started = time.monotonic()
    with late_at_every_turn():
        assert await asyncio.create_task(bounded(0.05, never)) == "expired"
    assert time.monotonic() - started < 0.05 + LATE_GRACE_S + 0.5


async def test_a_shutdown_with_the_deadline_is_not_taken_back_by_a_second_look() -> None:
    """The exchange looks at its deadline twice when it cuts a body's read short (the
    read's handler re-raises, then the exchange's own looks again): with a shutdown in the
    same turn as the deadline, the second look took the shutdown's cancellation back too,
    and a stopping worker recorded a send cut short as a timeout and went on."""
    loop = asyncio.get_running_loop()
    never: asyncio.Future[str] = loop.create_future()

    async def read_then_answer() -> str:
        expiry = Expiry(0)
        try:  # the body's read asks first, then the exchange (connectors/exchange.py)
            return await unless_ended(expiry, unless_ended(expiry, never, "read cut short"))
        finally:
            expiry.disarm()

    task = asyncio.create_task(read_then_answer())
    await asyncio.sleep(0)  # the task armed its deadline (due now) and waits
    loop.call_later(0, task.cancel)  # a shutdown, due just after the deadline
    time.sleep(0.01)  # both are due when the loop next looks: the deadline fires first
    with pytest.raises(asyncio.CancelledError):
        await task

"""The worker's per-send deadline: it ends only what it timed, and only when it fired."""

from __future__ import annotations

import asyncio

import pytest

from estafeta.delivery.expiry import Expiry


async def bounded(seconds: float, work: asyncio.Future[str], *, given: bool = False) -> str:
    """`work`'s result, or "expired" when the deadline ended the wait; `given`: the task is
    handed to the deadline (as the worker does) rather than looked up."""
    expiry = Expiry(seconds, asyncio.current_task()) if given else Expiry(seconds)
    try:
        return await work
    except asyncio.CancelledError:
        if not expiry.ended_it():
            raise
        return "expired"
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

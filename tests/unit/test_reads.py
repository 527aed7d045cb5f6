"""The bound on the reads of /health/detailed, /metrics and the alerts: a busy process's."""

from __future__ import annotations

import asyncio
import time

import pytest

from estafeta.delivery.expiry import LATE_GRACE_S
from estafeta.observability.reads import within
from tests.unit.late_loop import late_at_every_turn


async def test_a_read_answered_while_the_process_was_busy_is_not_given_up() -> None:
    """The store answered the read's first round trip in time, but the event loop was blocked
    past the bound (a large body parsed, a GC pause, a machine short of CPU): the bound ran
    out in the turn the answer was read, before the read could send its second statement,
    and `/health/detailed` said the store was `unavailable` (an alert round, that it was
    not answering)."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[None] = loop.create_future()

    async def ping_then_count() -> str:
        await answered  # the ping's answer
        await asyncio.sleep(0.001)  # the count's round trip
        return "counted"

    reading = asyncio.ensure_future(within(ping_then_count(), timeout_s=0.1))
    await asyncio.sleep(0)  # the read is sent, its bound running
    loop.call_later(0.01, answered.set_result, None)  # the store answers in time
    time.sleep(0.3)  # busy past the bound
    assert await reading == "counted"


async def test_a_read_never_answered_is_given_up_in_a_process_behind_at_every_turn() -> None:
    loop = asyncio.get_running_loop()
    never: asyncio.Future[str] = loop.create_future()
    started = time.monotonic()
    with late_at_every_turn(), pytest.raises(TimeoutError, match=r"no answer within 0\.05 s"):
        await within(never, timeout_s=0.05)
    assert time.monotonic() - started < 0.05 + LATE_GRACE_S + 0.5

"""Reads of shared state for an operator's question (`/health/detailed`, `/metrics`), each
answered within a bound.

A store or Redis that hangs (a stopped server, a network that drops packets) would otherwise
hold the answer for the driver's own limits: up to PostgreSQL's 30 s command timeout per
query, 37 s measured for `/health/detailed`. A probe or a scraper gives up long before
that and learns nothing, not even what this process could still tell.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from redis.asyncio import Redis

from estafeta.delivery.expiry import Expiry
from estafeta.redis_client import REDIS_ERRORS, describe, write_probe

T = TypeVar("T")

READ_TIMEOUT_S = 3.0  # above the Redis client's ~1 s, well under a scraper's usual 10 s


async def within(read: Awaitable[T], timeout_s: float = READ_TIMEOUT_S) -> T:
    """The result of `read`, or TimeoutError once `timeout_s` has passed.

    The read is cancelled but not waited for: cancelling a query on a hung connection waits
    for the server again (asyncio.wait_for took 3 s to give up on a 1 s bound). A bound that
    runs out late (the process was busy) gives the read a little more (an `Expiry`,
    delivery/expiry.py): the answers that came meanwhile are read in the very turn it runs
    out, and the read's next statement (the detailed health's count after its ping) had no
    turn to go out, so that the store was reported `unavailable`.
    """
    task = asyncio.ensure_future(read)
    expiry = Expiry(timeout_s)
    try:
        await asyncio.wait({task})  # cancelled by the expiry, the read is not
    except asyncio.CancelledError:
        task.cancel()
        if not expiry.ended_it():
            raise  # the caller went away
        task.add_done_callback(_retrieve)
        raise TimeoutError(f"no answer within {timeout_s:g} s") from None
    finally:
        expiry.disarm()
    return task.result()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Take a given-up read's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def redis_unwritable(client: Redis, key_prefix: str) -> tuple[str, str] | None:
    """None when Redis takes a write of `<key_prefix>probe` within `READ_TIMEOUT_S` (its client
    fails within about 1 s: a call that timed out is not tried again), else the error's class
    name and what it means (`redis_client.describe`). A write, not a PING: a full Redis, a
    read-only replica or an ACL user without write permission answer a PING."""
    try:
        await within(write_probe(client, f"{key_prefix}probe"))
    except REDIS_ERRORS as exc:  # TimeoutError is an OSError
        return type(exc).__name__, describe(exc)
    return None

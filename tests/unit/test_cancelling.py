"""Closing a component that stops a background task: a cancellation of whoever closes it
is that caller's, and propagates (estafeta/cancelling.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from estafeta.config import load_config_dict
from estafeta.ingress.ratelimit import TenantRateLimiter
from estafeta.redis_client import RedisFailover
from estafeta.store.group_commit import GroupCommitter

Close = Callable[[], Coroutine[Any, Any, None]]  # a component's close() or aclose()


class Stubborn:
    """A background task that, once cancelled, takes until `released` to end."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.released = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            self.cancelled.set()
            await self.released.wait()
            raise


def group_committer_close(background: asyncio.Task[None]) -> Close:
    async def flush(items: Any) -> list[None]:
        return [None] * len(items)

    committer: GroupCommitter[int, None] = GroupCommitter(flush)
    committer._watchdog = background  # its stop is what close() is tested for
    return committer.close


def rate_limiter_aclose(background: asyncio.Task[None]) -> Close:
    config = load_config_dict(
        {"tenants": [{"id": "t", "name": "T", "ingress_rate_limit": "10/second"}]}
    )
    limiter = TenantRateLimiter(config)
    limiter._sharing = background
    return limiter.aclose


def failover_aclose(background: asyncio.Task[None]) -> Close:
    failover = RedisFailover("test", retry_s=5.0)
    failover._probing = background
    return failover.aclose


@pytest.mark.parametrize("closer", [group_committer_close, rate_limiter_aclose, failover_aclose])
async def test_a_caller_cancelled_while_it_closes_is_cancelled(
    closer: Callable[[asyncio.Task[None]], Close],
) -> None:
    # Before: close() awaited its cancelled task under suppress(CancelledError), which also
    # swallowed the caller's own cancellation (a shutdown's): the caller went on.
    background = Stubborn()
    close = closer(background.task)
    closing = asyncio.get_running_loop().create_task(close())
    await background.cancelled.wait()  # close() waits for the task to end
    closing.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert closing.cancelled()
    finally:
        background.released.set()
        await asyncio.wait({background.task})
    assert background.task.cancelled()

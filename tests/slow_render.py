"""A metrics render that takes as long as the event loop stays blocked: proof that a scrape
renders off the loop (a hub of ~900 destinations renders for a few hundred ms)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from prometheus_client import Metric

from estafeta.observability.metrics import REGISTRY

# How long a render on the loop waits for the loop before giving up: far above what a loop
# that keeps turning needs, so only a blocked loop reaches it.
GIVE_UP_S = 3.0


class _WaitsForTheLoop:
    """A collector whose render lasts until the event loop has turned during it."""

    def __init__(self) -> None:
        self.rendering = threading.Event()
        self.loop_turned = threading.Event()
        self.saw_the_loop_turn: list[bool] = []

    def describe(self) -> list[Metric]:
        return []  # no names to reserve in the registry

    def collect(self) -> Iterator[Metric]:
        self.rendering.set()
        self.saw_the_loop_turn.append(self.loop_turned.wait(GIVE_UP_S))
        return iter(())


@asynccontextmanager
async def render_waiting_for_the_loop() -> AsyncIterator[_WaitsForTheLoop]:
    """REGISTRY with a collector whose render waits for the loop; while it is in place the
    loop tells it each time it turns during a render."""
    slow = _WaitsForTheLoop()

    async def turning() -> None:
        while True:
            if slow.rendering.is_set():
                slow.loop_turned.set()
            await asyncio.sleep(0.005)

    REGISTRY.register(slow)
    ticker = asyncio.create_task(turning())
    try:
        yield slow
    finally:
        ticker.cancel()
        REGISTRY.unregister(slow)

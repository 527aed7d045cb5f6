"""A process behind at every turn of its event loop, for the tests of the grace that a
deadline found late gives (delivery/expiry.py): the grace must still end."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator


@contextlib.contextmanager
def late_at_every_turn(by_s: float = 0.06) -> Iterator[None]:
    """Block the running loop for `by_s` at each of its turns, until the block ends."""
    loop = asyncio.get_running_loop()

    def busy() -> None:
        time.sleep(by_s)
        turns.append(loop.call_soon(busy))

    turns = [loop.call_soon(busy)]
    try:
        yield
    finally:
        turns[-1].cancel()

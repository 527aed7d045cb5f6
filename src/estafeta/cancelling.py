"""Stopping a background task from the code that owns it."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended. Its own CancelledError, asked for here, is
    not raised; an error it ended with is. A cancellation of the caller meanwhile propagates:
    `with suppress(CancelledError): await task` took it for the task's and swallowed it, so
    a caller cancelled while closing went on as if it had not been."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.result()

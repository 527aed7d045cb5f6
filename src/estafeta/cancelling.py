"""Stopping a background task from the code that owns it."""

from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Future[T]) -> T | None:
    """Cancel `task` and wait until it has ended: None if the cancellation ended it, else
    what it returned (it ended first; the caller may have to undo it), or the error it
    ended with, raised. A cancellation of the caller meanwhile propagates: `with
    suppress(CancelledError): await task` took it for the task's and swallowed it, so a
    caller cancelled while closing went on as if it had not been."""
    task.cancel()
    await asyncio.wait({task})
    return None if task.cancelled() else task.result()

"""A stop signal while `serve` or `worker` is still starting (server.unless_stopped): the
start ends there, gracefully, whatever the step was doing when the signal came."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import pytest
import uvloop

from estafeta.server import STOP_SIGNALS, unless_stopped


@pytest.fixture
async def handlers(monkeypatch: pytest.MonkeyPatch) -> dict[int, Callable[[], object]]:
    """The stop signals' handlers as `unless_stopped` installs them, called by the test in
    the turn it chooses (no signal is sent to the test process)."""
    installed: dict[int, Callable[[], object]] = {}
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "add_signal_handler", installed.__setitem__)
    monkeypatch.setattr(loop, "remove_signal_handler", installed.pop)
    return installed


async def test_a_stop_signal_as_a_step_ends_stops_the_start(
    handlers: dict[int, Callable[[], object]],
) -> None:
    """The signal came in the very turn the step (the migration, the presence's record)
    ended: its result was taken and the process went on to serve or deliver, deaf to the
    SIGTERM it had consumed, until its supervisor killed it. What the step opened is undone."""
    assert signal.SIGTERM in STOP_SIGNALS
    undone: list[str] = []

    async def step() -> str:
        await asyncio.sleep(0)  # under way, the handlers installed
        handlers[signal.SIGTERM]()  # the signal comes as the step ends
        return "store"

    async def undo(result: str) -> None:
        undone.append(result)

    assert await unless_stopped(step(), undo=undo) is None
    assert undone == ["store"]  # closed, as a step cut short closes it itself
    assert not handlers  # given back to the server's or the worker's own


def test_a_sigterm_as_a_step_ends_stops_the_start_on_the_servers_loop() -> None:
    """As above, with a real SIGTERM on the loop `serve` and `worker` run on (uvloop,
    server.run): the signal handled in the turn the step ended, its result was taken."""
    undone: list[str] = []

    async def step() -> str:
        await asyncio.sleep(0)  # under way, the handlers installed
        os.kill(os.getpid(), signal.SIGTERM)  # handled by them: the process goes on
        return "store"

    async def undo(result: str) -> None:
        undone.append(result)

    async def start() -> str | None:
        return await unless_stopped(step(), undo=undo)

    assert uvloop.run(start()) is None
    assert undone == ["store"]


async def test_a_stop_signal_during_a_step_cancels_it(
    handlers: dict[int, Callable[[], object]],
) -> None:
    cancelled = asyncio.Event()
    waiting = asyncio.Event()

    async def step() -> str:
        waiting.set()
        try:
            await asyncio.Event().wait()  # a database that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "store"

    async def stop_once_waiting() -> None:
        await waiting.wait()
        handlers[signal.SIGTERM]()

    stopping = asyncio.create_task(stop_once_waiting())
    assert await unless_stopped(step()) is None
    await stopping
    assert cancelled.is_set()


async def test_a_step_that_ends_before_any_signal_gives_its_result(
    handlers: dict[int, Callable[[], object]],
) -> None:
    async def step() -> str:
        return "store"

    assert await unless_stopped(step()) == "store"
    assert not handlers

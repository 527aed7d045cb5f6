"""A crashing background task is logged and restarted, never silently gone."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from estafeta.supervise import supervised


async def test_a_crashing_task_is_restarted_until_it_finishes() -> None:
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("boom")

    with capture_logs() as logs:
        await supervised("flaky", flaky, asyncio.Event(), first_pause_s=0.001)
    assert runs == 3
    crashes = [entry for entry in logs if entry["event"] == "task_crashed"]
    assert [c["task"] for c in crashes] == ["flaky", "flaky"]


async def test_a_stopped_supervisor_does_not_restart() -> None:
    stop = asyncio.Event()
    runs = 0

    async def failing() -> None:
        nonlocal runs
        runs += 1
        stop.set()
        raise RuntimeError("boom")

    with capture_logs():
        await supervised("failing", failing, stop, first_pause_s=0.001)
    assert runs == 1

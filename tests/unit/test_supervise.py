"""A crashing background task is logged and restarted, never silently gone."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from estafeta.observability.metrics import REGISTRY
from estafeta.supervise import Tasks, supervised


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


async def test_a_task_that_ran_well_for_a_while_is_restarted_after_the_first_pause() -> None:
    """The doubling pause is for a task that keeps dying at once; one that crashes after a long
    healthy run (a rare bug) must not wait the longest pause, with deliveries stopped."""
    now = [1_000.0]
    runs = 0

    async def rare_crash() -> None:
        nonlocal runs
        runs += 1
        if runs <= 5:
            raise RuntimeError("crash loop")  # at once: 1, 2, 4, 8, 16 pauses
        if runs == 6:
            now[0] += 3600.0  # an hour of work before the next crash
            raise RuntimeError("rare bug")

    with capture_logs() as logs:
        await supervised(
            "worker", rare_crash, asyncio.Event(), first_pause_s=0.001, monotonic=lambda: now[0]
        )
    pauses = [e["restart_in_s"] for e in logs if e["event"] == "task_crashed"]
    assert pauses == [0.001, 0.002, 0.004, 0.008, 0.016, 0.001]


async def test_a_crashed_task_is_named_down_until_it_is_started_again() -> None:
    """What the worker's /health reads: down between the crash and the restart only."""
    tasks = Tasks()
    seen: list[dict[str, str]] = []
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        seen.append(dict(tasks.down))  # as it (re)starts
        if runs == 1:
            raise RuntimeError("boom")

    async def watch() -> None:
        while runs < 2:
            if tasks.down:
                seen.append({"paused": ",".join(f"{k}={v}" for k, v in tasks.down.items())})
            await asyncio.sleep(0)

    with capture_logs():
        await asyncio.gather(
            supervised("worker", flaky, asyncio.Event(), first_pause_s=0.01, tasks=tasks),
            watch(),
        )
    assert seen[0] == {} and seen[-1] == {}  # running, then running again
    assert {"paused": "worker=RuntimeError"} in seen
    assert tasks.down == {}


async def test_every_crash_is_counted_by_task() -> None:
    """What a process's presence reads to tell a delivery task that keeps crashing from one
    that runs, and what /metrics counts (`estafeta_task_crashes_total`)."""
    tasks = Tasks()
    runs = 0
    before = REGISTRY.get_sample_value("estafeta_task_crashes_total", {"task": "counted"}) or 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError("boom")

    with capture_logs():
        await supervised("counted", flaky, asyncio.Event(), first_pause_s=0.001, tasks=tasks)
    assert tasks.crashes == {"counted": 3}
    assert tasks.down == {}
    counted = REGISTRY.get_sample_value("estafeta_task_crashes_total", {"task": "counted"})
    assert counted == before + 3

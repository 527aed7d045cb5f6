"""The connections kept for the hot statements (store/held.py), on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from estafeta.errors import StoreError, StoreUnavailable
from estafeta.store.held import HeldConnections


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_async_engine(postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        yield made
    finally:
        await made.dispose()


def checked_out(engine: AsyncEngine) -> int:
    return int(engine.pool.checkedout())  # type: ignore[attr-defined]


async def backend_pid(held: HeldConnections) -> int:
    async with held.driver() as driver:
        return int(await driver.fetchval("SELECT pg_backend_pid()"))


async def test_consecutive_statements_share_one_connection_without_checkouts(
    engine: AsyncEngine,
) -> None:
    held = HeldConnections(engine, keep=2)
    first = await backend_pid(held)
    assert [await backend_pid(held) for _ in range(5)] == [first] * 5
    assert checked_out(engine) == 1  # kept out of the pool between statements
    await held.close()
    assert checked_out(engine) == 0


async def test_a_statement_that_fails_for_its_data_keeps_its_connection(
    engine: AsyncEngine,
) -> None:
    held = HeldConnections(engine, keep=2)
    before = await backend_pid(held)
    with pytest.raises(StoreError, match="DivisionByZeroError"):
        async with held.driver() as driver:
            await driver.fetchval("SELECT 1 / 0")
    assert await backend_pid(held) == before
    await held.close()


async def test_a_statement_cancelled_midway_does_not_hand_its_connection_on(
    engine: AsyncEngine,
) -> None:
    held = HeldConnections(engine, keep=2)
    before = await backend_pid(held)

    async def slow() -> None:
        async with held.driver() as driver:
            await driver.execute("SELECT pg_sleep(5)")

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slow(), timeout=0.1)
    after = await backend_pid(held)
    assert after != before  # a fresh connection, in a known state
    await held.close()
    assert checked_out(engine) == 0


async def test_a_connection_the_server_ended_gives_unavailable_once_then_is_replaced(
    engine: AsyncEngine, postgres_url: str
) -> None:
    held = HeldConnections(engine, keep=2)
    victim = await backend_pid(held)
    admin = await asyncpg.connect(postgres_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim)
    finally:
        await admin.close()
    # The client may not have read the server's goodbye yet: at worst one StoreUnavailable.
    try:
        replacement = await backend_pid(held)
    except StoreUnavailable:
        replacement = await backend_pid(held)
    assert replacement != victim
    await held.close()


async def test_only_as_many_as_it_keeps_stay_out_of_the_pool(engine: AsyncEngine) -> None:
    held = HeldConnections(engine, keep=2)
    in_use = asyncio.Event()
    release = asyncio.Event()
    entered = 0

    async def hold() -> None:
        nonlocal entered
        async with held.driver() as driver:
            await driver.fetchval("SELECT 1")
            entered += 1
            if entered == 4:
                in_use.set()
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(4)]
    await in_use.wait()
    assert checked_out(engine) == 4
    release.set()
    await asyncio.gather(*tasks)
    assert checked_out(engine) == 2
    await held.close()
    assert checked_out(engine) == 0


async def test_a_sets_planner_settings_stay_with_its_statements(engine: AsyncEngine) -> None:
    """The lease's connections plan without whole-table reads (store/postgres.py); a session
    one of them gave back to the pool, taken by another set, plans as the server says."""
    leases = HeldConnections(engine, keep=1, planner=(("enable_seqscan", "off"),))
    others = HeldConnections(engine, keep=1)

    async def setting(held: HeldConnections) -> tuple[int, str]:
        async with held.driver() as driver:
            await asyncio.sleep(0)  # held at once by the gather below: two sessions
            return int(await driver.fetchval("SELECT pg_backend_pid()")), str(
                await driver.fetchval("SHOW enable_seqscan")
            )

    taken = await asyncio.gather(setting(leases), setting(leases))
    assert [value for _, value in taken] == ["off", "off"]
    # One of the two went back to the pool (it keeps one); the others' set takes it.
    pid, value = await setting(others)
    assert pid in {p for p, _ in taken}
    assert value == "on"
    assert (await setting(leases))[1] == "off"
    await leases.close()
    await others.close()

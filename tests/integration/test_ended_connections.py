"""PostgreSQL ending some of estafeta's connections while the server itself stays up: an
administrator's `pg_terminate_backend`, a failover proxy, `idle_session_timeout`. The
requests after it are answered as usual, not with `503 store_unavailable`.

Each test has a database of its own, so that terminating every other backend of it, or
setting its `idle_session_timeout`, touches no other test's connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from estafeta.api.app import create_app
from estafeta.api.auth import hash_key
from estafeta.config import load_config_dict
from estafeta.errors import StoreUnavailable
from estafeta.hub import Hub
from estafeta.store import open_store
from estafeta.store.base import store_errors
from estafeta.store.postgres import PostgresStore
from tests.chaos.conftest import pg_target, via_proxy
from tests.conftest import base_config, fresh_database, signed

pytestmark = pytest.mark.postgres

ADMIN = {"authorization": "Bearer test-admin-key"}
SOL_KEY = "est_sol_key_for_tests_0000000000000000000"
SOL = {"authorization": f"Bearer {SOL_KEY}"}
MESSAGE = orjson.dumps({"type": "message.received", "data": {"kind": "text", "text": "Olá"}})


@dataclass
class Served:
    http: httpx.AsyncClient
    store: PostgresStore
    url: str


@asynccontextmanager
async def served(url: str) -> AsyncIterator[Served]:
    """The API and ingest of a hub on the database at `url` (no spool: a webhook the store
    does not take is answered 503, so none is hidden in a spool)."""
    config = load_config_dict(base_config(url))
    store = open_store(config.storage.url)
    assert isinstance(store, PostgresStore)
    await store.migrate()
    await store.sync_config(config, 1_700_000_000_000)
    await store.create_api_key(
        tenant_id="clinica-sol", key_hash=hash_key(SOL_KEY), label="", actor="test", now_ms=1
    )
    hub = Hub(config, store)
    transport = httpx.ASGITransport(app=create_app(hub))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            yield Served(http, store, url)
    finally:
        await hub.close()
        await store.close()


async def requests(hub: Served, n: int, tag: str) -> list[httpx.Response]:
    """`n` of each kind at once: a webhook (the hot path's kept connections), an event read
    with the admin key and one with a tenant's key (looked up in the store), and the
    detailed health (pooled connections)."""

    async def webhook(i: int) -> httpx.Response:
        return await hub.http.post(
            "/in/crm-events", content=MESSAGE, headers=signed(MESSAGE, f"{tag}_{i}")
        )

    async def health() -> httpx.Response:
        return await hub.http.get("/health/detailed", headers=ADMIN)

    async def event_read(headers: dict[str, str]) -> httpx.Response:
        # An id that does not exist: 404 once the store answered, 503 when it did not.
        return await hub.http.get("/api/v1/events/evt_none", headers=headers)

    made = [webhook(i) for i in range(n)]
    made += [event_read(ADMIN) for _ in range(n)] + [event_read(SOL) for _ in range(n)]
    made += [health() for _ in range(n)]
    return list(await asyncio.gather(*made))


def answered(responses: list[httpx.Response]) -> list[tuple[str, int]]:
    """Each request's path and status, where the store did not answer it (503, 500)."""
    failed = []
    for r in responses:
        status = r.status_code
        if r.url.path == "/health/detailed" and r.json()["checks"]["store"]["status"] != "ok":
            status = 503
        if status >= 500:
            failed.append((r.url.path, status))
    return failed


async def terminate_others(url: str) -> int:
    """End every other session of the test's own database, as an administrator would."""
    admin = await asyncpg.connect(url)
    try:
        ended: int = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return ended
    finally:
        await admin.close()


def idle_drivers(store: PostgresStore) -> list[Any]:
    """The asyncpg connections the store keeps idle: in SQLAlchemy's pool, and the hot
    path's kept ones (store/held.py). Internals, read only to wait without guessing."""
    queue = store.engine.sync_engine.pool._pool._queue._queue  # type: ignore[attr-defined]
    pooled = [record.dbapi_connection for record in queue]
    kept = [conn.sync_connection.connection.dbapi_connection for conn in store._held._idle]  # type: ignore[union-attr]
    return [c.driver_connection for c in [*pooled, *kept] if c is not None]


async def until_all_closed(store: PostgresStore, timeout_s: float = 10) -> int:
    """Wait until the client has read the server's goodbye on every idle connection (what
    a running process does within a millisecond); returns how many there were."""
    deadline = time.monotonic() + timeout_s
    while True:
        drivers = idle_drivers(store)
        if drivers and all(d.is_closed() for d in drivers):
            return len(drivers)
        assert time.monotonic() < deadline, [d.is_closed() for d in drivers]
        await asyncio.sleep(0.01)


# Long enough that a machine short of CPU serves a round of requests within half of it
# (store/idle_limit.py replaces connections idle for half), stalls and all.
IDLE_SESSION_TIMEOUT_MS = 1000


async def set_idle_session_timeout(url: str, ms: int) -> None:
    """Set the test database's `idle_session_timeout`, for sessions opened from now on."""
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(
            "SELECT set_config('x.db', current_database(), false);"
            " DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET idle_session_timeout"
            f" = {ms}', current_setting('x.db')); END $$"
        )
    finally:
        await admin.close()


async def test_requests_after_an_administrator_ended_the_idle_connections_are_answered() -> None:
    with fresh_database("estafeta_ended") as url:
        async with served(url) as hub:
            assert answered(await requests(hub, 4, "before")) == []
            assert await terminate_others(url) >= 4
            assert await until_all_closed(hub.store) >= 4
            assert answered(await requests(hub, 4, "after")) == []


async def test_requests_after_idle_session_timeout_ended_the_connections_are_answered() -> None:
    """With `idle_session_timeout` on the database, every quiet spell longer than it ends
    the idle connections: each such spell cost the first requests after it a 503."""
    with fresh_database("estafeta_ended") as url:
        await set_idle_session_timeout(url, IDLE_SESSION_TIMEOUT_MS)
        async with served(url) as hub:
            for spell in range(2):
                assert answered(await requests(hub, 4, f"spell{spell}")) == []
                assert await until_all_closed(hub.store) >= 4  # idle for the timeout: ended
            assert answered(await requests(hub, 4, "last")) == []


async def test_requests_after_a_busy_spell_past_idle_session_timeout_are_answered() -> None:
    """A process busy when `idle_session_timeout` ends its idle connections (a second's work
    on the event loop, a machine short of CPU) reads the server's goodbye only after it has
    handed the connections out again: each request that took one was answered 503 (13 of 16
    here), where nothing in the connection showed it ended. Those idle for half the limit
    are now replaced before use."""
    with fresh_database("estafeta_ended") as url:
        await set_idle_session_timeout(url, IDLE_SESSION_TIMEOUT_MS)
        async with served(url) as hub:
            assert answered(await requests(hub, 4, "before")) == []
            time.sleep(IDLE_SESSION_TIMEOUT_MS / 1000 + 0.2)  # busy while the server ends them
            assert answered(await requests(hub, 4, "after")) == []


class LingeringProxy:
    """Forwards 127.0.0.1:`port` to PostgreSQL, and when the server ends a connection passes
    its last words (the FATAL error) on but keeps the client's socket open: the driver has
    read the error and not yet the end of the connection, the instant in which a process
    under load may start its next statement on it."""

    def __init__(self) -> None:
        self.port = 0
        self.lingering = False  # from now on, keep the client's side of ended connections
        self.ended = 0  # connections the server ended since, their last bytes passed on
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*pg_target())
        self._writers += [writer, up_writer]

        quit = False  # the client said goodbye itself (Terminate): nothing to keep open

        async def upward() -> None:
            nonlocal quit
            while data := await reader.read(65536):
                if up_writer.is_closing():  # the server is gone: so is this connection
                    writer.transport.abort()
                    return
                quit = quit or data[:1] == b"X"
                up_writer.write(data)
            up_writer.transport.abort()

        async def downward() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            up_writer.close()
            if self.lingering and not quit:
                self.ended += 1  # and the client's socket stays open
            else:
                writer.close()

        await asyncio.gather(upward(), downward(), return_exceptions=True)


@pytest.fixture
async def lingering() -> AsyncIterator[LingeringProxy]:
    proxy = LingeringProxy()
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def until_ended(proxy: LingeringProxy, count: int, timeout_s: float = 10) -> None:
    """Wait until the server's goodbye on `count` connections was passed on, and the client
    (in this event loop, over loopback) had a turn to read it."""
    deadline = time.monotonic() + timeout_s
    while proxy.ended < count:
        assert time.monotonic() < deadline, proxy.ended
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


async def test_a_statement_on_a_connection_the_server_has_just_ended_is_unavailable(
    lingering: LingeringProxy,
) -> None:
    """asyncpg, told by the server that the connection ends, refuses the next statement with
    its own InternalClientError ('cannot switch to state 15; another operation (2) is in
    progress') until it reads the end itself. On a connection being set up (its `SET jit =
    off`, run raw on the driver) nothing translated it: under load, with connections ended,
    webhooks and API reads were answered 500 with an `unhandled_error` traceback, and the
    spool's drain would have quarantined acknowledged events as refused by the store."""
    with fresh_database("estafeta_ended") as url:
        driver = await asyncpg.connect(via_proxy(url, lingering.port))
        try:
            lingering.lingering = True
            await terminate_others(url)
            await until_ended(lingering, 1)
            with pytest.raises(StoreUnavailable, match="InternalClientError"), store_errors():
                await driver.execute("SET jit = off")
        finally:
            driver.terminate()

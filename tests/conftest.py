"""Fixtures shared by every level of tests.

`store` is parametrized over both engines: SQLite in a temporary file and the real
PostgreSQL server (a database made for this test session, emptied between tests). Without
a PostgreSQL server the PostgreSQL half is skipped locally, and fails under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import structlog
from sqlalchemy import create_engine, text

from estafeta.config import Config, load_config_dict
from estafeta.connectors.http import sign_webhook
from estafeta.delivery.model import LeasedDelivery
from estafeta.observability import logging as estafeta_logging
from estafeta.server import GracefulServer, uvicorn_server
from estafeta.store import open_store
from estafeta.store.schema import metadata
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.sink import Sink
from tests.certificates import Certificates, make_certificates

# A command run in-process (click's CliRunner) configures logging for the whole process:
# without this, every later test's capture_logs missed the lines of the loggers it cached,
# and its level filter stayed.
estafeta_logging.CACHE_LOGGERS = False


@pytest.fixture(autouse=True)
def _logging_as_before() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


PG_ADMIN_URL = os.environ.get(
    "ESTAFETA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"


def _pg_sync_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """`postgresql://…/<prefix>_<pid>_<random>`: a database made on the real server, dropped
    (FORCE) afterwards. Without a server the test is skipped, and fails under CI=true."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(_pg_sync_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        if IN_CI:
            pytest.fail(f"PostgreSQL is required under CI=true and is not reachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _pgbouncer_program() -> str:
    """PgBouncer's program (`make test` installs Debian's `pgbouncer`): skips the test
    without it, fails it under CI=true."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/sbin")
    if found is None:
        if IN_CI:
            pytest.fail("pgbouncer is required under CI=true (`make test` installs it)")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    return found


@contextmanager
def pgbouncer(directory: Path, database_url: str, *, pool_mode: str) -> Iterator[str]:
    """`database_url` through a PgBouncer of its own in `pool_mode` ("transaction", as
    hosted poolers run): the URL to give estafeta. It trusts every user, as the test server
    does; it runs as `nobody` when we are root (PgBouncer refuses to run as root)."""
    program = _pgbouncer_program()
    server = urlsplit(database_url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    users = directory / "pgbouncer-users.txt"
    users.write_text(f'"{server.username}" ""\n')
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n* = host={server.hostname} port={server.port or 5432}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {users}\npool_mode = {pool_mode}\n"
        "default_pool_size = 5\nmax_client_conn = 200\n"
    )
    as_user = ["-u", "nobody"] if os.geteuid() == 0 else []
    log = directory / "pgbouncer.log"  # a file: a pipe left unread would fill, and block it
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [program, *as_user, str(ini)], stdout=subprocess.DEVNULL, stderr=log_file
        )
    try:
        deadline = time.monotonic() + 10
        while True:  # until it listens (it logs nothing we could wait on otherwise)
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pgbouncer did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        yield server._replace(netloc=f"{server.username}@127.0.0.1:{port}").geturl()
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def empty_database(engine: str, tmp_path: Path, name: str) -> Iterator[str]:
    """The URL of an empty database of `engine` ("sqlite" or "postgresql") named after
    `name`: a file in `tmp_path`, or a fresh database on the real server."""
    if engine == "sqlite":
        yield f"sqlite:///{tmp_path / f'{name}.db'}"
    else:
        with fresh_database(f"estafeta_{name}") as url:
            yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with fresh_database("estafeta_test") as url:
        yield url


def _truncate_postgres(url: str) -> None:
    engine = create_engine(_pg_sync_url(url))
    with engine.begin() as conn:
        names = ", ".join(t.name for t in reversed(metadata.sorted_tables))
        exists = conn.execute(text("SELECT to_regclass('public.events')")).scalar()
        if exists:
            conn.execute(text(f"TRUNCATE {names} CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for each engine, empty at the start of the test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'estafeta.db'}"
    url: str = request.getfixturevalue("postgres_url")
    _truncate_postgres(url)
    return url


def base_config(database_url: str, **overrides: Any) -> dict[str, Any]:
    """A small valid configuration: one tenant, a signed source, two http destinations."""
    data: dict[str, Any] = {
        "storage": {"url": database_url},
        "security": {"admin_key": "test-admin-key"},
        "worker": {"poll_interval_s": 0.05, "rescue_interval_s": 0.2},
        "tenants": [
            {"id": "clinica-sol", "name": "Clínica Sol", "ingress_rate_limit": "100000/minute"},
            {"id": "outra", "name": "Outra", "ingress_rate_limit": "100000/minute"},
        ],
        "sources": [
            {
                "id": "crm-events",
                "tenant": "clinica-sol",
                "kind": "generic",
                "secret": SOURCE_SECRET,
                "event_type": "crm.webhook",
            },
            {"id": "keyed", "tenant": "clinica-sol", "kind": "generic", "api_key": "source-key-1"},
            {"id": "outra-in", "tenant": "outra", "kind": "generic", "api_key": "outra-key-1"},
        ],
        "destinations": [
            {
                "id": "crm",
                "tenant": "clinica-sol",
                "url": "http://127.0.0.1:9/crm",
                "secret": SINK_SECRET,
                "timeout_s": 2,
                "max_attempts": 3,
                "backoff": {"base_s": 0.05, "factor": 2, "max_s": 0.2, "jitter": 0},
            },
            {
                "id": "billing",
                "tenant": "clinica-sol",
                "url": "http://127.0.0.1:9/billing",
                "secret": SINK_SECRET,
                "timeout_s": 2,
                "max_attempts": 3,
                "backoff": {"base_s": 0.05, "factor": 2, "max_s": 0.2, "jitter": 0},
            },
            {"id": "outra-sink", "tenant": "outra", "url": "http://127.0.0.1:9/outra"},
        ],
        "routes": [
            {
                "id": "messages",
                "tenant": "clinica-sol",
                "events": ["message.*"],
                "destinations": ["crm"],
                "priority": 1,
            },
            {
                "id": "appointments",
                "tenant": "clinica-sol",
                "events": ["appointment.*"],
                "filter": "data.status != 'draft'",
                "destinations": ["crm", "billing"],
                "priority": 2,
            },
            {"id": "outra-all", "tenant": "outra", "events": ["*"], "destinations": ["outra-sink"]},
        ],
    }
    data.update(overrides)
    return data


SOURCE_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def signed(body: bytes, msg_id: str = "msg_1", *, ts: int | None = None) -> dict[str, str]:
    """Headers of a Standard Webhooks request to the `crm-events` source (signed with
    SOURCE_SECRET), stamped now unless `ts` says when."""
    stamp = int(time.time()) if ts is None else ts
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign_webhook(SOURCE_SECRET, msg_id, stamp, body),
    }


SINK_SECRET = "whsec_9sQZGHNKBPLdpN1Cf2pWhMROd+Y32GhePFOfGlgrQy4="
#: Secrets of the rotation tests: the one rotated in (listed first, beside SOURCE_SECRET or
#: SINK_SECRET as the old one) and one configured nowhere.
ROTATED_SECRET = "whsec_bmV3IHNlY3JldCwgcm90YXRlZCBpbiB0b2RheSEh"
UNKNOWN_SECRET = "whsec_YSB0aGlyZCBzZWNyZXQsIG5ldmVyIGNvbmZpZ3VyZWQ="


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """A real HTTP receiver that verifies the deliveries' signatures with SINK_SECRET,
    stopped after the test whatever happened."""
    receiver = Sink(secret=SINK_SECRET)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A private CA and the server and client certificates of `tests/certificates.py`, made
    once for the session."""
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture
def config(database_url: str) -> Config:
    return load_config_dict(base_config(database_url))


@asynccontextmanager
async def migrated_store(config: Config) -> AsyncIterator[SqlStore]:
    """The store of `config`, migrated and holding its configuration; closed after."""
    opened = open_store(config.storage.url)
    await opened.migrate()
    await opened.sync_config(config, 1_700_000_000_000)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def store(config: Config) -> AsyncIterator[SqlStore]:
    """A migrated store holding the base configuration."""
    async with migrated_store(config) as opened:
        yield opened


def leased_delivery(
    payload: bytes, *, event_id: str = "evt_1", destination_id: str = "crm"
) -> LeasedDelivery:
    """A first attempt of `payload` to `destination_id`, as a worker has it once leased."""
    return LeasedDelivery(
        id="dlv_1",
        tenant_id="clinica-sol",
        event_id=event_id,
        destination_id=destination_id,
        attempts=0,
        max_attempts=8,
        priority=1,
        ordering_key=None,
        lease_token="lease",
        lease_expires_at=0,
        payload=payload,
    )


async def lease_any(
    store: SqlStore,
    *,
    now_ms: int,
    limit: int = 100,
    lease_ms: int = 30_000,
    worker_id: str = "w",
) -> list[LeasedDelivery]:
    """Lease as a worker that sends to every destination would: up to `limit` of whatever
    is due, whichever destination it is for."""
    rooms = dict.fromkeys(await store.pending_destinations(), limit)
    return await store.lease(
        now_ms=now_ms, rooms=rooms, limit=limit, lease_ms=lease_ms, worker_id=worker_id
    )


@contextmanager
def out_of_descriptors() -> Iterator[None]:
    """Every file descriptor the process may have is taken, as when clients' connections
    took them all: opening a file, a directory or a socket fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    taken: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:  # the lower descriptors that are free
                taken.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def until_waiting_for_locks(database_url: str, count: int) -> None:
    """Until `count` sessions of the database wait for a lock (10 s at most)."""
    monitor = await asyncpg.connect(database_url)
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            waiting = await monitor.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
            if waiting >= count:
                return
            assert asyncio.get_running_loop().time() < deadline, f"{waiting} waiting"
            await asyncio.sleep(0.01)
    finally:
        await monitor.close()


@asynccontextmanager
async def serving(asgi: Any, **limits: Any) -> AsyncIterator[GracefulServer]:
    """`asgi` served in this process as `estafeta serve` serves it, on any free port, with
    `limits` (the keywords of `uvicorn_server`); stopped after."""
    server = uvicorn_server(asgi, "127.0.0.1:0", **limits)
    running = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):  # start-up, bounded: a server that cannot start never does
            while not server.started:
                await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        await running


def port_of(server: GracefulServer) -> int:
    return int(server.servers[0].sockets[0].getsockname()[1])


@asynccontextmanager
async def served(asgi: Any, **limits: Any) -> AsyncIterator[int]:
    """`asgi` served as `estafeta serve` serves it, on any free port: that port."""
    async with serving(asgi, **limits) as server:
        yield port_of(server)

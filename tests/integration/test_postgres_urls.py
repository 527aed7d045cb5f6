"""PostgreSQL URLs as hosting panels and libpq's documentation write them, against the real
server: each opens a store that migrates and answers (store/postgres_connect.py), and
PgBouncer in transaction mode works with `?statement_cache_size=0` and is refused, saying
so, without it."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from estafeta.config import load_config_dict
from estafeta.errors import StoreError, StoreUnavailable
from estafeta.store import engine_url, open_store
from estafeta.store.migrate import head_revision
from tests.conftest import IN_CI, fresh_database, pgbouncer


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh database (`postgresql://postgres@127.0.0.1:5432/NAME`)."""
    with fresh_database("estafeta_urls") as url:
        yield url


def _parts(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    return parts.username or "", parts.hostname or "", parts.port or 5432, parts.path


async def _session(url: str, *settings: str) -> list[object]:
    """Migrates the store `url` opens (validated as a configuration would be), then reads
    `settings` (`SHOW …`) and the server's address (NULL on a Unix socket) in its session."""
    load_config_dict({"storage": {"url": url}})
    store = open_store(url)
    try:
        await store.migrate()
        await store.require_schema()
        async with store.engine.connect() as conn:
            shown = [(await conn.execute(text(f"SHOW {s}"))).scalar_one() for s in settings]
            address = (await conn.execute(text("SELECT inet_server_addr()"))).scalar_one()
        return [*shown, address]
    finally:
        await store.close()


async def test_heroku_and_render_style_urls(database_url: str) -> None:
    user, host, port, db = _parts(database_url)
    for scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        [address] = await _session(f"{scheme}://{user}@{host}:{port}{db}")
        assert str(address) == "127.0.0.1"


async def test_libpq_parameters_reach_the_session(database_url: str) -> None:
    # Each was refused as an unsupported parameter; `options` sets a session's settings.
    url = (
        f"{database_url}?sslmode=disable&application_name=estafeta-clinic&connect_timeout=3"
        "&options=-c%20statement_timeout%3D4000&target_session_attrs=read-write"
    )
    assert await _session(url, "application_name", "statement_timeout") == [
        "estafeta-clinic",
        "4s",
        ip_address("127.0.0.1"),
    ]


async def _socket_directory(database_url: str) -> str:
    """The test server's Unix socket directory (the first it listens in): the server runs on
    this machine (CONTRIBUTING.md), so it is here; skipped if not, failed under CI=true."""
    engine = create_async_engine(engine_url(database_url))
    try:
        async with engine.connect() as conn:
            shown = (await conn.execute(text("SHOW unix_socket_directories"))).scalar_one()
    finally:
        await engine.dispose()
    directory = str(shown).split(",")[0].strip()
    if not directory or not Path(directory).is_dir():
        if IN_CI:
            pytest.fail(f"the test server's socket directory {directory!r} is not here")
        pytest.skip(f"the test server's socket directory {directory!r} is not here")
    return directory


async def test_a_unix_socket_as_a_parameter_or_as_libpqs_encoded_host(database_url: str) -> None:
    user, _host, port, db = _parts(database_url)
    directory = await _socket_directory(database_url)
    as_parameter = f"postgresql://{db}?host={directory}&port={port}&user={user}"
    # libpq's own form: the directory percent-encoded as the host. It failed as a DNS name.
    as_host = f"postgresql://{user}@{directory.replace('/', '%2F')}:{port}{db}"
    for url in (as_parameter, as_host):
        assert await _session(url) == [None], url


async def test_a_host_list_as_libpq_writes_it(database_url: str) -> None:
    # `h1,h2` failed as one DNS name, `h1:p,h2:p` as a port that is no number, and
    # `?host=h1&host=h2` with a traceback (SQLAlchemy wants every host's port).
    user, host, port, db = _parts(database_url)
    for url in (
        f"postgresql://{user}@{host},localhost{db}",
        f"postgresql://{user}@{host}:{port},localhost:{port}{db}",
        f"postgresql://{user}@{db}?host={host}&host=localhost",
        f"postgresql://{user}@{db}?host={host},localhost&port={port}",
    ):
        [address] = await _session(url)
        assert str(address) in ("127.0.0.1", "::1"), url


async def test_a_percent_encoded_password_and_a_user_with_dots(database_url: str) -> None:
    """A user named as Supabase's pooler names them (`postgres.project`) and a password
    holding `@` and `/`, percent-encoded as the docs say (the test server trusts every
    login: the password is read back from what the store connects with)."""
    _user, host, port, db = _parts(database_url)
    role = _own_role("estafeta.urls", db)
    await _admin(
        database_url,
        f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'p@ss/w0rd'",
        f'GRANT CREATE ON SCHEMA public TO "{role}"',
    )
    try:
        url = f"postgresql://{role}:p%40ss%2Fw0rd@{host}:{port}{db}"
        assert await _session(url, "session_authorization") == [role, ip_address("127.0.0.1")]
        store = open_store(url)
        assert store.engine.url.password == "p@ss/w0rd"
        await store.close()
    finally:
        await _admin(database_url, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')


def _own_role(prefix: str, db: str) -> str:
    """`prefix` named after this test's database: roles belong to the whole server, and
    another run's test of the same name would find it taken, or drop it while in use."""
    return f"{prefix}.{db.lstrip('/')}"


async def _admin(database_url: str, *statements: str) -> None:
    engine = create_async_engine(engine_url(database_url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def test_pgbouncer_in_transaction_mode_needs_the_statement_cache_off(
    database_url: str, tmp_path: Path
) -> None:
    """asyncpg's prepared statements live on one server connection; PgBouncer in transaction
    mode runs each transaction on any. `migrate` passed once, then failed the second time
    with `ProgrammingError (SQLSTATE 42P05)`, and a running hub failed statements at random.
    Now the store refuses to start, saying what to add; with it every command works."""
    with pgbouncer(tmp_path, database_url, pool_mode="transaction") as pooled:
        for _ in range(2):  # the second run met the first's prepared statements
            [address] = await _session(f"{pooled}?statement_cache_size=0")
            assert str(address) == "127.0.0.1"
        # PgBouncer takes no `options`: its reason is shown, not only the error's class.
        store = open_store(f"{pooled}?statement_cache_size=0&options=-c%20jit%3Doff")
        try:
            with pytest.raises(StoreUnavailable) as unreachable:
                await store.require_schema()
            assert str(unreachable.value).endswith(
                "(SQLSTATE 08P01): unsupported startup parameter: options"
            ), unreachable.value
        finally:
            await store.close()
        store = open_store(pooled)
        try:
            for start in (store.require_schema, store.migrate):
                with pytest.raises(StoreError) as refused:
                    await start()
                assert str(refused.value) == (
                    "the store failed: a pooler in transaction mode (PgBouncer) is in front of"
                    " PostgreSQL: add ?statement_cache_size=0 to storage.url"
                )
        finally:
            await store.close()


async def test_pgbouncer_in_session_mode_keeps_the_statement_cache(
    database_url: str, tmp_path: Path
) -> None:
    # Each client keeps its server connection: nothing to refuse, no cost to pay.
    with pgbouncer(tmp_path, database_url, pool_mode="session") as pooled:
        for _ in range(2):
            [address] = await _session(pooled)
            assert str(address) == "127.0.0.1"


async def test_a_role_that_may_not_create_the_schema_is_told_what_it_lacks(
    database_url: str,
) -> None:
    # PostgreSQL 15 took CREATE on schema public from every role: a hosting panel's new user
    # of a database it does not own met `the store failed: ProgrammingError (SQLSTATE 42501)`.
    _user, host, port, db = _parts(database_url)
    role = _own_role("estafeta.readonly", db)
    await _admin(database_url, f'CREATE ROLE "{role}" LOGIN')
    store = open_store(f"postgresql://{role}@{host}:{port}{db}")
    try:
        with pytest.raises(StoreError) as refused:
            await store.migrate()
        assert str(refused.value) == (
            "the store failed: permission denied for schema public (SQLSTATE 42501), while"
            f" creating the schema ({head_revision()}): none of it was kept (the database"
            " still has no estafeta schema)"
        )
    finally:
        await store.close()
        await _admin(database_url, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')

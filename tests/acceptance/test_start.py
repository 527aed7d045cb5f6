"""`estafeta serve`, `worker` and `migrate` starting against what they cannot use as it is: a
listen address or port they cannot have, a database of a newer version, another migration
running at the same time. Each ends with one clear line and the documented status."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from estafeta.store import open_store
from estafeta.store.migrate import current_revision, head_revision, upgrade
from tests.acceptance.conftest import (
    Estafeta,
    hub_config,
    run_cli,
    wait_until,
    write_config,
)
from tests.conftest import base_config, fresh_database, until_waiting_for_locks


@pytest.mark.parametrize("listen", ["abc", "8080", "127.0.0.1:99999"])
@pytest.mark.parametrize(
    ("command", "option"), [("serve", "--listen"), ("worker", "--metrics-listen")]
)
async def test_an_address_option_is_refused_as_the_file_would_refuse_it(
    tmp_path: Path, listen: str, command: str, option: str
) -> None:
    # Before: `abc` was a ValueError traceback; `8080` and port 99999, refused in
    # server.listen, were accepted from --listen.
    config = hub_config(
        f"sqlite:///{tmp_path / 'estafeta.db'}", tmp_path, destinations=[], routes=[]
    )
    path = write_config(tmp_path / "estafeta.toml", config)
    result = await run_cli(command, "--config", str(path), option, listen, cwd=tmp_path)
    assert result.returncode == 2, result
    assert f"Invalid value for '{option}': invalid address '{listen}'" in result.stderr, result
    assert not (tmp_path / "estafeta.db").exists()


async def test_serve_and_worker_refuse_a_database_of_a_newer_version(tmp_path: Path) -> None:
    database = tmp_path / "estafeta.db"
    path = write_config(
        tmp_path / "estafeta.toml",
        hub_config(f"sqlite:///{database}", tmp_path, destinations=[], routes=[]),
    )
    assert (await run_cli("migrate", "--config", str(path), cwd=tmp_path)).returncode == 0
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("UPDATE alembic_version SET version_num = '0099'")  # a newer estafeta's

    for command in (["serve"], ["serve", "--no-migrate"], ["worker"]):
        result = await run_cli(*command, "--config", str(path), cwd=tmp_path, timeout_s=30)
        # Before: `serve` died of alembic's "Can't locate revision" with a traceback.
        assert result.returncode == 2, (command, result)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result
        assert "migration 0099, newer than this version of estafeta" in result.stderr, result


@pytest.mark.timeout(120)
async def test_two_migrates_at_once_on_postgresql_both_succeed(tmp_path: Path) -> None:
    """Two `estafeta migrate` (or two `serve` starting) against one database from 0004: both
    read the revision while a third holds alembic_version, then both go on."""
    with fresh_database("estafeta_twice") as url:
        store = open_store(url)
        try:
            await upgrade(store.engine, "0004")
            async with store.engine.connect() as holder:
                await holder.execute(text("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE"))
                path = write_config(tmp_path / "estafeta.toml", base_config(url))
                both = asyncio.gather(
                    run_cli("migrate", "--config", str(path), cwd=tmp_path),
                    run_cli("migrate", "--config", str(path), cwd=tmp_path),
                )

                async def both_waiting() -> bool:
                    # On a connection of its own: activity is read once per transaction.
                    async with store.engine.connect() as conn:
                        waiting = await conn.execute(
                            text(
                                "SELECT count(*) FROM pg_stat_activity"
                                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                            )
                        )
                        return waiting.scalar() == 2

                await wait_until(both_waiting, timeout_s=30, what="both migrates waiting")
                await holder.rollback()
            results = await both
            assert await current_revision(store.engine) == head_revision()
        finally:
            await store.close()
    # Before: one of them died of Alembic's "Online migration expected to match one row when
    # updating '0004' to '0005'" after dropping an index already dropped, with a traceback.
    for result in results:
        assert (result.returncode, result.stdout) == (0, "schema is up to date (postgresql)\n"), (
            result
        )


async def test_serve_refuses_a_spool_directory_it_cannot_make_and_leaves_no_running_record(
    tmp_path: Path,
) -> None:
    database = tmp_path / "estafeta.db"
    (tmp_path / "a-file").write_text("")
    config = hub_config(f"sqlite:///{database}", tmp_path, destinations=[], routes=[])
    config["storage"]["spool_dir"] = str(tmp_path / "a-file" / "spool")
    path = write_config(tmp_path / "estafeta.toml", config)
    result = await run_cli("serve", "--config", str(path), cwd=tmp_path, timeout_s=30)
    # Before: a NotADirectoryError traceback, after recording the process as running.
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result
    # (after the log of the migration that made the fresh database's schema)
    assert result.stderr.splitlines()[-1].startswith("error: cannot use storage.spool_dir ")
    assert "Not a directory" in result.stderr, result
    with contextlib.closing(sqlite3.connect(database)) as db:
        running = db.execute("SELECT count(*) FROM processes WHERE stopped_at IS NULL")
        assert running.fetchone() == (0,)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command", ["serve", "worker"])
async def test_a_stop_signal_while_starting_stops_gracefully(
    tmp_path: Path, estafeta: Estafeta, signum: signal.Signals, command: str
) -> None:
    """docs/cli.md: SIGTERM or SIGINT stop gracefully, exit 0. While a process was still
    starting (a database slow to answer, another process's migration) SIGTERM killed it
    (-15) and SIGINT ended it with click's `Aborted!` and 1. Here the database takes the
    connection and never answers."""
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await reader.read()  # until the client goes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        path = write_config(
            tmp_path / "estafeta.toml",
            hub_config(
                f"postgresql://postgres@127.0.0.1:{port}/estafeta",
                tmp_path,
                destinations=[],
                routes=[],
            ),
        )
        started = estafeta.start(command, command, "--config", str(path))
        await asyncio.wait_for(connected.wait(), 30)
        started.send_signal(signum)
        code = await started.wait_exit(20)
    finally:
        server.close()
    assert code == 0, f"exit {code} on {signum.name} while starting\n{started.tail()}"
    assert "Traceback" not in started.stderr()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("command", ["serve", "worker"])
async def test_a_stop_signal_while_recording_the_process_stops_gracefully(
    database_url: str, tmp_path: Path, estafeta: Estafeta, command: str
) -> None:
    """The store migrated and reached, a process still takes the store's time and records
    its presence (writes that may wait: the store slow, a lock held) before it serves or
    delivers. SIGTERM then killed `serve` (-15); `worker` logged `stopping` and went on
    waiting. They stop there, exit 0, as while connecting. Here another session holds the
    processes table."""
    path = write_config(
        tmp_path / "estafeta.toml", hub_config(database_url, tmp_path, destinations=[], routes=[])
    )
    assert (await run_cli("migrate", "--config", str(path), cwd=tmp_path)).returncode == 0
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE processes IN ACCESS EXCLUSIVE MODE")
            started = estafeta.start(command, command, "--config", str(path))
            await until_waiting_for_locks(database_url, 1)  # its presence, recorded
            started.send_signal(signal.SIGTERM)
            code = await started.wait_exit(20)
    finally:
        await holder.close()
    assert code == 0, f"exit {code} on SIGTERM while recording its presence\n{started.tail()}"
    assert "Traceback" not in started.stderr()
    await started.wait_log("stopped_while_starting")

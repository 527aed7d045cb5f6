"""The CLI's store commands (`dlq`, `keys`, `migrate`) in-process, on both engines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec
import orjson
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from estafeta.cli import main
from estafeta.cli.common import OutputFailed
from estafeta.clock import SystemClock, iso_from_ms
from estafeta.config import load_config, load_config_dict
from estafeta.delivery.decision import Transition
from estafeta.delivery.outcome import OutcomeKind
from estafeta.delivery.state import DeliveryState
from estafeta.errors import StoreError, StoreUnavailable
from estafeta.server import prepared_store
from estafeta.store import open_store
from estafeta.store.dead_letters import DeadLetterOps
from estafeta.store.migrate import current_revision, head_revision
from estafeta.store.sqlstore import SqlStore
from tests.conftest import (
    PG_ADMIN_URL,
    base_config,
    empty_database,
    lease_any,
    migrated_store,
)
from tests.integration.store_support import NOW, attempt, dead_deliveries, event, rows


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(config)])


def config_file(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "estafeta.toml"
    path.write_text(
        f'[storage]\nurl = "{database_url}"\nspool_dir = "{tmp_path / "spool"}"\n\n'
        '[[tenants]]\nid = "clinica-sol"\nname = "Clínica Sol"\n'
    )
    return path


def test_a_dead_letter_filter_is_a_selection_whatever_its_value(
    tmp_path: Path, database_url: str
) -> None:
    # `--since` the epoch parses to 0; judged by that value it was refused as no selection.
    config = config_file(tmp_path, database_url)
    assert run(config, "migrate").exit_code == 0
    since_epoch = run(config, "dlq", "replay", "--since", "1970-01-01T00:00:00Z")
    assert (since_epoch.exit_code, since_epoch.output) == (0, "0 deliveries replayed\n")
    nothing = run(config, "dlq", "replay")
    assert nothing.exit_code == 2 and "name --id, a filter, or --all" in nothing.output


async def test_one_dead_delivery_is_counted_in_the_singular(
    tmp_path: Path, database_url: str, store: SqlStore
) -> None:
    # Before: "1 dead deliveries", "1 deliveries replayed".
    await store.insert_events([event(destinations=("crm",))])
    [leased] = await lease_any(store, now_ms=NOW)
    await store.complete([attempt(leased, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT)], NOW)
    config = config_file(tmp_path, database_url)
    listed = await asyncio.to_thread(run, config, "dlq", "list")
    assert listed.output.splitlines()[-1] == "1 dead delivery", listed.output
    replayed = await asyncio.to_thread(run, config, "dlq", "replay", "--all")
    assert replayed.output == f"{leased.id}\n1 delivery replayed\n", replayed.output


# On SQLite every process runs on the store's machine and goes by its clock.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_replay_from_a_machine_whose_clock_is_ahead_is_due_at_once(
    tmp_path: Path, database_url: str, store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers go by the store's clock (PostgreSQL's server). Before: `dlq replay` run on an
    # operator's machine 10 minutes ahead made the deliveries due 10 minutes later.
    await store.insert_events([event(destinations=("crm",))])
    [leased] = await lease_any(store, now_ms=NOW)
    await store.complete([attempt(leased, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT)], NOW)
    machine_ms = SystemClock.now_ms
    monkeypatch.setattr(SystemClock, "now_ms", lambda self: machine_ms(self) + 600_000)
    config = config_file(tmp_path, database_url)
    replayed = await asyncio.to_thread(run, config, "dlq", "replay", "--all")
    assert replayed.output == f"{leased.id}\n1 delivery replayed\n", replayed.output
    due = await lease_any(store, now_ms=await store.clock_ms())
    assert [d.id for d in due] == [leased.id]


async def test_a_summary_counts_the_dead_by_destination_and_reason(
    tmp_path: Path, database_url: str, store: SqlStore
) -> None:
    # Thousands of lines of `dlq list` say one thing: what died where, and why.
    deaths = [("crm", "http_401: Unauthorized")] * 3 + [
        ("billing", "timeout"),
        ("crm", "http_404: Not Found"),
    ]
    for n, (destination, _) in enumerate(deaths):
        await store.insert_events([event(destinations=(destination,), at=NOW + n)])
    leased = sorted(await lease_any(store, now_ms=NOW + 10), key=lambda d: d.id)
    completed = [
        msgspec.structs.replace(
            attempt(d, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT, at=NOW + 20),
            transition=Transition(DeliveryState.DEAD, 1, None, reason),
        )
        for d, (_, reason) in zip(leased, deaths, strict=True)
    ]
    await store.complete(completed, NOW + 30)
    config = config_file(tmp_path, database_url)
    listed = await asyncio.to_thread(run, config, "dlq", "list", "--summary", "--limit", "1")
    assert listed.exit_code == 0, listed.output
    died = f"dead {iso_from_ms(NOW + 30)} … {iso_from_ms(NOW + 30)}"
    assert listed.output.splitlines() == [
        f"       3  clinica-sol  crm  {died}  http_401: Unauthorized",
        f"       1  clinica-sol  billing  {died}  timeout",
        f"       1  clinica-sol  crm  {died}  http_404: Not Found",
        "5 dead deliveries",  # every one selected: --limit is a page's, not a summary's
    ]
    as_json = await asyncio.to_thread(
        run, config, "dlq", "list", "--summary", "--json", "--destination", "crm"
    )
    first = orjson.loads(as_json.output.splitlines()[0])
    assert first == {
        "tenant": "clinica-sol",
        "destination": "crm",
        "last_error": "http_401: Unauthorized",
        "count": 3,
        "first_dead_at": iso_from_ms(NOW + 30),
        "last_dead_at": iso_from_ms(NOW + 30),
    }
    assert as_json.output.splitlines()[-1] == "4 dead deliveries"


async def test_a_long_dead_letter_list_is_printed_a_page_at_a_time(
    tmp_path: Path, database_url: str, store: SqlStore
) -> None:
    """`dlq list --limit 1000000` after an outage: read in one query, every dead delivery
    was held in memory (~1 KB each: 1 GB for a million) and nothing printed until the last
    was read. Printed a page at a time, memory stays that of a page and of the output."""
    many = 20_000
    await dead_deliveries(store, many)
    config = config_file(tmp_path, database_url)
    tracemalloc.start()
    try:
        listed = await asyncio.to_thread(run, config, "dlq", "list", "--limit", str(many))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[-1] == f"{many} dead deliveries", lines[-1]
    assert len(lines) == many + 1
    ids = [line.split()[0] for line in lines[:-1]]
    assert len(set(ids)) == many  # every one once, across the pages
    output = len(listed.stdout_bytes) + len(listed.output)
    assert peak < output + 8_000_000, (peak, output)


async def test_a_dead_letter_command_its_limit_cut_short_says_that_more_are_dead(
    tmp_path: Path, database_url: str, store: SqlStore
) -> None:
    """After an outage 1,500 deliveries are dead. Before: `dlq replay --all` (1,000 by
    default) said "1000 deliveries replayed", exit 0, as it says having replayed every one,
    and `dlq list` "1000 dead deliveries": the operator, or a script, took the queue for
    drained while 500 stayed dead."""
    await dead_deliveries(store, 1_500)
    config = config_file(tmp_path, database_url)
    more = "more are dead (raise --limit, or count them with --summary)"
    listed = await asyncio.to_thread(run, config, "dlq", "list")
    assert listed.exit_code == 0, listed.output
    assert listed.stderr.splitlines() == [f"1000 dead deliveries shown: {more}"]
    assert len(listed.stdout.splitlines()) == 1_000

    replayed = await asyncio.to_thread(run, config, "dlq", "replay", "--all")
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stderr.splitlines() == [
        "1000 deliveries replayed: more are still dead (run it again, or raise --limit)"
    ]
    assert set(replayed.stdout.split()) == await pending_ids(store)
    # A limit that takes exactly what is left leaves nothing to say.
    exactly = await asyncio.to_thread(run, config, "dlq", "list", "--limit", "500")
    assert exactly.stderr.splitlines() == ["500 dead deliveries"]
    discarded = await asyncio.to_thread(run, config, "dlq", "discard", "--all", "--limit", "499")
    assert discarded.stderr.splitlines() == [
        "499 deliveries discarded: more are still dead (run it again, or raise --limit)"
    ]
    rest = await asyncio.to_thread(run, config, "dlq", "replay", "--all")
    assert rest.stderr.splitlines() == ["1 delivery replayed"]
    assert len(await pending_ids(store)) == 1_001


async def test_a_replay_of_named_ids_says_which_of_them_it_did_not_move(
    tmp_path: Path, database_url: str, store: SqlStore
) -> None:
    """Before: a mistyped id, or one replayed already, answered "0 deliveries replayed"
    (exit 0) with nothing to say which one or why."""
    await dead_deliveries(store, 2)
    config = config_file(tmp_path, database_url)
    listed = await asyncio.to_thread(run, config, "dlq", "list", "--json")
    first, second = (orjson.loads(line)["id"] for line in listed.stdout.splitlines())
    typo = first[:-1] + ("0" if first[-1] != "0" else "1")
    replayed = await asyncio.to_thread(run, config, "dlq", "replay", "--id", first, "--id", typo)
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stdout.split() == [first]
    assert replayed.stderr.splitlines() == [
        "1 delivery replayed",
        f"not moved, not dead or not in the selection: {typo}",
    ]
    again = await asyncio.to_thread(run, config, "dlq", "discard", "--id", first, "--id", second)
    assert again.stdout.split() == [second]
    assert again.stderr.splitlines() == [
        "1 delivery discarded",
        f"not moved, not dead or not in the selection: {first}",
    ]
    typos = [arg for n in range(25) for arg in ("--id", f"dlv_{n:026d}")]
    many = await asyncio.to_thread(run, config, "dlq", "replay", *typos)
    assert many.stderr.splitlines()[-1].endswith(f"dlv_{19:026d} and 5 more"), many.stderr


async def test_what_senders_and_destinations_wrote_cannot_drive_the_terminal_of_whoever_lists(
    tmp_path: Path, database_url: str, store: SqlStore
) -> None:
    # An event's type is the sender's, a connector's last_error the destination's words.
    # Before: `dlq list` printed them as they came, an ESC rewriting the operator's screen
    # and a line break making one delivery two lines.
    event_type = "lead.\x1b[2Jcreated\nfake"
    reason = "zapi_error: \x1b]8;;http://evil\x07click\u202eevil"
    await store.insert_events([event(destinations=("crm",), event_type=event_type)])
    [leased] = await lease_any(store, now_ms=NOW)
    dead = msgspec.structs.replace(
        attempt(leased, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT),
        transition=Transition(DeliveryState.DEAD, 1, None, reason),
    )
    await store.complete([dead], NOW)
    config = config_file(tmp_path, database_url)
    listed = await asyncio.to_thread(run, config, "dlq", "list")
    assert listed.exit_code == 0, listed.output
    [line, _] = listed.output.splitlines()
    assert "  lead.\\x1b[2Jcreated\\nfake  " in line, line
    assert line.endswith("zapi_error: \\x1b]8;;http://evil\\x07click\\u202eevil"), line
    summary = await asyncio.to_thread(run, config, "dlq", "list", "--summary")
    [line, _] = summary.output.splitlines()
    assert line.endswith("zapi_error: \\x1b]8;;http://evil\\x07click\\u202eevil"), line
    as_json = await asyncio.to_thread(run, config, "dlq", "list", "--json")
    stored = orjson.loads(as_json.output.splitlines()[0])
    assert (stored["event_type"], stored["last_error"]) == (event_type, reason)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_read_only_commands_answer_while_another_process_holds_the_write_lock(
    tmp_path: Path, database_url: str, store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the schema's version was read under BEGIN IMMEDIATE, so `dlq list` and `keys
    # list` waited for the write lock like any writer, and exited 3 once it was held past
    # the busy timeout (30 s; shortened here so that the test fails fast, not slowly).
    await store.insert_events([event(destinations=("crm",))])
    [leased] = await lease_any(store, now_ms=NOW)
    await store.complete([attempt(leased, DeliveryState.DEAD, kind=OutcomeKind.PERMANENT)], NOW)
    monkeypatch.setattr("estafeta.store.sqlite.BUSY_TIMEOUT_MS", 200)
    config = config_file(tmp_path, database_url)
    holder = sqlite3.connect(store_path(database_url), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # a `sqlite3` shell left in a write transaction
        for command in (
            ["dlq", "list"],
            ["dlq", "list", "--summary", "--tenant", "clinica-sol"],
            ["keys", "list", "--tenant", "clinica-sol"],
        ):
            result = await asyncio.to_thread(run, config, *command)
            assert result.exit_code == 0, (command, result.output)
        listed = await asyncio.to_thread(run, config, "dlq", "list", "--destination", "crm")
        assert listed.output.startswith(leased.id), listed.output
        # A writer still waits for the lock, and gives up as the store being unreachable.
        replayed = await asyncio.to_thread(run, config, "dlq", "replay", "--all")
        assert replayed.exit_code == 3, replayed.output
    finally:
        holder.close()


def store_path(database_url: str) -> str:
    return database_url.removeprefix("sqlite:///")


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_database_without_the_schema_is_named_not_queried(tmp_path: Path, engine: str) -> None:
    # Before: the driver's "no such table" / "relation does not exist" as a traceback.
    def attempts(database_url: str) -> None:
        config = config_file(tmp_path, database_url)
        commands = (
            ["dlq", "list"],
            ["dlq", "discard", "--all"],
            ["keys", "create", "--tenant", "t"],
        )
        for command in commands:
            result = run(config, *command)
            assert result.exit_code == 2, (command, result.output)
            assert "has no estafeta schema: run `estafeta migrate`" in result.output, result.output
            assert "Traceback" not in result.output
        assert run(config, "migrate").exit_code == 0
        assert run(config, "dlq", "list").exit_code == 0

    with empty_database(engine, tmp_path, "never_migrated") as url:
        attempts(url)


def test_a_store_command_creates_no_sqlite_file_where_there_is_none(tmp_path: Path) -> None:
    # Before: `dlq list` from the wrong directory (or after the file was removed) left an
    # empty database file there, saying only "has no estafeta schema".
    missing = tmp_path / "estafeta.db"
    config = config_file(tmp_path, f"sqlite:///{missing}")
    for command in (["dlq", "list"], ["keys", "list"]):
        result = run(config, *command)
        assert result.exit_code == 2, (command, result.output)
        assert f"the database {missing} does not exist" in result.output, result.output
    assert not missing.exists()
    assert run(config, "migrate").exit_code == 0 and missing.exists()


def test_estafeta_config_chooses_the_file_and_config_beats_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # README and cli.md: `ESTAFETA_CONFIG` chooses the file of every command that takes
    # --config; the option, when given, wins. Run where no estafeta.toml is, so that the
    # default (defaults and env alone: ./estafeta.db) would show as a file made here.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ESTAFETA_DATABASE_URL", raising=False)
    chosen_db, named_db = tmp_path / "chosen" / "chosen.db", tmp_path / "named" / "named.db"
    chosen_db.parent.mkdir()
    named_db.parent.mkdir()
    chosen = config_file(chosen_db.parent, f"sqlite:///{chosen_db}")
    named = config_file(named_db.parent, f"sqlite:///{named_db}")

    result = CliRunner().invoke(main, ["migrate"], env={"ESTAFETA_CONFIG": str(chosen)})
    assert result.exit_code == 0, result.output
    assert result.output.endswith("schema is up to date (sqlite)\n"), result.output
    assert chosen_db.exists() and not (tmp_path / "estafeta.db").exists()

    result = CliRunner().invoke(
        main, ["migrate", "--config", str(named)], env={"ESTAFETA_CONFIG": str(chosen)}
    )
    assert result.exit_code == 0, result.output
    assert named_db.exists()

    # A file named by the variable is a file named explicitly: it must exist.
    missing = tmp_path / "missing.toml"
    result = CliRunner().invoke(main, ["dlq", "list"], env={"ESTAFETA_CONFIG": str(missing)})
    assert result.exit_code == 2 and f"{missing}: file does not exist" in result.output
    assert not (tmp_path / "estafeta.db").exists()


@pytest.mark.parametrize(
    "command", [["migrate"], ["serve"], ["worker"], ["keys", "list"], ["dlq", "list"]]
)
def test_an_invalid_configuration_names_the_file_it_is_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    # Before: "invalid configuration", then `server.bogus: unknown key 'bogus'` with no file:
    # the one ESTAFETA_CONFIG names, or the working directory's estafeta.toml, may not be the
    # one the operator edited. Each line is now located as check-config locates it.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ESTAFETA_DATABASE_URL", raising=False)
    written = '[server]\nlisten = "x"\nbogus = 1\n'
    named = tmp_path / "named.toml"
    named.write_text(written)
    (tmp_path / "estafeta.toml").write_text(written)
    by_option = CliRunner().invoke(main, [*command, "--config", str(named)])
    by_env = CliRunner().invoke(main, command, env={"ESTAFETA_CONFIG": str(named)})
    by_default = CliRunner().invoke(main, command, env={"ESTAFETA_CONFIG": None})
    for result, file in ((by_option, named), (by_env, named), (by_default, "estafeta.toml")):
        assert result.exit_code == 2, (result.output, result.exception)
        assert result.output.splitlines() == [
            "invalid configuration (2 problems):",
            f"  {file}: server.listen: invalid address 'x': write HOST:PORT, e.g. '0.0.0.0:8080'",
            f"  {file}: server.bogus: unknown key 'bogus'",
        ], result.output
    assert not (tmp_path / "estafeta.db").exists()


def test_an_empty_configuration_path_is_said_to_name_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: `--config "$UNSET"` read the working directory: `.: cannot read: Is a directory`.
    monkeypatch.chdir(tmp_path)
    for command in (["migrate", "--config", ""], ["check-config", ""]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code in (1, 2), (result.output, result.exception)
        assert "'': an empty path names no file" in result.output, result.output
    assert not (tmp_path / "estafeta.db").exists()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_a_worker_or_serve_without_migrating_names_a_database_without_the_schema(
    tmp_path: Path, engine: str
) -> None:
    # What `estafeta worker` and `serve --no-migrate` start with (run in-process, their
    # event loop runner would tune this test process's garbage collector).
    async def attempt(database_url: str) -> None:
        config = load_config(config_file(tmp_path, database_url))
        with pytest.raises(StoreError, match="has no estafeta schema: run `estafeta migrate`"):
            await prepared_store(config, migrate=False)

    with empty_database(engine, tmp_path, "never_migrated") as url:
        await attempt(url)


# -- a database migrated by a newer estafeta ------------------------------------------------------

FUTURE = "0099"  # a migration this version does not ship


async def set_revision(database_url: str, revision: str) -> None:
    store = open_store(database_url)
    try:
        async with store.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        await store.close()


async def revision_of(database_url: str) -> str | None:
    store = open_store(database_url)
    try:
        return await current_revision(store.engine)
    finally:
        await store.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_database_of_a_newer_version_is_named_and_left_as_it_is(
    tmp_path: Path, engine: str
) -> None:
    # Before: `migrate` died of alembic's "Can't locate revision" with a traceback, and every
    # other command told the operator to run `estafeta migrate`: that very traceback.
    def attempts(database_url: str) -> None:
        config = config_file(tmp_path, database_url)
        assert run(config, "migrate").exit_code == 0
        asyncio.run(set_revision(database_url, FUTURE))
        for command in (["migrate"], ["dlq", "list"], ["keys", "create", "--tenant", "t"]):
            result = run(config, *command)
            assert result.exit_code == 2, (command, result.output, result.exception)
            assert (
                f"has the schema of migration {FUTURE}, newer than this version of estafeta "
                f"knows (its newest is {head_revision()})" in result.output
            ), result.output
            assert "run `estafeta migrate`" not in result.output
        assert asyncio.run(revision_of(database_url)) == FUTURE  # never migrated "down"

    with empty_database(engine, tmp_path, "newer") as url:
        attempts(url)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_database_of_another_alembic_application_is_named_as_such(
    tmp_path: Path, engine: str
) -> None:
    # Before: another application's revision (Alembic's are hex by default; both use the
    # table alembic_version) was "migration ae1027a6acf, newer than this version of
    # estafeta …: run the estafeta that migrated it", an estafeta that never was.
    def attempts(database_url: str) -> None:
        config = config_file(tmp_path, database_url)
        assert run(config, "migrate").exit_code == 0
        asyncio.run(set_revision(database_url, "ae1027a6acf"))
        for command in (["migrate"], ["dlq", "list"]):
            result = run(config, *command)
            assert result.exit_code == 2, (command, result.output, result.exception)
            assert (
                "the database holds another application's Alembic revision 'ae1027a6acf' (its"
                " alembic_version table), not an estafeta schema: give estafeta a database of"
                " its own"
            ) in result.output, result.output
            assert "newer than this version" not in result.output
        assert asyncio.run(revision_of(database_url)) == "ae1027a6acf"

    with empty_database(engine, tmp_path, "foreign") as url:
        attempts(url)


def test_a_sqlite_file_of_another_program_is_named_as_such_and_left_as_it_is(
    tmp_path: Path,
) -> None:
    # Before: `migrate` (and `serve`, which migrates at start) wrote estafeta's twenty
    # tables into another program's database, a storage.url pointing at the wrong file,
    # and said `schema is up to date`.
    file = tmp_path / "crm.db"

    def schema() -> list[Any]:
        with contextlib.closing(sqlite3.connect(file)) as crm:
            return crm.execute("SELECT type, name, sql FROM sqlite_master").fetchall()

    with contextlib.closing(sqlite3.connect(file)) as crm:
        crm.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    before = schema()
    url = f"sqlite:///{file}"
    config = config_file(tmp_path, url)
    for command in (["migrate"], ["dlq", "list"]):
        result = run(config, *command)
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert result.output.startswith(f"error: {url}: the database "), result.output
        assert (
            "holds another program's tables (patients), not an estafeta schema: give estafeta"
            " a database of its own"
        ) in result.output, result.output
    assert schema() == before


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_serve_and_worker_refuse_a_database_of_a_newer_version(
    tmp_path: Path, engine: str
) -> None:
    async def attempt(database_url: str) -> None:
        config = load_config(config_file(tmp_path, database_url))
        store = await prepared_store(config)
        await store.close()
        await set_revision(database_url, FUTURE)
        for migrate in (True, False):  # `serve`, and `worker` or `serve --no-migrate`
            with pytest.raises(StoreError, match=f"migration {FUTURE}, newer than this version"):
                await prepared_store(config, migrate=migrate)
        assert await revision_of(database_url) == FUTURE

    with empty_database(engine, tmp_path, "newer") as url:
        await attempt(url)


# -- a database URL that does not lead to a store ---------------------------------------------

PASSWORD = "s3cret-pw"


def closed_port() -> int:
    with socket.socket() as probe:  # bound, never listening: nothing answers there after
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("place", "status", "reason"),
    [
        (
            "{pg}/estafeta_no_such_database",
            2,
            'database "estafeta_no_such_database" does not exist',
        ),
        (
            "{pg}/postgres?user=estafeta_no_such_role",
            2,
            'role "estafeta_no_such_role" does not exist',
        ),
        ("127.0.0.1:{closed}/estafeta", 3, "the store cannot be reached: ConnectionRefusedError"),
    ],
)
def test_a_database_url_that_leads_nowhere_is_one_line_saying_where_and_why(
    tmp_path: Path, place: str, status: int, reason: str
) -> None:
    # Before: `migrate` died with the driver's traceback on a missing database or role; the
    # others said only `the store failed: DBAPIError (SQLSTATE 3D000)`; none said which
    # database it was (the default file, or ESTAFETA_DATABASE_URL, may not be the one meant).
    pg = PG_ADMIN_URL.rsplit("@", 1)[1].split("/", 1)[0]
    url = f"postgresql://postgres:{PASSWORD}@" + place.format(pg=pg, closed=closed_port())
    where = f"error: {url.replace(PASSWORD, '***').split('?')[0]}: "
    config = config_file(tmp_path, url)
    for command in (["migrate"], ["dlq", "list"], ["keys", "create", "--tenant", "t"]):
        result = run(config, *command)
        assert result.exit_code == status, (command, result.output, result.exception)
        assert len(result.output.splitlines()) == 1, result.output
        assert result.output.startswith(where) and reason in result.output, result.output
        assert PASSWORD not in result.output


def test_a_sqlite_file_in_a_missing_directory_is_a_setting_to_correct(tmp_path: Path) -> None:
    # Before: exit 3, "the store cannot be reached", the status of an outage to wait out.
    missing = tmp_path / "no-such-directory"
    url = f"sqlite:///{missing / 'estafeta.db'}"
    result = run(config_file(tmp_path, url), "migrate")
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"storage.url: the database's directory {missing} does not exist" in result.output
    assert not missing.exists()


def test_a_sqlite_file_under_a_file_is_a_setting_to_correct(tmp_path: Path) -> None:
    # Before: "the database's directory X does not exist", of a file that does.
    file = tmp_path / "estafeta.toml"
    config = config_file(tmp_path, f"sqlite:///{file / 'estafeta.db'}")
    result = run(config, "migrate")
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"storage.url: the database's directory {file} is not a directory" in result.output


@pytest.mark.parametrize(
    ("made", "path", "status", "why"),
    [
        # a directory where the file should be: SQLite cannot open it
        ("directory", "estafeta.db", 3, "SQLITE_CANTOPEN: unable to open database file"),
        ("directory", "estafeta.db/", 3, "cannot create the database file {file}: Is a directory"),
        ("text", "estafeta.toml", 2, "SQLITE_NOTADB: file is not a database"),  # the config
    ],
)
def test_a_sqlite_file_that_cannot_be_opened_is_named_with_why(
    tmp_path: Path, made: str, path: str, status: int, why: str
) -> None:
    # Before: only the driver's class (`OperationalError`, `DatabaseError`, `IsADirectoryError`),
    # which says nothing of what to correct.
    file = tmp_path / path.split("?")[0].rstrip("/")
    if made == "directory":
        file.mkdir()
    url = f"sqlite:///{tmp_path}/{path}"
    result = run(config_file(tmp_path, url), "migrate")
    assert result.exit_code == status, (result.output, result.exception)
    assert result.output.startswith(f"error: {url.split('?')[0]}: "), result.output
    assert why.format(file=file) in result.output, result.output
    assert len(result.output.splitlines()) == 1, result.output


def test_a_sqlite_file_that_cannot_be_opened_leaves_no_driver_thread_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiosqlite (0.22.1) stops the thread of a connect that failed by queueing a callback to
    # the caller's loop without waiting for it: once the command's loop had closed, on a busy
    # machine the thread died with "Event loop is closed", a traceback after the one-line
    # error (and, in this suite, a failure of whichever test ran next).
    started: list[str] = []
    start = threading.Thread.start

    def recorded(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recorded)
    (tmp_path / "estafeta.db").mkdir()
    result = run(config_file(tmp_path, f"sqlite:///{tmp_path}/estafeta.db"), "migrate")
    assert result.exit_code == 3, (result.output, result.exception)
    assert "SQLITE_CANTOPEN: unable to open database file" in result.output
    assert [name for name in started if "_connection_worker_thread" in name] == []


def test_a_relative_sqlite_path_is_named_with_the_file_it_leads_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative path is relative to the working directory, which under a service manager
    # is not where the operator stands: the error names the file it led to.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "estafeta.db").mkdir()
    result = run(config_file(tmp_path, "sqlite:///./estafeta.db"), "migrate")
    assert result.exit_code == 3, (result.output, result.exception)
    where = f"error: sqlite:///./estafeta.db ({tmp_path / 'estafeta.db'}): "
    assert result.output.startswith(where), result.output


def test_a_sqlite_url_with_a_host_is_a_setting_to_correct(tmp_path: Path) -> None:
    # Before: SQLAlchemy's "Invalid SQLite URL" traceback (exit 1) for `sqlite://./x.db`, a
    # slash short of sqlite:///./x.db, after check-config had said the file was ok.
    config = config_file(tmp_path, "sqlite://./estafeta.db")
    result = run(config, "migrate")
    assert result.exit_code == 2, (result.output, result.exception)
    assert "storage.url: a SQLite URL has no host: write sqlite:///PATH" in result.output
    checked = CliRunner().invoke(main, ["check-config", str(config)])
    assert checked.exit_code == 1, checked.output


# -- selections that cannot mean anything -----------------------------------------------------


def test_a_dead_letter_selection_naming_what_is_not_in_the_store_is_refused(
    tmp_path: Path, database_url: str
) -> None:
    # Before: `dlq replay --destination bilingg` said "0 deliveries replayed", exit 0, as if
    # billing had nothing dead.
    config = config_file(tmp_path, database_url)
    assert run(config, "migrate").exit_code == 0
    for command in ("list", "replay", "discard"):
        for option, name, what in (
            ("--tenant", "clinica-so1", "tenant"),
            ("--destination", "bilingg", "destination"),
            ("--destination", "send:nowhere", "destination"),
        ):
            result = run(config, "dlq", command, option, name)
            assert result.exit_code == 2, (command, option, result.output, result.exception)
            assert result.output == f"error: {option} {name!r}: no such {what} in the store\n"
    known = run(config, "dlq", "replay", "--tenant", "clinica-sol")
    assert (known.exit_code, known.output) == (0, "0 deliveries replayed\n")
    # Another tenant's destination selects nothing of this one: named as such.
    asyncio.run(sync_config(base_config(database_url)))
    other = run(config, "dlq", "list", "--tenant", "clinica-sol", "--destination", "outra-sink")
    assert (other.exit_code, other.output) == (
        2,
        "error: --destination 'outra-sink': no such destination of tenant 'clinica-sol' in the"
        " store\n",
    )
    assert (
        run(config, "dlq", "list", "--tenant", "outra", "--destination", "outra-sink").exit_code
        == 0
    )


async def sync_config(data: dict[str, Any]) -> None:
    store = open_store(data["storage"]["url"])
    try:
        await store.sync_config(load_config_dict(data), now_ms=1)
    finally:
        await store.close()


def test_a_limit_past_what_the_database_can_count_is_refused_as_usage(
    tmp_path: Path, database_url: str
) -> None:
    # Before: an OverflowError traceback from the driver (exit 1).
    config = config_file(tmp_path, database_url)
    assert run(config, "migrate").exit_code == 0
    huge = run(config, "dlq", "list", "--limit", "99999999999999999999")
    assert huge.exit_code == 2, (huge.output, huge.exception)
    assert "Invalid value for '--limit'" in huge.output
    assert run(config, "dlq", "list", "--limit", "1000000").exit_code == 0


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--since", "yesterday", "Invalid isoformat string"),
        ("--until", "2026-13-01", "month must be in 1..12"),
        ("--until", "2026-01-01T24:30:00Z", "hour must be in 0..23"),
    ],
)
def test_a_time_that_is_not_iso_8601_is_named_by_its_option(
    tmp_path: Path, option: str, value: str, why: str
) -> None:
    # Before: "--since/--until must be ISO 8601 times (month must be in 1..12)": which one,
    # and what was written, left to guess.
    config = config_file(tmp_path, f"sqlite:///{tmp_path / 'estafeta.db'}")
    other = "--until" if option == "--since" else "--since"
    for command in ("list", "replay", "discard"):
        result = run(config, "dlq", command, other, "2026-01-01T00:00:00Z", option, value)
        assert result.exit_code == 2, (result.output, result.exception)
        error = result.output.splitlines()[-1]
        assert error.startswith(f"Error: Invalid value for '{option}': {value!r}"), error
        assert f"is not an ISO 8601 time ({why}" in error, error
    assert not (tmp_path / "estafeta.db").exists()


def test_a_window_that_ends_before_it_begins_is_refused_as_usage(tmp_path: Path) -> None:
    # Before: `--since 2026-12-02 --until 2026-12-01` (the two swapped) listed, replayed or
    # discarded nothing, exit 0: "0 deliveries replayed", as if none had died then.
    config = config_file(tmp_path, f"sqlite:///{tmp_path / 'estafeta.db'}")
    for since, until in (("2026-12-02", "2026-12-01T23:59:59Z"), ("2026-12-01", "2026-12-01")):
        for command in ("list", "replay", "discard"):
            result = run(config, "dlq", command, "--since", since, "--until", until)
            assert result.exit_code == 2, (result.output, result.exception)
            assert result.output.splitlines()[-1] == (
                f"Error: Invalid value for '--until': {until!r} is not after --since {since!r}:"
                " no delivery died between them"
            ), result.output
    assert not (tmp_path / "estafeta.db").exists()


def test_more_ids_than_the_api_takes_are_refused_as_usage(
    tmp_path: Path, database_url: str
) -> None:
    # Before: on PostgreSQL, past 32767 ids, "the store cannot be reached: InterfaceError"
    # (exit 3: an outage to wait out) for a query the driver could never send.
    config = config_file(tmp_path, database_url)
    assert run(config, "migrate").exit_code == 0
    ids = [arg for n in range(40_000) for arg in ("--id", f"dlv_{n:026d}")]
    for command in ("list", "replay"):
        result = run(config, "dlq", command, *ids)
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert "Invalid value for '--id': at most 10000 ids" in result.output, result.output
    most = run(config, "dlq", "replay", *ids[: 2 * 10_000])
    assert most.exit_code == 0, most.output
    assert most.output.splitlines()[0] == "0 deliveries replayed"
    assert most.output.splitlines()[1].endswith(f"dlv_{19:026d} and 9980 more")


@pytest.mark.parametrize(
    "command",
    [
        ["dlq", "list", "--tenant", "cl\udcednica"],
        ["dlq", "list", "--destination", "\udcff"],
        ["dlq", "list", "--event-type", "lead.\udcff"],
        ["dlq", "replay", "--id", "dlv_\udcff"],
        ["keys", "create", "--tenant", "clinica-sol", "--label", "recep\udce7\udce3o"],
        ["keys", "list", "--tenant", "\udcff"],
        ["keys", "revoke", "key_\udcff"],
    ],
)
def test_an_argument_that_is_not_utf8_is_a_usage_error(
    tmp_path: Path, database_url: str, command: list[str]
) -> None:
    # A byte that is not UTF-8 (a Latin-1 terminal, a script's bad encoding) reaches Python
    # as a lone surrogate. Before: SQLite's UnicodeEncodeError traceback (exit 1), or
    # PostgreSQL's "the store failed: DBAPIError (SQLSTATE 22000)".
    config = config_file(tmp_path, database_url)
    assert run(config, "migrate").exit_code == 0
    result = run(config, *command)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "is not valid UTF-8" in result.output, result.output
    assert rows(database_url, "SELECT id FROM api_keys") == []


def test_check_config_reports_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    # Before: a UnicodeDecodeError traceback, after the problem had been found.
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[[tenants]]\nid = "clinica-sol"\nname = "Clínica Sol"\n'.encode("latin-1"))
    result = CliRunner().invoke(main, ["check-config", str(latin1)])
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.output == f"{latin1}: file is not valid UTF-8\n1 problem found\n"


@pytest.mark.parametrize("level", ["verbose", "critical", "warn", "fatal", "notset"])
@pytest.mark.parametrize("given_by", ["--log-level", "ESTAFETA_LOG_LEVEL"])
def test_a_log_level_not_documented_is_a_usage_error(
    tmp_path: Path, level: str, given_by: str
) -> None:
    # Before: `verbose` was structlog's KeyError traceback, whatever the command; `critical`,
    # `warn`, `fatal` and `notset`, which Python's logging knows, were taken undocumented.
    args, env = ([given_by, level], {}) if given_by == "--log-level" else ([], {given_by: level})
    config = config_file(tmp_path, f"sqlite:///{tmp_path / 'estafeta.db'}")
    result = CliRunner().invoke(main, [*args, "migrate", "--config", str(config)], env=env)
    assert result.exit_code == 2, (result.output, result.exception)
    assert (
        f"Invalid value for '--log-level': '{level}' is not one of 'debug', 'info', 'warning',"
        " 'error'." in result.output
    ), result.output
    assert not (tmp_path / "estafeta.db").exists()


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "error"])
def test_each_documented_log_level_is_taken_in_any_case(tmp_path: Path, level: str) -> None:
    config = config_file(tmp_path, f"sqlite:///{tmp_path / 'estafeta.db'}")
    result = CliRunner().invoke(main, ["--log-level", level, "migrate", "--config", str(config)])
    assert result.exit_code == 0, (result.output, result.exception)


def test_a_demo_directory_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    # The path is written into the demo's estafeta.toml. Before: a UnicodeEncodeError
    # traceback (exit 1), after the directory had been made.
    workdir = tmp_path / "demo-\udcff"
    result = CliRunner().invoke(main, ["demo", "--dir", str(workdir), "--events", "1"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "is not valid UTF-8" in result.output, result.output
    assert not os.path.lexists(workdir)


# -- the output going nowhere: a reader gone, a full disk, stdout closed, a signal ---------------


def estafeta_process(config: Path | None, *args: str) -> list[str]:
    """The command as a shell runs it: its own process, the `estafeta` of this checkout."""
    with_config = [] if config is None else ["--config", str(config)]
    return [sys.executable, "-m", "estafeta", *args, *with_config]


def with_reader_gone(command: list[str]) -> subprocess.CompletedProcess[bytes]:
    """`command | head -0`: every write to stdout finds its reader gone (EPIPE)."""
    return _with_other_end_closed(command, os.pipe)


def with_terminal_hung_up(command: list[str]) -> subprocess.CompletedProcess[bytes]:
    """`command` on a terminal that hung up (an SSH session gone): every write is EIO."""
    return _with_other_end_closed(command, os.openpty)


def _with_other_end_closed(
    command: list[str], open_pair: Callable[[], tuple[int, int]]
) -> subprocess.CompletedProcess[bytes]:
    """`command` writing its stdout to the second end of `open_pair()`, the first closed."""
    gone, kept = open_pair()
    os.close(gone)
    try:
        return subprocess.run(command, stdout=kept, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(kept)


def with_stdout(command: list[str], stdout: str | None) -> subprocess.CompletedProcess[bytes]:
    """`command > stdout`, or `command >&-` for None."""
    if stdout is None:
        shell = ["sh", "-c", 'exec "$@" >&-', "sh", *command]
        return subprocess.run(shell, stderr=subprocess.PIPE, timeout=120)
    with open(stdout, "w") as file:
        return subprocess.run(command, stdout=file, stderr=subprocess.PIPE, timeout=120)


OUTPUTS = [
    ["dlq", "list"],
    ["dlq", "list", "--json"],
    ["dlq", "list", "--summary"],
    ["migrate"],
]


@pytest.mark.parametrize("command", [*OUTPUTS, ["--help"], ["dlq", "replay", "--help"]])
async def test_a_reader_that_has_gone_ends_a_command_quietly(
    tmp_path: Path, database_url: str, store: SqlStore, command: list[str]
) -> None:
    # `estafeta dlq list | head -1`. Before: exit 1, said by no one (click's way with a
    # broken pipe), so that `set -o pipefail` scripts failed on a list read in part.
    await dead_deliveries(store, 3)
    config = None if command[-1] == "--help" else config_file(tmp_path, database_url)
    done = await asyncio.to_thread(with_reader_gone, estafeta_process(config, *command))
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


@pytest.mark.parametrize(
    ("stdout", "why"), [("/dev/full", "No space left on device"), (None, "it is closed")]
)
@pytest.mark.parametrize("command", [*OUTPUTS, ["--help"], ["dlq", "list", "--help"]])
async def test_output_that_cannot_be_written_is_an_error_saying_why(
    tmp_path: Path,
    database_url: str,
    store: SqlStore,
    command: list[str],
    stdout: str | None,
    why: str,
) -> None:
    # Before: a full disk was an OSError traceback (exit 1); a closed stdout took the list
    # without a word and exit 0, saying "3 dead deliveries" on stderr.
    if stdout is None and command[-1] == "--help":
        pytest.skip("click prints help to a closed stdout as to nowhere")
    await dead_deliveries(store, 3)
    config = None if command[-1] == "--help" else config_file(tmp_path, database_url)
    done = await asyncio.to_thread(with_stdout, estafeta_process(config, *command), stdout)
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert stderr.endswith(f"error: cannot write to stdout ({why})\n"), stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


async def pending_ids(store: SqlStore) -> set[str]:
    async with store.engine.connect() as conn:
        found = await conn.execute(text("SELECT id FROM deliveries WHERE state = 'pending'"))
        return {row[0] for row in found}


@pytest.mark.parametrize("stdout", ["gone", "/dev/full", "hung up"])
async def test_a_replay_whose_ids_cannot_be_printed_still_says_how_many_it_replayed(
    tmp_path: Path, database_url: str, store: SqlStore, stdout: str
) -> None:
    # The deliveries are replayed before their ids are printed. Before: the count on stderr
    # was lost with the ids (exit 1, silently, or a traceback).
    await dead_deliveries(store, 1_500)
    command = estafeta_process(
        config_file(tmp_path, database_url), "dlq", "replay", "--all", "--limit", "1500"
    )
    if stdout == "gone":
        done = await asyncio.to_thread(with_reader_gone, command)
    elif stdout == "hung up":
        done = await asyncio.to_thread(with_terminal_hung_up, command)
    else:
        done = await asyncio.to_thread(with_stdout, command, stdout)
    stderr = done.stderr.decode()
    assert len(await pending_ids(store)) == 1_500
    assert stderr.startswith("1500 deliveries replayed\n"), stderr
    assert done.returncode == (0 if stdout == "gone" else 2), stderr
    if stdout != "gone":  # exit 2, but what was replayed stays replayed: said, not guessed
        why = "No space left on device" if stdout == "/dev/full" else "Input/output error"
        assert stderr.endswith(
            f"error: cannot write to stdout ({why}): not every id was printed, but the"
            " deliveries counted above stay replayed\n"
        ), stderr


async def interrupted_replay(
    tmp_path: Path,
    database_url: str,
    store: SqlStore,
    signums: list[signal.Signals],
    *,
    nohup: bool = False,
) -> tuple[subprocess.Popen[bytes], str, str]:
    """`dlq replay` of many dead deliveries in its own process (under `nohup` if asked),
    sent `signums` once its first batch is committed: the process, its stdout, its stderr."""
    command = estafeta_process(
        config_file(tmp_path, database_url), "dlq", "replay", "--all", "--limit", str(MANY)
    )
    if nohup:
        command = ["nohup", *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not await pending_ids(store) and process.poll() is None:
            await asyncio.sleep(0.01)  # until the first batch is committed
        for signum in signums:
            process.send_signal(signum)
        out, err = await asyncio.to_thread(process.communicate, timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process, out.decode(), err.decode()


MANY = 100_000  # dead deliveries: a replay of them takes long enough to be interrupted


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
async def test_an_interrupted_replay_says_which_deliveries_it_replayed(
    tmp_path: Path, database_url: str, store: SqlStore, signum: signal.Signals
) -> None:
    # Replayed 1,000 at a time, each batch committed. Before: Ctrl-C ended it with click's
    # "Aborted!" and SIGTERM without a word, the batches committed unsaid; SIGHUP (an SSH
    # session closed) killed it, the batch in progress rolled back.
    await dead_deliveries(store, MANY)
    process, out, stderr = await interrupted_replay(tmp_path, database_url, store, [signum])
    pending = await pending_ids(store)
    assert 0 < len(pending) < MANY, (len(pending), stderr)
    assert set(out.split()) == pending  # what was replayed, and only that
    assert process.returncode == 1, stderr
    assert stderr.splitlines()[-1] == (
        f"{len(pending)} deliveries replayed before {signum.name}: the rest are still dead"
        " (run it again for them)"
    ), stderr
    assert "Traceback" not in stderr, stderr


async def test_a_replay_started_with_nohup_keeps_going_through_a_hangup(
    tmp_path: Path, database_url: str, store: SqlStore
) -> None:
    """`nohup estafeta dlq replay …` asks for the hangup to be ignored: it is; the SIGTERM
    sent after it is the one that stops the replay."""
    await dead_deliveries(store, MANY)
    process, out, stderr = await interrupted_replay(
        tmp_path, database_url, store, [signal.SIGHUP, signal.SIGTERM], nohup=True
    )
    pending = await pending_ids(store)
    assert set(out.split()) == pending
    assert process.returncode == 1, stderr
    assert stderr.splitlines()[-1] == (
        f"{len(pending)} deliveries replayed before SIGTERM: the rest are still dead"
        " (run it again for them)"
    ), stderr


async def test_a_replay_cut_by_the_store_says_which_deliveries_it_replayed(
    tmp_path: Path, database_url: str, store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: "the store cannot be reached" (exit 3), and nothing of the batches committed.
    await dead_deliveries(store, 2_500)
    move_batch = DeadLetterOps._move_batch
    batches: list[int] = []

    async def failing_third(self: DeadLetterOps, *args: Any) -> list[str]:
        batches.append(1)
        if len(batches) == 3:
            raise StoreUnavailable("the store cannot be reached: ConnectionResetError")
        return await move_batch(self, *args)

    monkeypatch.setattr(DeadLetterOps, "_move_batch", failing_third)
    config = config_file(tmp_path, database_url)
    cut = await asyncio.to_thread(run, config, "dlq", "replay", "--all", "--limit", "2500")
    pending = await pending_ids(store)
    assert len(pending) == 2_000  # two batches committed
    assert cut.exit_code == 3, cut.output
    assert set(cut.stdout.split()) == pending
    assert cut.stderr.splitlines()[-1] == "2000 deliveries replayed before the error"


async def test_a_replay_cut_by_the_store_whose_stdout_fails_says_both(
    tmp_path: Path, database_url: str, store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store's error keeps its exit 3, and the stdout that could not take the ids is
    # said after the count. Before: the ids went missing without a word.
    await dead_deliveries(store, 1_500)
    move_batch = DeadLetterOps._move_batch
    batches: list[int] = []

    async def failing_second(self: DeadLetterOps, *args: Any) -> list[str]:
        batches.append(1)
        if len(batches) == 2:
            raise StoreUnavailable("the store cannot be reached: ConnectionResetError")
        return await move_batch(self, *args)

    def disk_full(line: str) -> None:  # as common.out answers ENOSPC
        raise OutputFailed("No space left on device")

    monkeypatch.setattr(DeadLetterOps, "_move_batch", failing_second)
    monkeypatch.setattr("estafeta.cli.dlq.out", disk_full)
    config = config_file(tmp_path, database_url)
    cut = await asyncio.to_thread(run, config, "dlq", "replay", "--all", "--limit", "1500")
    assert cut.exit_code == 3, cut.output
    assert cut.stderr.splitlines()[-2:] == [
        "1000 deliveries replayed before the error",
        "error: cannot write to stdout (No space left on device): not every id was printed, but"
        " the deliveries counted above stay replayed",
    ], cut.stderr


def interrupted_in_each_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while each batch of a move is in progress (the command's own process)."""
    move_batch = DeadLetterOps._move_batch

    async def with_ctrl_c(self: DeadLetterOps, *args: Any) -> list[str]:
        os.kill(os.getpid(), signal.SIGINT)
        return await move_batch(self, *args)

    monkeypatch.setattr(DeadLetterOps, "_move_batch", with_ctrl_c)


def made_dead(database_url: str, count: int) -> None:
    async def make() -> None:
        async with migrated_store(load_config_dict(base_config(database_url))) as store:
            await dead_deliveries(store, count)

    asyncio.run(make())


def test_a_replay_stopped_in_its_last_batch_says_it_replayed_them_all(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C while the only batch is moved: it is committed, and nothing is left. Before:
    # "5 deliveries replayed before SIGINT: the rest are still dead", exit 1, so that a
    # script ran it again for a rest there was not.
    made_dead(database_url, 5)
    interrupted_in_each_batch(monkeypatch)
    done = run(config_file(tmp_path, database_url), "dlq", "replay", "--all")
    assert done.stderr.splitlines()[-1] == "5 deliveries replayed", done.stderr
    assert done.exit_code == 0, done.output
    assert len(done.stdout.split()) == 5


def test_an_interrupted_replay_whose_reader_has_gone_is_still_an_interrupted_one(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `estafeta dlq replay --all | head -1`, then Ctrl-C: the rest are still dead. Before:
    # the gone reader's quiet exit 0 took the place of the interruption's 1.
    made_dead(database_url, 1_500)
    interrupted_in_each_batch(monkeypatch)

    def reader_gone(line: str) -> None:  # as common.out answers EPIPE
        raise click.exceptions.Exit(0)

    monkeypatch.setattr("estafeta.cli.dlq.out", reader_gone)
    done = run(config_file(tmp_path, database_url), "dlq", "replay", "--all", "--limit", "1500")
    assert done.stderr.splitlines()[-1] == (
        "1000 deliveries replayed before SIGINT: the rest are still dead (run it again for them)"
    ), done.stderr
    assert done.exit_code == 1, done.output


def test_an_interrupted_replay_whose_stdout_fails_is_still_an_interrupted_one(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C, then the ids cannot be written (a full disk, a terminal hung up): the rest are
    # still dead, and a script must run it again. Before: exit 2, the status of a setting
    # to correct, in place of the interruption's documented 1.
    made_dead(database_url, 1_500)
    interrupted_in_each_batch(monkeypatch)

    def disk_full(line: str) -> None:  # as common.out answers ENOSPC
        raise OutputFailed("No space left on device")

    monkeypatch.setattr("estafeta.cli.dlq.out", disk_full)
    done = run(config_file(tmp_path, database_url), "dlq", "replay", "--all", "--limit", "1500")
    assert done.stderr.splitlines()[-2:] == [
        "1000 deliveries replayed before SIGINT: the rest are still dead (run it again for them)",
        "error: cannot write to stdout (No space left on device): not every id was printed, but"
        " the deliveries counted above stay replayed",
    ], done.stderr
    assert done.exit_code == 1, done.output


# -- inputs that cannot mean anything, or could not be read whole --------------------------------


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "huge"])
def test_a_configuration_path_that_is_no_file_to_read_is_refused_at_once(
    tmp_path: Path, kind: str
) -> None:
    # Before: /dev/zero ate memory to a MemoryError traceback, a FIFO without a writer hung.
    path = tmp_path / "estafeta.toml"
    if kind == "device":
        path = Path("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_text("# padding\n" * 500_000)  # 5 MB, past the limit
    # In tmp_path: a file read as an empty configuration would migrate ./estafeta.db.
    done = subprocess.run(
        estafeta_process(path, "migrate"), capture_output=True, timeout=20, text=True, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    why = {
        "device": "not a file (a device or a socket)",
        "fifo": "a pipe that gave nothing (no writer?)",
        "directory": "cannot read: Is a directory",
        "huge": "larger than 4 MiB",
    }[kind]
    assert f"{path}: {why}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_configuration_given_through_a_pipe_is_read(tmp_path: Path, database_url: str) -> None:
    """`--config <(envsubst < estafeta.toml.in)`: the shell names a pipe, which is read."""
    text = config_file(tmp_path, database_url).read_bytes()
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, text)
        os.close(write_end)
        done = subprocess.run(
            [sys.executable, "-m", "estafeta", "check-config", f"/dev/fd/{read_end}"],
            capture_output=True,
            timeout=20,
            text=True,
            pass_fds=(read_end,),
        )
    finally:
        os.close(read_end)
    assert done.returncode == 0, done.stderr


def accepting_nothing() -> socket.socket:
    """A listening socket that never answers: a store that hangs while connecting."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


@pytest.mark.parametrize(
    "command", [["migrate"], ["dlq", "list"], ["keys", "create", "--tenant", "clinica-sol"]]
)
def test_ctrl_c_during_a_store_command_says_it_was_interrupted_with_status_130(
    tmp_path: Path, command: list[str]
) -> None:
    # Before: click's bare "Aborted!", exit 1, the status of an unexpected failure.
    listener = accepting_nothing()
    port = listener.getsockname()[1]
    config = config_file(tmp_path, f"postgresql://postgres@127.0.0.1:{port}/estafeta")
    process = subprocess.Popen(
        estafeta_process(config, *command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        listener.settimeout(60)
        connection, _ = listener.accept()  # the command is waiting for the store
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        connection.close()
    finally:
        listener.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert err.splitlines()[-1] == "error: interrupted (Ctrl-C): stopped", err
    assert "Aborted!" not in err and "Traceback" not in err, err
    assert out == ""


def test_a_store_error_says_the_url_came_from_estafeta_database_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the URL alone, so the operator searched the configuration file for it.
    monkeypatch.setenv(
        "ESTAFETA_DATABASE_URL", f"postgresql://u:{PASSWORD}@127.0.0.1:{closed_port()}/db"
    )
    result = run(config_file(tmp_path, "sqlite:///x.db"), "dlq", "list")
    assert result.exit_code == 3, result.output
    assert result.output.startswith("error: postgresql://u:***@127.0.0.1:"), result.output
    assert "/db (from ESTAFETA_DATABASE_URL): the store cannot be reached" in result.output
    assert PASSWORD not in result.output
    missing = tmp_path / "missing"
    monkeypatch.setenv("ESTAFETA_DATABASE_URL", f"sqlite:///{missing}/x.db")
    result = run(config_file(tmp_path, "sqlite:///x.db"), "migrate")
    assert result.exit_code == 2, result.output
    assert (
        f"storage.url: the database's directory {missing} does not exist"
        " (the value of ESTAFETA_DATABASE_URL)" in result.output
    ), result.output


def test_a_postgresql_socket_directory_is_named_where_the_store_cannot_be_reached(
    tmp_path: Path,
) -> None:
    # The socket directory of `?host=` is used; an error left it out, naming no place.
    missing = tmp_path / "no-socket-here"
    url = f"postgresql://postgres@/estafeta?host={missing}&sslmode=disable"
    result = run(config_file(tmp_path, url), "migrate")
    assert result.exit_code == 3, result.output
    assert result.output.startswith(
        f"error: postgresql://postgres@/estafeta?host={missing}: the store cannot be reached"
    ), result.output


def test_a_sqlite_url_with_a_query_is_a_setting_to_correct(tmp_path: Path) -> None:
    # Before: `?mode=ro` was dropped with a warning of SQLAlchemy's, and the file written.
    config = config_file(tmp_path, f"sqlite:///{tmp_path / 'x.db'}?mode=ro")
    result = run(config, "migrate")
    assert result.exit_code == 2, result.output
    assert "storage.url: a SQLite URL takes no query ('?mode=ro')" in result.output
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize(
    ("label", "why"),
    [
        ("x" * 201, "at most 200 characters, not 201"),
        ("two\nlines", "must not contain control characters ('\\n')"),
        ("\x1b[2J", "must not contain control characters ('\\x1b')"),
    ],
)
def test_a_key_label_too_long_or_with_control_characters_is_refused(
    tmp_path: Path, label: str, why: str
) -> None:
    # Before: any length (10 MB) or characters (a newline, ESC) went into the store.
    config = config_file(tmp_path, f"sqlite:///{tmp_path / 'x.db'}")
    assert run(config, "migrate").exit_code == 0
    result = run(config, "keys", "create", "--tenant", "clinica-sol", "--label", label)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--label': {why}" in result.output, result.output
    assert "key created" not in result.output
    listed = run(config, "keys", "list")
    assert listed.output == "0 keys (0 active)\n", listed.output


@pytest.mark.parametrize("option", ["--event-type", "--id", "--tenant", "--destination"])
@pytest.mark.parametrize("command", ["list", "replay"])
def test_an_empty_dead_letter_filter_is_refused_naming_its_option(
    tmp_path: Path, option: str, command: str
) -> None:
    # Before: `--event-type ""` matched nothing, silently: "0 dead deliveries".
    config = config_file(tmp_path, f"sqlite:///{tmp_path / 'x.db'}")
    assert run(config, "migrate").exit_code == 0
    result = run(config, "dlq", command, option, "")
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': must not be empty" in result.output, result.output

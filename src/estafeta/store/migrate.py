"""Schema migrations with Alembic, driven from code (no alembic.ini to ship or find).

A database only ever moves up: one at a revision this version does not ship was migrated by
a newer estafeta, and is refused as such (Alembic would fail to locate the revision with a
traceback, and "run `estafeta migrate`" would send the operator in a circle).

Migrations on PostgreSQL take a lock of their own first: two `estafeta migrate` or `serve`
starting at once would otherwise both read the same revision and both apply the next
migration, one of them failing halfway (a table or index already created or dropped).
SQLite needs none: the migration's transaction is BEGIN IMMEDIATE, one writer at a time.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from estafeta.errors import StoreError
from estafeta.store.base import translated

MIGRATIONS = Path(__file__).parent / "migrations"
# pg_advisory_xact_lock's key for "a migration is running": any constant of our own.
_MIGRATION_LOCK = int.from_bytes(b"estafeta", "big") >> 1

log = structlog.get_logger("estafeta.store")


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply every migration up to `revision` in one transaction. A migration that changes
    anything is logged before (it may build indexes for minutes, holding tables' write
    locks: the log says why the process is not serving yet) and once committed."""
    began = time.monotonic()
    target = head_revision() if revision == "head" else revision
    found: list[str | None] = []  # the revision read, while the migrations run

    def run(connection: Connection) -> tuple[str | None, str | None]:
        if connection.dialect.name == "postgresql":
            # The time it needs, as documented: a statement_timeout or lock_timeout of the
            # role or of the URL's `options` cancelled an index build over a large table, or
            # the wait for another process's migration, as "the store cannot be reached".
            connection.execute(text("SET LOCAL statement_timeout = 0"))
            connection.execute(text("SET LOCAL lock_timeout = 0"))
            _lock_migrations(connection)
        current = MigrationContext.configure(connection).get_current_revision()
        if current is not None and current not in known_revisions():
            raise StoreError(f"the database {schema_problem(current)}")
        refuse_other_programs(connection, current)
        if current != target:
            log.info("schema_migrating", from_revision=current, to_revision=target)
        found.append(current)
        command.upgrade(alembic_config(connection), revision)
        migrated = MigrationContext.configure(connection).get_current_revision()
        found.clear()  # a failure from here on is the commit's: it may have been kept
        return current, migrated

    try:
        async with engine.begin() as conn:
            before, after = await conn.run_sync(run)
    except Exception as exc:
        if not found:
            raise
        # The driver's error alone ("the store failed: ProgrammingError (SQLSTATE 42P07)")
        # did not say that a migration failed, nor in what state it left the database.
        error = translated(exc)
        if error is exc:
            raise
        doing, still = (
            (f"migrating the schema from {found[0]} to {target}", f"is still at {found[0]}")
            if found[0]
            else (f"creating the schema ({target})", "still has no estafeta schema")
        )
        # Not chained: a driver's text may quote data (store/base.py).
        message = f"{error}, while {doing}: none of it was kept (the database {still})"
        raise type(error)(message) from None
    if before != after:
        log.info(
            "schema_migrated",
            from_revision=before,
            to_revision=after,
            duration_ms=round((time.monotonic() - began) * 1000),
        )


def _lock_migrations(connection: Connection) -> None:
    """Take PostgreSQL's migration lock until the transaction ends, first saying whose
    migration this one waits for: the wait has no end of its own, and a `migrate` killed
    during a long index build leaves its server process building it, holding the lock
    until the statement ends (then it rolls back)."""
    key = {"key": _MIGRATION_LOCK}
    if connection.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), key).scalar():
        return
    holder = connection.execute(_MIGRATION_LOCK_HOLDER, key).scalar()
    log.info("schema_migration_waiting", holder_pid=holder)
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), key)


# The server process holding the migration lock: a bigint key is split in pg_locks.
_MIGRATION_LOCK_HOLDER = text(
    """
    SELECT pid FROM pg_locks
    WHERE locktype = 'advisory' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid::bigint = CAST(:key AS bigint) >> 32
      AND objid::bigint = CAST(:key AS bigint) & 4294967295
      AND objsubid = 1
    LIMIT 1
    """
)


def head_revision() -> str:
    """The newest migration: the schema this version of estafeta works with."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None  # noqa: S101 - the package ships its migrations
    return head


def known_revisions() -> set[str]:
    """Every migration this version ships."""
    return {
        script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()
    }


def schema_problem(current: str | None) -> str | None:
    """Why this version cannot work with a database at migration `current` (completing
    "the database …"), or None when it is this version's."""
    head = head_revision()
    if current == head:
        return None
    if current is not None and not re.fullmatch(r"\d{4}", current):
        # Another application's Alembic table (estafeta's revisions are numbered): "newer than
        # this version, run the estafeta that migrated it" would send the operator looking
        # for an estafeta that never was.
        return (
            f"holds another application's Alembic revision {current!r} (its alembic_version "
            "table), not an estafeta schema: give estafeta a database of its own"
        )
    if current is not None and current not in known_revisions():
        return (
            f"has the schema of migration {current}, newer than this version of estafeta "
            f"knows (its newest is {head}): run the estafeta that migrated it, or restore a "
            "backup taken before (estafeta never migrates a schema down)"
        )
    found = (
        "has no estafeta schema"
        if current is None
        else (f"has the schema of migration {current}, not this version's {head}")
    )
    return (
        f"{found}: run `estafeta migrate` "
        "(`estafeta serve` also migrates at start, unless --no-migrate)"
    )


def refuse_other_programs(connection: Connection, current: str | None) -> None:
    """Raise StoreError when a SQLite database with no estafeta revision holds tables: it is
    another program's file (storage.url naming the wrong one), which a migration would have
    filled with estafeta's tables. On PostgreSQL a database may hold other schemas' tables,
    and the role's own schema is the operator's choice (how-to/deploy-postgresql.md)."""
    if current is not None or connection.dialect.name != "sqlite":
        return
    tables = sorted(set(inspect(connection).get_table_names()) - {"alembic_version"})
    if tables:
        shown = ", ".join(tables[:5]) + (", …" if len(tables) > 5 else "")
        raise StoreError(
            f"the database holds another program's tables ({shown}), not an estafeta schema:"
            " give estafeta a database of its own"
        )


async def current_revision(engine: AsyncEngine) -> str | None:
    """The migration the database is at; None when it has no estafeta schema (StoreError
    when it holds another program's tables instead: `refuse_other_programs`)."""

    def read(connection: Connection) -> str | None:
        current = MigrationContext.configure(connection).get_current_revision()
        refuse_other_programs(connection, current)
        return current

    async with engine.connect() as conn:
        return await conn.run_sync(read)

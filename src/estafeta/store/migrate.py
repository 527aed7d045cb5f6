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

import time
from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from estafeta.errors import StoreError

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

    def run(connection: Connection) -> tuple[str | None, str | None]:
        if connection.dialect.name == "postgresql":  # held until the transaction ends
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        current = MigrationContext.configure(connection).get_current_revision()
        if current is not None and current not in known_revisions():
            raise StoreError(f"the database {schema_problem(current)}")
        target = head_revision() if revision == "head" else revision
        if current != target:
            log.info("schema_migrating", from_revision=current, to_revision=target)
        command.upgrade(alembic_config(connection), revision)
        return current, MigrationContext.configure(connection).get_current_revision()

    async with engine.begin() as conn:
        before, after = await conn.run_sync(run)
    if before != after:
        log.info(
            "schema_migrated",
            from_revision=before,
            to_revision=after,
            duration_ms=round((time.monotonic() - began) * 1000),
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


async def current_revision(engine: AsyncEngine) -> str | None:
    """The migration the database is at; None when it has no estafeta schema."""

    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)

"""The embedded engine: SQLite in WAL mode with durable commits, via aiosqlite.

Ingest, the hot path, does not go through SQLAlchemy: a batch of webhooks is written by one
call into a thread that owns a sqlite3 connection of its own (`IngestWriter`), one thread hop
per batch where aiosqlite costs one per statement.

Writes run in `BEGIN IMMEDIATE` transactions: SQLite has one writer at a time, and taking the
write lock at BEGIN (rather than at the first write) means a transaction never has to be
retried halfway, and two lease transactions can never see the same pending rows. Reads use a
second engine with ordinary deferred transactions so that API reads never queue behind writes.
`synchronous=FULL` makes every commit durable (WAL's NORMAL can lose the last commits on power
loss, and we acknowledge only what is committed).
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from sqlalchemy import event, make_url, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from estafeta.errors import ConfigError, ConfigIssue, StoreError, StoreUnavailable
from estafeta.store.base import store_errors
from estafeta.store.ingest import Inserted, Key, delivery_rows, event_key, event_row, fates
from estafeta.store.messaging import conversation_counts
from estafeta.store.records import InsertResult, NewEvent
from estafeta.store.sqlstore import SqlStore

_INSERT_EVENT = (
    "INSERT INTO events (id, tenant_id, source_id, type, idempotency_key, occurred_at,"
    " received_at, payload, raw, conversation_id, message_ref)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (id, tenant_id, event_id, destination_id, priority, ordering_key,"
    " max_attempts, next_attempt_at, state, lease_token, lease_expires_at, leased_by,"
    " created_at, updated_at, attempts, replays)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0)"
)

_FIND_BY_KEY = "SELECT id FROM events WHERE tenant_id = ? AND source_id = ? AND idempotency_key = ?"
# What a batch adds to a conversation (`conversation_counts`); in DO UPDATE, a bare column is
# the stored row's. A customer who writes again reopens a closed conversation, without the
# escalation it was closed with (that one is over; `escalations` keeps it). A name renames
# the contact only from a message at least as recent as the one the stored name came from (a
# late redelivery of an older one must not bring back an old name; no name: NULL, no rename).
_COUNT_MESSAGES = (
    "INSERT INTO conversations (tenant_id, id, status, contact_name, first_message_at,"
    " last_message_at, inbound_count, outbound_count, updated_at, contact_name_at)"
    " VALUES (?, ?, 'open', ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (tenant_id, id) DO UPDATE SET"
    " inbound_count = inbound_count + excluded.inbound_count,"
    " outbound_count = outbound_count + excluded.outbound_count,"
    " first_message_at = min(first_message_at, excluded.first_message_at),"
    " last_message_at = max(last_message_at, excluded.last_message_at),"
    " contact_name = CASE"
    " WHEN excluded.contact_name_at >= coalesce(contact_name_at, excluded.contact_name_at)"
    " THEN excluded.contact_name ELSE contact_name END,"
    " contact_name_at = CASE"
    " WHEN excluded.contact_name_at >= coalesce(contact_name_at, excluded.contact_name_at)"
    " THEN excluded.contact_name_at ELSE contact_name_at END,"
    " escalated_at = CASE WHEN status = 'closed' AND excluded.inbound_count > 0 THEN NULL"
    " ELSE escalated_at END,"
    " escalation_reason = CASE WHEN status = 'closed' AND excluded.inbound_count > 0 THEN NULL"
    " ELSE escalation_reason END,"
    " escalation_priority = CASE WHEN status = 'closed' AND excluded.inbound_count > 0"
    " THEN NULL ELSE escalation_priority END,"
    " status = CASE WHEN status = 'closed' AND excluded.inbound_count > 0 THEN 'open'"
    " ELSE status END,"
    " updated_at = excluded.updated_at"
)

BUSY_TIMEOUT_MS = 30_000
# The size the WAL is cut back to when a checkpoint lets it start over. It only grows past
# SQLite's checkpoint at ~4 MB while a read stays open (no checkpoint can pass it), and then
# kept its largest size until the last process closed the database. Twice the ~4 MB it
# reaches under steady load, so that steady load never truncates it.
WAL_SIZE_LIMIT = 8 * 1024 * 1024


def _configure(dbapi_connection: Any) -> None:
    """Every connection: WAL (cut back to `WAL_SIZE_LIMIT` once a long read has let it grow),
    durable commits, foreign keys, and no BEGIN of the driver's own (transactions are begun
    explicitly, IMMEDIATE for writers)."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    cursor.close()


def _on_disk(path: str) -> bool:
    """A path SQLite takes as a file's (not in memory, not a `file:` URI)."""
    return bool(path) and path != ":memory:" and not path.startswith("file:")


def _check_directory(path: str) -> None:
    """A database in a directory that does not exist is an operator's setting to correct
    (exit 2), not a store that is down (3), as SQLite's "unable to open" would have it."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        why = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ConfigError(
            [ConfigIssue("storage.url", f"the database's directory {directory} {why}")]
        )


def _create_private(path: str) -> None:
    """Create the database file readable by its owner only, before SQLite would create it
    with the umask's mode: it holds message text and phone numbers. SQLite gives the -wal
    and -shm files the database file's mode. A file that exists keeps its own. Called as
    a connection opens, so that a store made but never opened writes nothing."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:  # a directory this user may not write, a path ending in "/"
        # Named, with why: the class alone (PermissionError) said neither. Out of
        # descriptors, open(2) fails before it looks at the path, whose file may well exist.
        verb = "open" if exc.errno in (errno.EMFILE, errno.ENFILE) else "create"
        raise StoreUnavailable(
            f"cannot {verb} the database file {os.path.abspath(path)}: {exc.strerror}"
        ) from None


def _check_openable(path: str) -> None:
    """Open the file once with the standard library, so that one SQLite cannot open fails
    here, as the same error: aiosqlite (0.22.1) stops the thread of a failed connect by
    queueing a callback to the caller's loop without waiting for it, and once a command's
    loop has closed that thread dies with "Event loop is closed", a traceback after the
    command's own error. Opening reads nothing; a file that is no database fails later,
    at its first statement, on a connection that closes as any does."""
    sqlite3.connect(path).close()


class DatabaseFile:
    """The file a store opened, known by its identity on disk. SQLite goes on writing to a
    file removed, or renamed over (a backup restored in its place), while it is open: what
    it commits there is gone at the next start, though it was acknowledged. Each transaction
    first checks that the path still names the file the store first opened, and fails as
    the store being unreachable if not (ingest spools; the spool drains once restarted)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._opened: tuple[int, int] | None = None

    def opened(self) -> None:
        """Called as each connection opens: the first one names the store's file."""
        if self._opened is None:
            self._opened = self._identity()

    def check(self) -> None:
        """Raise StoreUnavailable unless the path still names the file first opened."""
        if self._opened is not None and self._identity() != self._opened:
            raise StoreUnavailable(
                f"the database file {self.path} was removed or replaced since this process "
                "opened it: restart the process"
            )

    def _identity(self) -> tuple[int, int] | None:
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return None
        return found.st_dev, found.st_ino


def _delivery_params(events: Sequence[NewEvent]) -> list[tuple[Any, ...]]:
    """`_INSERT_DELIVERY`'s parameters: created and updated when first due."""
    return [(*row, row[7], row[7]) for row in delivery_rows(events)]


def _engine(url: str, *, begin: str, database_file: DatabaseFile | None) -> AsyncEngine:
    engine = create_async_engine(
        url,
        connect_args={"timeout": BUSY_TIMEOUT_MS / 1000},
        hide_parameters=True,  # parameters hold phone numbers and message text
    )

    if database_file is not None:

        @event.listens_for(engine.sync_engine, "do_connect")
        def _before_connect(*_: Any) -> None:
            _create_private(database_file.path)
            _check_openable(database_file.path)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        _configure(dbapi_connection)
        if database_file is not None:
            database_file.opened()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        if database_file is not None:
            database_file.check()
        connection.exec_driver_sql(begin)

    return engine


class IngestWriter:
    """A sqlite3 connection used from one thread of its own, for whole ingest batches."""

    def __init__(self, path: str, database_file: DatabaseFile | None = None) -> None:
        self.path = path
        self._database_file = database_file
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-ingest")
        self._conn: sqlite3.Connection | None = None

    async def store(self, events: Sequence[NewEvent]) -> Inserted:
        """Store the events whose key is new, with their deliveries and counters, in one
        transaction; returns the ids stored and the stored ids of the keys that exist."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._store, events)

    def _store(self, events: Sequence[NewEvent]) -> Inserted:
        if self._conn is None:
            if _on_disk(self.path):
                _create_private(self.path)
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
            )
            _configure(conn)
            self._conn = conn
            if self._database_file is not None:
                self._database_file.opened()
        conn = self._conn
        if self._database_file is not None:
            self._database_file.check()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # The write lock is held since BEGIN IMMEDIATE: no other writer can store a key
            # between this lookup and the insert.
            existing: dict[Key, str] = {}
            for e in events:
                if e.idempotency_key is not None:
                    found = conn.execute(
                        _FIND_BY_KEY, (e.tenant_id, e.source_id, e.idempotency_key)
                    ).fetchone()
                    if found is not None:
                        existing[event_key(e)] = found[0]
            fresh = [e for e in events if e.idempotency_key is None or event_key(e) not in existing]
            conn.executemany(_INSERT_EVENT, [event_row(e) for e in fresh])
            conn.executemany(_INSERT_DELIVERY, _delivery_params(fresh))
            conn.executemany(_COUNT_MESSAGES, conversation_counts(fresh))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return Inserted({e.id for e in fresh}, existing)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class SqliteStore(SqlStore):
    dialect = "sqlite"
    lease_sql_file = "lease_sqlite.sql"

    def __init__(
        self,
        engine: AsyncEngine,
        read_engine: AsyncEngine | None = None,
        *,
        path: str | None,
        database_file: DatabaseFile | None = None,
    ) -> None:
        super().__init__(engine, read_engine)
        self._lease = text(self.lease_sql)
        self._database_file = database_file
        # A database in memory is private to its connection: no second connection for it.
        self._writer = IngestWriter(path, database_file) if path and path != ":memory:" else None

    async def require_schema(self) -> None:
        # Opened, a missing file would be created empty: left behind by a command run from
        # the wrong directory, or after the file was removed, under a message saying only
        # that the database has no schema.
        database = self._database_file
        if database is not None and not os.path.exists(database.path):
            raise StoreError(
                f"the database {database.path} does not exist, so it has no "
                "estafeta schema: run `estafeta migrate` to create it, or check storage.url"
            )
        await super().require_schema()

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        path = make_url(url).database
        database_file = DatabaseFile(path) if path is not None and _on_disk(path) else None
        if database_file is not None:
            _check_directory(database_file.path)
        # One DatabaseFile for every connection: once the path names another file, they
        # all refuse it, the ones opened since on that other file too.
        writer = _engine(url, begin="BEGIN IMMEDIATE", database_file=database_file)
        reader = _engine(url, begin="BEGIN", database_file=database_file)
        return cls(writer, reader, path=path, database_file=database_file)

    async def _store_candidates(
        self, events: Sequence[NewEvent], *, by_id: bool
    ) -> list[InsertResult]:
        """Webhooks (the hot path) through the ingest writer; a batch that also holds queued
        messages or escalations, or a spool import, in the general transaction."""
        plain = not any(e.message is not None or e.escalation is not None for e in events)
        if self._writer is None or by_id or not plain:
            return await super()._store_candidates(events, by_id=by_id)
        with store_errors(), self._space_watched():
            inserted = await self._writer.store(events)
        return fates(events, inserted.ids, (), inserted.originals)

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
        await super().close()

    def _insert(self, table: Any) -> Any:
        return sqlite_insert(table)

    async def _insert_new_events(
        self, conn: AsyncConnection, events: Sequence[NewEvent]
    ) -> Inserted:
        # The transaction holds SQLite's write lock since BEGIN IMMEDIATE: no other writer can
        # store a key between this lookup and the insert, so plain executemany is safe (and
        # an order of magnitude cheaper than INSERT … RETURNING row by row).
        existing = await self._ids_by_key(conn, events)
        fresh = [e for e in events if (e.tenant_id, e.source_id, e.idempotency_key) not in existing]
        if fresh:
            await conn.exec_driver_sql(_INSERT_EVENT, [event_row(e) for e in fresh])
        return Inserted({e.id for e in fresh}, existing)

    async def _insert_deliveries(self, conn: AsyncConnection, events: Sequence[NewEvent]) -> None:
        await conn.exec_driver_sql(_INSERT_DELIVERY, _delivery_params(events))

    async def _count_messages(self, conn: AsyncConnection, events: Sequence[NewEvent]) -> None:
        await conn.exec_driver_sql(_COUNT_MESSAGES, conversation_counts(events))

    async def _lease_rows(self, params: dict[str, Any]) -> list[Any]:
        """The lease statement takes the destinations, rooms and sends as one JSON list."""
        rooms = list(zip(params["destinations"], params["rooms"], params["sending"], strict=True))
        async with self._write(proves_space=False) as conn:  # an idle poll writes nothing
            result = await conn.execute(
                self._lease, {**params, "rooms": orjson.dumps(rooms).decode()}
            )
            return list(result.all())

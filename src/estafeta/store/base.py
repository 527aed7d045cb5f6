"""What every store shares: two engines, one transaction helper per direction, and the
translation of the drivers' errors into the store's own at this boundary.

A driver's error is never chained to the store's own: its text holds what the statement
carried (SQLAlchemy's `[parameters: ...]`, PostgreSQL's `DETAIL: Key (x)=(...)`), phone
numbers and message text among it, and a logged traceback prints the whole chain. The
store's error names the driver's class, SQLSTATE or constraint instead."""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import asyncpg
import structlog
from sqlalchemy import BindParameter, TextClause, bindparam, text
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from estafeta.errors import (
    StoreDeadlocked,
    StoreError,
    StoreLoginRefused,
    StoreRejected,
    StoreUnavailable,
)
from estafeta.observability.log_throttle import LogThrottle

T = TypeVar("T")

log = structlog.get_logger("estafeta.store")


def in_chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """`items` `size` at a time: a statement that names each item takes a bounded number
    (PostgreSQL fails a row IN list of ~10,000 with 54001; drivers and SQLite cap a
    statement's parameters)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


# The statements kept as .sql files: the dialect-specific ones, and due.sql that both engines'
# lease statements share.
SQL_DIR = Path(__file__).parent / "sql"


def written_in(value: str) -> BindParameter[str]:
    """`value` written into the statement's text rather than sent as a parameter: only then
    can a partial index whose condition names it serve the statement (a plan made for any
    value, as PostgreSQL keeps for a prepared statement, could not use it)."""
    return bindparam(None, value, literal_execute=True, unique=True)


def each_value(table: str, column: str, where: str = "TRUE") -> TextClause:
    """Every distinct value of `table.column` among rows matching `where`, found by the index
    that leads with the column, the next after the last (a loose index scan): one probe per
    value, however many rows share it."""
    found = found_values(table, column, where)
    sql = f"WITH RECURSIVE {found} SELECT value FROM found WHERE value IS NOT NULL"  # noqa: S608
    return text(sql)


def found_values(table: str, column: str, where: str = "TRUE") -> str:
    """`each_value`'s recursive common table expression, `found(value)`, for a statement that
    does more with each value (NULL ends it: `WHERE value IS NOT NULL` to leave it out)."""
    # Each step the first value by the index's order (ORDER BY … LIMIT 1) rather than min():
    # PostgreSQL may plan a min() as a walk of the whole index, and keeps the plan of a
    # statement without parameters as first made: made while the table was nearly empty, the
    # first step read every pending delivery at each call once a backlog built up.
    return f"""
        found(value) AS (
            SELECT (SELECT {column} FROM {table}
                    WHERE {where} AND {column} IS NOT NULL
                    ORDER BY {column} LIMIT 1)
            UNION ALL
            SELECT (SELECT t.{column} FROM {table} AS t
                    WHERE {where} AND t.{column} > found.value
                    ORDER BY t.{column} LIMIT 1)
            FROM found
            WHERE found.value IS NOT NULL
        )
        """  # noqa: S608 - the store's own names, never input


# PostgreSQL SQLSTATEs that mean "the server cannot serve us now", not "bad statement":
# class 08 (connection exception), 57P01-57P03 (shutting down, crash recovery, cannot
# connect now: starting up or not accepting connections), class 53 (insufficient
# resources: too many connections, disk full, out of memory); a server that answers but
# cannot write, which is down for every writer just the same: 25006 (read-only
# transaction: a standby a failover left the URL on), 58030 (I/O error); and a statement
# the server gave up on that would pass when tried again: 40001 (serialization failure),
# 40P01 (deadlock), 57014 (cancelled: a role's statement_timeout), 55P03 (lock_timeout).
# Taken for refusals, the spool's drain quarantined acknowledged events on them.
_UNAVAILABLE_SQLSTATES = (
    "08",
    "57P01",
    "57P02",
    "57P03",
    "53",
    "25006",
    "58030",
    "40001",
    "40P01",
    "57014",
    "55P03",
)
# A prepared statement the server does not have (26000) or already has (42P05): asyncpg's
# statement cache on a pooler that runs each transaction on any of its server connections.
_POOLED_SQLSTATES = ("26000", "42P05")
POOLER_HINT = (
    "a pooler in transaction mode (PgBouncer) is in front of PostgreSQL: add"
    " ?statement_cache_size=0 to storage.url"
)
# SQLSTATEs whose first line is the server's reason in its own fixed words, never data: a
# protocol violation (08P01: `unsupported startup parameter: options`, from PgBouncer), a
# read-only transaction (25006: `cannot execute CREATE TABLE in a read-only transaction`),
# no schema to create in (3F000: a search_path naming none), a serialization failure
# (40001), a lock or statement timeout (55P03, 57014: `canceling statement due to lock
# timeout`). The SQLSTATE alone left the operator to look up a setting to correct.
_SERVER_REASON_SQLSTATES = ("08P01", "25006", "3F000", "40001", "55P03", "57014")
# PostgreSQL refusing the login: class 28 (no such role, wrong password), 3D000 (no such
# database). Its message names only the role or the database, and is the operator's answer.
_LOGIN_REFUSED_SQLSTATES = ("28", "3D000")


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver's error, wrapped by SQLAlchemy or not."""
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(
        exc, "sqlstate", None
    )
    return sqlstate if isinstance(sqlstate, str) else None


def _first_line(exc: BaseException) -> str:
    """The driver's own first line (SQLAlchemy's wrapper adds its class in parentheses)."""
    return str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]


def statement_cache_lost(exc: BaseException) -> bool:
    """True when a prepared statement of asyncpg's cache was missing or already there on the
    server (see `_POOLED_SQLSTATES`)."""
    return _sqlstate(exc) in _POOLED_SQLSTATES


def deadlocked(exc: BaseException) -> bool:
    """True when PostgreSQL failed this transaction to break a deadlock (40P01)."""
    return _sqlstate(exc) == "40P01"


def unavailable(exc: BaseException) -> bool:
    """True when an exception means 'the database cannot be reached', not 'bad statement'."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    sqlstate = _sqlstate(exc)
    if sqlstate is not None and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
        return True
    # PoolTimeout: every connection is taken and none came back in time (a hung database).
    if isinstance(exc, InterfaceError | OSError | ConnectionError | TimeoutError | PoolTimeout):
        return True
    # asyncpg out of step with the server, above all on a connection the server has just
    # ended (pg_terminate_backend, idle_session_timeout): its FATAL read, the end not yet,
    # the driver refuses the next statement ("cannot switch to state 15; another operation
    # (2) is in progress"). Taken for a refusal, a 500, or a spooled event quarantined.
    if isinstance(exc, asyncpg.InternalClientError):
        return True
    if isinstance(exc, OperationalError | sqlite3.OperationalError):
        message = str(exc.orig if isinstance(exc, OperationalError) else exc).lower()
        return any(
            hint in message
            for hint in (
                "connect",
                "database is locked",
                "readonly",
                "read-only",
                "disk i/o",
                "disk is full",
                "unable to open",
                "shutting down",
                "terminating connection",
                "not currently accepting connections",
                "starting up",
            )
        )
    return False


def disk_full(exc: BaseException) -> bool:
    """True when a statement failed for want of disk space: SQLite's SQLITE_FULL (its disk,
    or a size limit), PostgreSQL's 53100 (disk full). Reads still answer then."""
    found = getattr(exc, "orig", None) or exc
    code = getattr(found, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_FULL:  # an extended code too
        return True
    return _sqlstate(exc) == "53100"


def rejected(exc: BaseException) -> bool:
    """True when the store refused the data itself, from any driver: a constraint violation
    (SQLSTATE class 23) or a value its column cannot hold (class 22: a number out of range,
    a character the encoding lacks). Not a refusal of the role or the statement (42501):
    what the spool's drain quarantines an event for, the store's state not being its."""
    if isinstance(exc, IntegrityError | sqlite3.IntegrityError | DataError | sqlite3.DataError):
        return True
    sqlstate = _sqlstate(exc)
    return sqlstate is not None and sqlstate.startswith(("22", "23"))


# Errors whose text may quote what a statement carried. SQLAlchemy's StatementError also
# wraps errors raised while binding a parameter, which quote the value.
_DRIVER_ERRORS = (StatementError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError)


# SQLite's result codes that a file's place, mode or kind explains, with SQLite's own words
# for them: the class alone ("OperationalError") left an operator nothing to correct. Fixed
# words, keyed by code: the driver's text is never shown (see above).
_SQLITE_REASONS = {
    sqlite3.SQLITE_BUSY: "database is locked",
    sqlite3.SQLITE_PERM: "access permission denied",
    sqlite3.SQLITE_READONLY: "attempt to write a readonly database",
    sqlite3.SQLITE_IOERR: "disk I/O error",
    sqlite3.SQLITE_CORRUPT: "database disk image is malformed",
    sqlite3.SQLITE_FULL: "database or disk is full",
    sqlite3.SQLITE_CANTOPEN: "unable to open database file",
    sqlite3.SQLITE_NOTADB: "file is not a database",
}


def _sqlite_code(exc: BaseException) -> str | None:
    """SQLite's result code of a sqlite3 error, wrapped by SQLAlchemy or not, as
    `SQLITE_CANTOPEN: unable to open database file` when `_SQLITE_REASONS` has words for it."""
    found = getattr(exc, "orig", None) or exc
    code = getattr(found, "sqlite_errorcode", None)
    name = getattr(found, "sqlite_errorname", None)
    if not isinstance(code, int) or not isinstance(name, str):
        return None
    reason = _SQLITE_REASONS.get(code & 0xFF)  # an extended code's primary one
    return f"{name}: {reason}" if reason else name


# The resolver's failures (socket.gaierror) in its own words, keyed by code: the class alone
# ("gaierror") did not say that the database's host name does not resolve.
_RESOLVER_REASONS = {
    socket.EAI_NONAME: "EAI_NONAME: Name or service not known",
    socket.EAI_AGAIN: "EAI_AGAIN: Temporary failure in name resolution",
    socket.EAI_FAIL: "EAI_FAIL: Non-recoverable failure in name resolution",
}


def _named(exc: BaseException) -> str:
    """The error's class and SQLSTATE (or SQLite's result code): enough to diagnose, never
    data."""
    sqlstate = _sqlstate(exc)
    if sqlstate:
        return f"{type(exc).__name__} (SQLSTATE {sqlstate})"
    sqlite_code = _sqlite_code(exc)
    if sqlite_code:
        return f"{type(exc).__name__} ({sqlite_code})"
    found = getattr(exc, "orig", None) or exc
    if isinstance(found, socket.gaierror) and found.errno in _RESOLVER_REASONS:
        return f"{type(exc).__name__} ({_RESOLVER_REASONS[found.errno]})"
    code = found.errno if type(found) is OSError else None
    if code is not None and code in errno.errorcode:
        # A bare OSError says nothing by its class, unlike ConnectionRefusedError: EMFILE
        # (client connections took every descriptor) or ENETUNREACH is for the operator to
        # read. Fixed words by the code, never the text (it may name a path).
        return f"{type(exc).__name__} ({errno.errorcode[code]}: {os.strerror(code)})"
    return type(exc).__name__


def translated(exc: Exception) -> Exception:
    """The store's own error for a foreign one that it recognises, else `exc` itself.

    A constraint violation keeps only the driver's first line, which names the constraint
    (never the DETAIL, which may quote the data); any other driver error only its class and
    SQLSTATE (a first line may quote a value: `invalid input syntax for type json: "..."`),
    but a refused login its first line too, which names the role or database and says why,
    and so does an error whose first line is the server's fixed words
    (`_SERVER_REASON_SQLSTATES`: a read-only transaction, a statement timeout…)."""
    sqlstate = _sqlstate(exc)
    if sqlstate is not None and sqlstate.startswith(_LOGIN_REFUSED_SQLSTATES):
        reason = _first_line(exc)
        return StoreLoginRefused(
            f"the store refused the connection: {reason} (SQLSTATE {sqlstate})"
        )
    if deadlocked(exc):
        return StoreDeadlocked(f"the store cannot be reached: {_named(exc)}")
    why = f": {_first_line(exc)}" if sqlstate in _SERVER_REASON_SQLSTATES else ""
    if unavailable(exc):
        return StoreUnavailable(f"the store cannot be reached: {_named(exc)}{why}")
    if rejected(exc):
        if (sqlstate or "").startswith("22") or isinstance(exc, DataError | sqlite3.DataError):
            # A data exception's first line quotes the value (`invalid input syntax …`).
            return StoreRejected(f"the store refused the data: {_named(exc)}")
        return StoreRejected(f"the store refused the data: {_named(exc)}: {_first_line(exc)}")
    if sqlstate == "42501":  # the role may not: its first line names the object, never data
        return StoreError(f"the store failed: {_first_line(exc)} (SQLSTATE {sqlstate})")
    if statement_cache_lost(exc):
        return StoreError(f"the store failed: {_named(exc)}: {POOLER_HINT}")
    if isinstance(exc, _DRIVER_ERRORS):
        return StoreError(f"the store failed: {_named(exc)}{why}")
    return exc


@contextmanager
def store_errors() -> Iterator[None]:
    """Around a store call: a foreign error it recognises leaves as the store's own (see
    `translated`), not chained to it; the store's own errors and unknown ones pass through
    unchanged."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        store_error = translated(exc)
        if store_error is exc:
            raise
        raise store_error from None  # the driver's text may quote the data: see above


class StoreBase(ABC):
    dialect: ClassVar[str]

    def __init__(self, engine: AsyncEngine, read_engine: AsyncEngine | None = None) -> None:
        self.engine = engine
        self.read_engine = read_engine or engine
        # Why this process's last write failed for want of disk space, until a write commits
        # again: reads still answer on a full disk, so a ping alone showed the store `ok` in
        # /health/detailed while every write failed.
        self.disk_full_error: str | None = None
        # `store_full` as writes begin to fail so, `store_writable` once one commits again:
        # a pair a minute at most (a nearly full disk may take a small write, a heartbeat,
        # between two webhooks it refuses).
        self._full_lines = LogThrottle()
        self._full_logged = False

    @abstractmethod
    def _insert(self, table: Any) -> Any:
        """INSERT with ON CONFLICT support (`sqlalchemy.dialects.<engine>.insert`)."""

    @asynccontextmanager
    async def _write(self, *, proves_space: bool = True) -> AsyncIterator[AsyncConnection]:
        """One transaction on the writer; foreign errors are translated at this boundary.
        `proves_space=False`: its commit does not clear `disk_full_error` (`_space_watched`)."""
        with store_errors(), self._space_watched(proves_space=proves_space):
            async with self.engine.begin() as conn:
                yield conn

    @contextmanager
    def _space_watched(self, *, proves_space: bool = True) -> Iterator[None]:
        """Around a write, inside `store_errors()` (it needs the driver's own error): one that
        fails for want of disk space sets `disk_full_error`, one that commits clears it,
        unless it may have written nothing (`proves_space=False`: a lease, every poll, or a
        rescue that finds nothing due commits on a full disk, and said `ok` a moment after
        each refused webhook)."""
        try:
            yield
        except Exception as exc:
            if disk_full(exc):
                error = f"the store cannot write: {_named(exc)}"
                # Said nowhere else in the log: webhooks are spooled, a worker retries its
                # records, and reads (the worker's polls, `store_down`'s) still answer.
                if self.disk_full_error is None and self._full_lines.due() is not None:
                    self._full_logged = True
                    log.warning("store_full", error=error)
                self.disk_full_error = error
            raise
        if proves_space:
            self.disk_full_error = None
            if self._full_logged:
                self._full_logged = False
                log.info("store_writable")

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        with store_errors():
            async with self.read_engine.connect() as conn:
                yield conn

    async def close(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()

    async def clock_ms(self) -> int:
        """The store's time in Unix ms, which every process sharing it goes by (clock.py's
        StoreClock): here the machine's own, where every process runs (SQLite)."""
        return time.time_ns() // 1_000_000

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a trivial query succeeds."""
        async with self._read() as conn:
            await conn.execute(text("SELECT 1"))

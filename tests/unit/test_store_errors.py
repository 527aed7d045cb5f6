"""Which database errors mean "the store is down" (spool, retry) rather than a bug."""

from __future__ import annotations

import errno
import socket
import sqlite3

import asyncpg
import pytest
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from estafeta.errors import StoreError, StoreLoginRefused, StoreRejected, StoreUnavailable
from estafeta.store.base import disk_full, translated, unavailable


class DriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "down"),
    [
        (OperationalError("q", {}, DriverError("x", "57P03")), True),  # not accepting / starting
        (OperationalError("q", {}, DriverError("x", "57P01")), True),  # admin shutdown
        (OperationalError("q", {}, DriverError("x", "08006")), True),  # connection failure
        (OperationalError("q", {}, DriverError("x", "53300")), True),  # too many connections
        (OperationalError("q", {}, DriverError("x", "25006")), True),  # read-only: a standby
        (OperationalError("q", {}, DriverError("x", "53100")), True),  # disk full
        (OperationalError("q", {}, DriverError("x", "58030")), True),  # I/O error
        (OperationalError("q", {}, DriverError("x", "53200")), True),  # out of memory
        (DBAPIError("q", {}, DriverError("x", "40001")), True),  # serialization failure
        (DBAPIError("q", {}, DriverError("x", "40P01")), True),  # deadlock
        (DBAPIError("q", {}, DriverError("x", "57014")), True),  # statement_timeout
        (DBAPIError("q", {}, DriverError("x", "55P03")), True),  # lock_timeout
        (DBAPIError("q", {}, DriverError("x", "40002")), False),  # a deferred constraint
        (OperationalError("q", {}, DriverError("database is locked")), True),  # SQLite busy
        (sqlite3.OperationalError("database or disk is full"), True),  # SQLITE_FULL
        (OperationalError("q", {}, DriverError("unable to open database file")), True),
        (ConnectionRefusedError(111, "refused"), True),
        (PoolTimeout("QueuePool limit of size 10 overflow 10 reached"), True),  # a hung store
        # asyncpg on a connection the server has just ended (test_ended_connections.py)
        (asyncpg.InternalClientError("cannot switch to state 15; another operation (2)"), True),
        (IntegrityError("q", {}, DriverError("duplicate key", "23505")), False),
        (ProgrammingError("q", {}, DriverError("syntax error", "42601")), False),
        (ValueError("a bug"), False),
    ],
)
def test_down_or_bug(error: Exception, down: bool) -> None:
    assert unavailable(error) is down


@pytest.mark.parametrize(
    "error",
    [
        IntegrityError("q", {}, DriverError("CHECK constraint failed: x", "23514")),
        sqlite3.IntegrityError("CHECK constraint failed: deliveries_priority_range"),
        DriverError(
            'violates check constraint "deliveries_priority_range"\nDETAIL: +5511…', "23514"
        ),
    ],
)
def test_a_constraint_violation_from_any_driver_is_the_stores_own_error(error: Exception) -> None:
    store_error = translated(error)
    assert isinstance(store_error, StoreRejected)
    assert "constraint" in str(store_error) and "DETAIL" not in str(store_error)


def test_a_busy_sqlite_file_from_the_raw_driver_is_unavailable() -> None:
    assert unavailable(sqlite3.OperationalError("database is locked"))
    assert isinstance(translated(sqlite3.OperationalError("database is locked")), StoreUnavailable)
    bug = sqlite3.OperationalError("no such column: nope")
    assert str(translated(bug)) == "the store failed: OperationalError"


def test_a_sqlite_error_an_operator_can_act_on_is_named_with_sqlites_reason() -> None:
    # Before: "the store cannot be reached: OperationalError" for a file this user may read
    # but not write (a backup restored as root), which says nothing of what to correct.
    # SQLite opens such a file read-only, as this database is.
    read_only = sqlite3.connect("file::memory:?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError) as raised:
            read_only.execute("CREATE TABLE t (x)")
    finally:
        read_only.close()
    store_error = translated(OperationalError("CREATE TABLE t (x)", {}, raised.value))
    assert isinstance(store_error, StoreUnavailable)
    assert str(store_error) == (
        "the store cannot be reached: OperationalError"
        " (SQLITE_READONLY: attempt to write a readonly database)"
    )


def _sqlite_full() -> sqlite3.OperationalError:
    """A real SQLITE_FULL: a write past the database's `max_page_count`, as on a full disk."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("PRAGMA max_page_count = 1")
        with pytest.raises(sqlite3.OperationalError) as raised:
            conn.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))
    finally:
        conn.close()
    return raised.value


@pytest.mark.parametrize(
    ("error", "full"),
    [
        (_sqlite_full(), True),
        (OperationalError("INSERT …", {}, _sqlite_full()), True),
        (OperationalError("q", {}, DriverError("x", "53100")), True),  # PostgreSQL: disk full
        (OperationalError("q", {}, DriverError("x", "53200")), False),  # out of memory
        (sqlite3.OperationalError("database is locked"), False),
    ],
)
def test_a_write_that_failed_for_want_of_disk_space_is_known(error: Exception, full: bool) -> None:
    """What /health/detailed reports a store that reads but cannot write by."""
    assert disk_full(error) is full


@pytest.mark.parametrize(
    "error",
    [
        DataError(
            "INSERT …",
            ("+5511987654321",),
            DriverError('invalid input syntax for type json: "+5511987654321"', "22P02"),
            hide_parameters=False,
        ),
        asyncpg.InvalidTextRepresentationError(
            'invalid input syntax for type json\nDETAIL: Token "+5511987654321" is invalid.'
        ),
        sqlite3.DataError("+5511987654321"),
    ],
)
def test_a_value_the_store_cannot_hold_is_refused_data_named_without_its_text(
    error: Exception,
) -> None:
    """A data exception (class 22) is the data's refusal, as a constraint's is (the spool's
    drain quarantines the event for it, and keeps every event for any other store error);
    its first line quotes the value, so the class and SQLSTATE are all it says."""
    store_error = translated(error)
    assert type(store_error) is StoreRejected
    assert type(error).__name__ in str(store_error) and "5511987654321" not in str(store_error)


def test_any_other_driver_error_is_named_without_its_text() -> None:
    """Its first line may quote a value too; the class and SQLSTATE are enough to start from."""
    error = ProgrammingError(
        "SELECT …", (), DriverError('syntax error at or near "+5511987654321"', "42601")
    )
    store_error = translated(error)
    assert type(store_error) is StoreError
    assert str(store_error) == "the store failed: ProgrammingError (SQLSTATE 42601)"


def test_a_foreign_error_not_from_a_driver_passes_through() -> None:
    bug = ValueError("a bug")
    assert translated(bug) is bug


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            DBAPIError("connect", {}, DriverError('database "estafet" does not exist', "3D000")),
            'database "estafet" does not exist',
        ),
        (
            asyncpg.InvalidPasswordError('password authentication failed for user "bob"'),
            'password authentication failed for user "bob"',
        ),
        (
            DBAPIError("connect", {}, DriverError('role "bob" does not exist', "28000")),
            'role "bob" does not exist',
        ),
    ],
)
def test_a_refused_login_says_why(error: Exception, reason: str) -> None:
    """The server's own words (they name only the role or the database): an operator with a
    typo in storage.url was told `DBAPIError (SQLSTATE 3D000)`."""
    store_error = translated(error)
    # Unavailable to a running service (ingest spools), exit 2 at start (cli.py).
    assert type(store_error) is StoreLoginRefused
    assert isinstance(store_error, StoreUnavailable)
    assert str(store_error).startswith(f"the store refused the connection: {reason}")


def test_a_store_out_of_reach_for_want_of_descriptors_says_so() -> None:
    # Before: "the store cannot be reached: OSError" in /health/detailed, the worker's
    # `store_unavailable` lines and the CLI, while client connections had taken every file
    # descriptor: nothing said that the database was fine and the process was not.
    store_error = translated(OSError(errno.EMFILE, "Too many open files"))
    assert isinstance(store_error, StoreUnavailable)
    assert str(store_error) == (
        "the store cannot be reached: OSError (EMFILE: Too many open files)"
    )


def test_a_database_host_that_does_not_resolve_says_so() -> None:
    # Before: "the store cannot be reached: gaierror", a name from Python's socket module that
    # left the operator to guess at a typo in the host. Fixed words by the resolver's code,
    # as for errno's (never the exception's text).
    store_error = translated(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert isinstance(store_error, StoreUnavailable)
    assert str(store_error) == (
        "the store cannot be reached: gaierror (EAI_NONAME: Name or service not known)"
    )
    again = translated(socket.gaierror(socket.EAI_AGAIN, "a resolver's text"))
    assert str(again) == (
        "the store cannot be reached: gaierror (EAI_AGAIN: Temporary failure in name resolution)"
    )

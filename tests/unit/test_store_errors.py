"""Which database errors mean "the store is down" (spool, retry) rather than a bug."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from estafeta.errors import StoreRejected, StoreUnavailable
from estafeta.store.base import translated, unavailable


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
        (OperationalError("q", {}, DriverError("database is locked")), True),  # SQLite busy
        (OperationalError("q", {}, DriverError("unable to open database file")), True),
        (ConnectionRefusedError(111, "refused"), True),
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
    assert translated(bug) is bug

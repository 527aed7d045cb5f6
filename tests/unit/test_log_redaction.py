"""The log pipeline's last line of defence: no secret key's value, no data a driver quoted."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
import structlog
from sqlalchemy.exc import IntegrityError

from estafeta.errors import StoreRejected
from estafeta.observability.logging import configure_logging

PHONE = "5511987654321"
TEXT = "Olá Maria"


class DriverError(Exception):
    """As asyncpg prints a constraint violation: its DETAIL quotes the row."""

    def __str__(self) -> str:
        return (
            f'duplicate key value violates unique constraint "x"\nDETAIL:  Key (phone)=(+{PHONE})'
        )


@pytest.fixture
def printed(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """capsys, with the logging configuration restored afterwards."""
    saved = structlog.get_config()
    try:
        yield capsys
    finally:
        structlog.configure(**saved)


def test_a_chained_driver_error_loses_its_parameters_and_detail(
    printed: pytest.CaptureFixture[str],
) -> None:
    """What the store never does (store/base.py), should some other code do it."""
    configure_logging("info")  # in the test: it binds the stderr capsys has in place now
    params = (f"+{PHONE}", TEXT)  # not on the raising line, which the traceback quotes
    try:
        try:
            raise IntegrityError("INSERT …", params, DriverError())
        except IntegrityError as exc:
            raise StoreRejected("the store refused the data") from exc
    except StoreRejected as exc:
        structlog.get_logger("t").error("unhandled_error", exc_info=exc)
    line = orjson.loads(printed.readouterr().err)
    assert (
        "[parameters: [redacted]" in line["exception"] and "DETAIL: [redacted]" in line["exception"]
    )
    assert PHONE not in line["exception"] and TEXT not in line["exception"]
    assert 'unique constraint "x"' in line["exception"]  # what to diagnose with stays


def test_secret_keys_are_redacted(printed: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    structlog.get_logger("t").info("sent", phone=f"+{PHONE}", destination="crm")
    line = orjson.loads(printed.readouterr().err)
    assert (line["phone"], line["destination"]) == ("[redacted]", "crm")

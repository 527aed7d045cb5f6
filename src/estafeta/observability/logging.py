"""Structured logs: one JSON object per line on stderr (structlog + orjson).

Log calls pass ids and classes of errors, never message bodies, phone numbers or secrets;
the redaction processor is the last line of defence for keys that must never be printed.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

SECRET_KEYS = frozenset(
    {
        "secret",
        "api_key",
        "authorization",
        "token",
        "password",
        "app_secret",
        "auth_token",
        "access_token",
        "client_secret",
        "admin_key",
        "master_key",
        "text",
        "body",
        "phone",
    }
)


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in SECRET_KEYS:
            event[key] = "[redacted]"
    return event


# The lines of a driver's error that quote what a statement carried: SQLAlchemy's bound
# parameters and PostgreSQL's DETAIL (`Key (phone)=(+55...) already exists`). The store never
# chains driver errors to its own (store/base.py); this catches one that escapes it.
_DATA_LINES = re.compile(r"^(\[parameters: |DETAIL: ).*$", re.MULTILINE)


def _redact_exception(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    rendered = event.get("exception")  # only log lines with a traceback pay for the scan
    if rendered is not None:
        event["exception"] = _DATA_LINES.sub(r"\1[redacted]", rendered)
    return event


# Each logger's processors are looked up once (a lookup per line saved in production).
# The test suite turns it off: structlog's capture_logs cannot see into a logger cached by
# an in-process command before it.
CACHE_LOGGERS = True


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    numeric = logging.getLevelName(level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=lambda o, **_: orjson.dumps(o).decode())
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            _redact_exception,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=CACHE_LOGGERS,
    )

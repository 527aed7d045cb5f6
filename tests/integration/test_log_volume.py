"""A lasting failure logs a few lines, not one per request: while the store is unreachable
every webhook is spooled and every API call answered 503, and a failing spool disk refuses
every webhook. Each kind of line comes at once, then at most once a minute with the `count`
since the last (observability/log_throttle.py), as `ingest_refused` does."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from estafeta.api.app import create_app
from estafeta.config import Config
from estafeta.errors import HttpError
from estafeta.hub import Hub
from estafeta.ingress.spool import Spool
from estafeta.observability.log_throttle import LOG_EVERY_S, LogThrottle, ServerLines
from estafeta.store import open_store
from estafeta.store.sqlstore import SqlStore
from tests.acceptance.conftest import execute
from tests.conftest import signed
from tests.integration.store_support import store_as_role
from tests.integration.test_ingress_api import MESSAGE
from tests.integration.test_spool import UNREACHABLE, new_event

REQUESTS = 200
ADMIN = {"authorization": "Bearer test-admin-key"}
JSON = {"content-type": "application/json"}


@pytest.fixture
async def down(config: Config, tmp_path: Path) -> AsyncIterator[tuple[Hub, httpx.AsyncClient]]:
    """The API and ingest of a hub whose store cannot be reached, spooling into tmp_path."""
    unreachable = open_store(UNREACHABLE)
    hub = Hub(config, unreachable, spool=Spool(tmp_path / "spool", max_bytes=10**8))
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        yield hub, http
    await hub.close()
    await unreachable.close()


def lines(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == event]


async def answers_to_webhooks(http: httpx.AsyncClient, n: int) -> set[tuple[int, str]]:
    """The distinct (status, error) answers to `n` signed webhooks, each a new message."""
    answers = set()
    for i in range(n):
        r = await http.post("/in/crm-events", content=MESSAGE, headers=signed(MESSAGE, f"m{i}"))
        answers.add((r.status_code, r.json()["error"]))
    return answers


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_webhooks_spooled_through_an_outage_log_a_line_a_minute(
    down: tuple[Hub, httpx.AsyncClient],
) -> None:
    hub, http = down
    assert hub.spool is not None
    ticks = Ticks()
    hub.spool._logged = LogThrottle(monotonic=ticks)

    async def webhook(i: int) -> None:
        r = await http.post("/in/crm-events", content=MESSAGE, headers=signed(MESSAGE, f"m{i}"))
        assert r.headers["x-estafeta-spooled"] == "1"

    with capture_logs() as logs:
        for i in range(REQUESTS):
            await webhook(i)
        ticks.now += LOG_EVERY_S
        await webhook(REQUESTS)
    spooled = lines(logs, "events_spooled")
    # The first at once, the next a minute later with those since; every event counted.
    assert [e["count"] for e in spooled] == [1, REQUESTS]
    # Each says why, the store's error (spooled at once for a while after it was found down).
    assert [e["error"] for e in spooled] == [
        "the store cannot be reached: ConnectionRefusedError"
    ] * 2


async def test_api_calls_refused_through_an_outage_log_a_line_a_minute(
    down: tuple[Hub, httpx.AsyncClient],
) -> None:
    hub, http = down
    ticks = Ticks()
    hub.unavailable_lines = LogThrottle(monotonic=ticks)

    async def read() -> None:
        r = await http.get("/api/v1/events/evt_none", headers=ADMIN)
        assert (r.status_code, r.json()["error"]) == (503, "store_unavailable")

    with capture_logs() as logs:
        for _ in range(REQUESTS):
            await read()
        ticks.now += LOG_EVERY_S
        await read()
    unavailable = lines(logs, "store_unavailable")
    assert [e["count"] for e in unavailable] == [1, REQUESTS]
    assert all(e["error"] for e in unavailable)


async def test_webhooks_refused_without_a_spool_log_a_line_a_minute(config: Config) -> None:
    unreachable = open_store(UNREACHABLE)
    hub = Hub(config, unreachable)
    transport = httpx.ASGITransport(app=create_app(hub))
    with capture_logs() as logs:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            assert await answers_to_webhooks(http, REQUESTS) == {(503, "store_unavailable")}
    await hub.close()
    await unreachable.close()
    unavailable = lines(logs, "store_unavailable")
    assert len(unavailable) == 1 and unavailable[0]["count"] == 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_store_refusing_every_write_logs_a_line_a_minute_and_counts_refusals(
    config: Config, store: SqlStore, database_url: str
) -> None:
    # A role that may read the tables but not write them (a grant missed when the database
    # was set up): every webhook was answered `500 internal_error` and logged as a bug, a
    # traceback each, and the source's refusals went uncounted, so `webhooks_refused` never
    # fired while every message was lost (Twilio does not retry).
    async with store_as_role(database_url, "nowrite", "SELECT") as (reader, role):
        hub = Hub(config, reader)
        try:
            transport = httpx.ASGITransport(app=create_app(hub))
            with capture_logs() as logs:
                async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
                    assert await answers_to_webhooks(http, REQUESTS) == {(500, "store_failed")}
                    await execute(database_url, f'REVOKE ALL ON events FROM "{role}"')
                    for _ in range(REQUESTS):
                        r = await http.get("/api/v1/events/evt_none", headers=ADMIN)
                        assert (r.status_code, r.json()["error"]) == (500, "store_failed"), r.text
                    # A body refused before the key is checked: the key cannot be checked now,
                    # so the body's refusal stands (the error escaped, a plain-text 500).
                    await execute(database_url, f'REVOKE ALL ON api_keys FROM "{role}"')
                    r = await http.post(
                        "/api/v1/events",
                        content=b'{"type": "lead',
                        headers={"authorization": "Bearer est_a_key", **JSON},
                    )
                    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
        finally:
            await hub.close()
    assert lines(logs, "unhandled_error") == []
    failed = lines(logs, "store_failed")
    assert [(e["count"], e["error"]) for e in failed] == [
        (1, "the store failed: permission denied for table events (SQLSTATE 42501)"),
    ] * 2, failed
    streak = hub.refusals.streaks["crm-events"]
    assert (streak.count, streak.error) == (REQUESTS, "store_failed")


async def test_a_failing_spool_disk_logs_a_line_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10**8)

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        with capture_logs() as logs, monkeypatch.context() as faults:
            faults.setattr(os, "write", disk_full)
            for n in range(REQUESTS):
                with pytest.raises(HttpError):
                    await spool.append(new_event(n))
    finally:
        await spool.close()
    failed = lines(logs, "spool_write_failed")
    assert [(e["count"], e["error"]) for e in failed] == [(1, "ENOSPC")]


def test_a_throttled_line_carries_the_count_since_the_last() -> None:
    now = [0.0]
    throttle = LogThrottle(monotonic=lambda: now[0])
    assert throttle.due("a", 3) == 3  # the first at once
    assert [throttle.due("a", 2) for _ in range(4)] == [None] * 4
    assert throttle.due("b") == 1  # each kind on its own
    now[0] += LOG_EVERY_S
    assert throttle.due("a") == 2 * 4 + 1  # those since the last line, this one included
    assert throttle.due("a") is None


def test_uvicorns_per_request_lines_come_a_minute_apart_with_their_count() -> None:
    now = [0.0]
    lines = ServerLines(LogThrottle(monotonic=lambda: now[0]))

    def printed(message: str, *args: str) -> str | None:
        record = logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, message, args, None)
        return record.getMessage() if lines.filter(record) else None

    busy = "Exceeded concurrency limit."
    assert printed(busy) == busy  # the first at once
    assert [printed(busy) for _ in range(499)] == [None] * 499
    not_http = "Invalid HTTP request received: %s"  # each kind on its own, whatever its reason
    assert printed(not_http, "Invalid method encountered") is not None
    assert printed(not_http, "Duplicate Content-Length") is None
    assert printed("Application startup failed. Exiting.") is not None  # others untouched
    now[0] += LOG_EVERY_S
    assert printed(busy) == f"{busy} (500 since the last such line)"
    reason = "Invalid method encountered"
    assert printed(not_http, reason) == (
        f"Invalid HTTP request received: {reason} (2 since the last such line)"
    )

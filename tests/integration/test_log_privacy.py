"""What a store error prints when it is logged in full: never the data its statement carried."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import structlog
from structlog.testing import capture_logs

from estafeta.api.app import create_app
from estafeta.config import Config
from estafeta.errors import StoreRejected
from estafeta.hub import Hub
from estafeta.observability.logging import configure_logging
from estafeta.store.records import NewDelivery, NewEvent, NewMessage
from estafeta.store.sqlstore import SqlStore

PHONE = "5511987654321"
TEXT = "Olá Maria, seu exame saiu"


@pytest.fixture
def logged(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[Exception], str]]:
    """Log an exception as an unexpected one is (api/responses.py `handle_unexpected`), with
    the project's logging configuration; returns what was printed."""
    saved = structlog.get_config()

    def log(exc: Exception) -> str:
        configure_logging("info")  # here: it binds the stderr capsys has in place now
        structlog.get_logger("estafeta.api").error(
            "unhandled_error", error_class=type(exc).__name__, exc_info=exc
        )
        return capsys.readouterr().err

    try:
        yield log
    finally:
        structlog.configure(**saved)


async def test_a_refused_api_key_logs_its_constraint_not_its_label(
    store: SqlStore, logged: Callable[[Exception], str]
) -> None:
    with pytest.raises(StoreRejected) as refused:
        await store.create_api_key(
            tenant_id="no-such-tenant",
            key_hash="h" * 64,
            label=f"+{PHONE} {TEXT}",
            actor="test",
            now_ms=1,
        )
    printed = logged(refused.value)
    assert "StoreRejected" in printed and "IntegrityError" in printed
    assert "foreign key" in printed.lower()
    assert PHONE not in printed and TEXT not in printed


@pytest.mark.parametrize("queued", [False, True], ids=["webhook", "queued-message"])
async def test_an_event_stored_twice_logs_neither_its_key_nor_its_payload(
    store: SqlStore, logged: Callable[[Exception], str], queued: bool
) -> None:
    """The primary key's DETAIL quotes the id (here holding a phone number), the parameters
    the payload; a webhook batch and one with a queued message take different paths."""
    event_id = f"evt_{PHONE}"
    stored = NewEvent(
        id=event_id,
        tenant_id="clinica-sol",
        source_id="crm-events",
        type="message.received",
        idempotency_key=None,
        occurred_at=1,
        received_at=1,
        payload=f'{{"id":"{event_id}","data":{{"from":"+{PHONE}","text":"{TEXT}"}}}}',
        deliveries=(NewDelivery(id="dlv_1", destination_id="crm", priority=1, max_attempts=3),),
        conversation_id=PHONE,
        direction="outbound",
        contact_name="Maria",
        message=(
            NewMessage(id="msg_1", source_id="crm-events", recipient=f"+{PHONE}", content="{}")
            if queued
            else None
        ),
    )
    await store.insert_events([stored])
    with pytest.raises(StoreRejected) as refused:
        await store.insert_events([stored])
    printed = logged(refused.value)
    assert "StoreRejected" in printed and "events" in printed
    assert PHONE not in printed and TEXT not in printed


async def test_an_unexpected_api_error_is_logged_once_through_the_redacting_log(
    store: SqlStore, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It is logged (JSON, redacted) and answered 500; Starlette then raised it on out of the
    app, and uvicorn printed its traceback a second time as plain text, past the redaction
    and breaking a one-JSON-object-a-line log pipeline."""

    async def bug(*_: Any, **__: Any) -> None:
        raise ValueError(f"a bug quoting +{PHONE}")

    monkeypatch.setattr(store, "get_event", bug)
    hub = Hub(config, store)
    # raise_app_exceptions: what escapes the app fails the request here, as uvicorn logs it.
    transport = httpx.ASGITransport(app=create_app(hub), raise_app_exceptions=True)
    try:
        with capture_logs() as logs:
            async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
                r = await client.get(
                    "/api/v1/events/evt_1", headers={"authorization": "Bearer test-admin-key"}
                )
    finally:
        await hub.close()
    assert (r.status_code, r.json()["error"]) == (500, "internal_error")
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["unhandled_error"]

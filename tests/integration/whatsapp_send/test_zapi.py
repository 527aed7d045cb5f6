"""Z-API sends against the fake instance (contracts §3.1, §3.5)."""

from __future__ import annotations

import time

import aiohttp
import pytest

from estafeta.connectors.whatsapp import OutboundMessage, ZApiClient
from estafeta.delivery.outcome import OutcomeKind
from estafeta.testing.fakes import FakeZApi
from tests.integration.whatsapp_send.support import CUSTOMER, ZA, deliver, za_source

BASE = f"/instances/{ZA['instance_id']}/token/{ZA['instance_token']}"


async def test_text_yields_the_message_id(zapi: FakeZApi, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(za_source(zapi.url), session, text="Olá Maria!")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.SUCCESS, 200)
    [sent] = zapi.sent
    assert outcome.external_id == sent.message_id
    assert len(sent.message_id) == 20
    assert sent.path == f"{BASE}/send-text"
    assert sent.headers["client-token"] == ZA["client_token"]
    assert sent.request == {"phone": "5511987654321", "message": "Olá Maria!"}
    assert sent.message_id in outcome.response_excerpt  # kept, as every attempt's answer is


@pytest.mark.parametrize(
    ("media", "path", "request_body"),
    [
        (
            {"kind": "image", "url": "https://files.example/a.jpg", "caption": "Olha"},
            "send-image",
            {"image": "https://files.example/a.jpg", "caption": "Olha"},
        ),
        (
            {"kind": "document", "url": "https://files.example/l", "filename": "laudo.pdf"},
            "send-document/pdf",
            {"document": "https://files.example/l", "fileName": "laudo.pdf"},
        ),
        (
            {"kind": "audio", "url": "https://files.example/a.ogg"},
            "send-audio",
            {"audio": "https://files.example/a.ogg"},
        ),
    ],
)
async def test_media(
    zapi: FakeZApi,
    session: aiohttp.ClientSession,
    media: dict[str, str],
    path: str,
    request_body: dict[str, str],
) -> None:
    assert (await deliver(za_source(zapi.url), session, media=media)).succeeded
    [sent] = zapi.sent
    assert sent.path == f"{BASE}/{path}"
    assert sent.request == {"phone": "5511987654321", **request_body}


async def test_no_templates(zapi: FakeZApi, session: aiohttp.ClientSession) -> None:
    template = {"name": "confirmacao", "language": "pt_BR"}
    outcome = await deliver(za_source(zapi.url), session, template=template)
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "unsupported_message")
    assert zapi.requests == 0


@pytest.mark.parametrize("retry_after", [None, 2.0])
async def test_throttling(
    zapi: FakeZApi, session: aiohttp.ClientSession, retry_after: float | None
) -> None:
    zapi.throttle_next(1, retry_after_s=retry_after)
    outcome = await deliver(za_source(zapi.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "zapi_http_429")
    assert outcome.retry_after_s == retry_after


async def test_server_error(zapi: FakeZApi, session: aiohttp.ClientSession) -> None:
    zapi.fail_next(2, 502)
    for _ in range(2):
        outcome = await deliver(za_source(zapi.url), session, text="oi")
        assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "zapi_http_502")
    assert (await deliver(za_source(zapi.url), session, text="oi")).succeeded
    assert len(zapi.sent) == 1


async def test_rejected(zapi: FakeZApi, session: aiohttp.ClientSession) -> None:
    zapi.reject_next("Phone number does not exist on WhatsApp")
    outcome = await deliver(za_source(zapi.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "zapi_http_400")
    assert outcome.response_excerpt.startswith("400 Phone number does not exist on WhatsApp")


async def test_an_answer_that_echoes_the_url_never_stores_the_instance_token(
    zapi: FakeZApi, session: aiohttp.ClientSession
) -> None:
    # The instance token is part of the URL; an answer quoting the path was stored whole.
    zapi.reject_next(f"No route {BASE}/send-text")
    outcome = await deliver(za_source(zapi.url), session, text="oi")
    assert outcome.kind is OutcomeKind.PERMANENT
    assert ZA["instance_token"] not in outcome.response_excerpt
    assert "/token/***/send-text" in outcome.response_excerpt


async def test_wrong_client_token(zapi: FakeZApi, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(za_source(zapi.url, client_token="F-old"), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "zapi_http_401")
    assert outcome.response_excerpt.startswith("401 Client-Token not allowed")


async def test_wrong_instance_token(zapi: FakeZApi, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(za_source(zapi.url, instance_token="0" * 24), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "zapi_http_400")
    assert outcome.response_excerpt.startswith("400 Instance not found")


async def test_the_documented_missing_client_token_body(zapi: FakeZApi) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{zapi.url}{BASE}/send-text", json={"phone": "55", "message": "x"}) as reply,
    ):
        assert await reply.json() == {"error": "null not allowed"}


async def test_slow_is_a_timeout(zapi: FakeZApi, session: aiohttp.ClientSession) -> None:
    zapi.slow(5)
    started = time.monotonic()
    outcome = await deliver(za_source(zapi.url), session, timeout_s=0.2, text="oi")
    assert time.monotonic() - started < 2
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "timeout")


async def test_the_instance_token_never_reaches_an_excerpt(session: aiohttp.ClientSession) -> None:
    """aiohttp names the URL in some errors; the URL carries the instance token (§3.1)."""
    client = ZApiClient(
        instance_id=ZA["instance_id"],
        instance_token=ZA["instance_token"],
        client_token=ZA["client_token"],
        session=session,
        timeout_s=1,
        api_base="http://127.0.0.1:99999",  # a port out of range: aiohttp quotes the URL
    )
    outcome = await client.send(OutboundMessage(CUSTOMER, text="oi"))
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error_class == "invalid_destination"
    assert outcome.response_excerpt == "http://127.0.0.1:99999/…"  # where, without the path

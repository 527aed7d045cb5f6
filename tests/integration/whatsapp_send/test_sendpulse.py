"""SendPulse sends against the fake (contracts §9.5–§9.7): the OAuth token's life included."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from estafeta.connectors.whatsapp import OutboundMessage, client_for
from estafeta.delivery.outcome import OutcomeKind
from estafeta.testing.fakes import FakeSendPulse
from tests.integration.whatsapp_send.support import CUSTOMER, SP, deliver, sp_source


async def test_text_yields_the_message_id(
    sendpulse: FakeSendPulse, session: aiohttp.ClientSession
) -> None:
    outcome = await deliver(sp_source(sendpulse.url), session, text="Olá Maria!")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.SUCCESS, 200)
    [sent] = sendpulse.sent
    assert outcome.external_id == sent.message_id
    assert len(sent.message_id) == 24
    assert sent.path == "/whatsapp/contacts/sendByPhone"
    assert sent.headers["authorization"].startswith("Bearer eyJ")
    assert sent.request == {
        "bot_id": SP["bot_id"],
        "phone": "5511987654321",
        "message": {"type": "text", "text": {"body": "Olá Maria!"}},
    }


async def test_template_and_media(sendpulse: FakeSendPulse, session: aiohttp.ClientSession) -> None:
    template = {
        "name": "confirmacao_consulta",
        "language": {"code": "pt_BR"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "Maria"}]}],
    }
    image = {"kind": "image", "url": "https://files.example/a.jpg", "caption": "Olha"}
    assert (await deliver(sp_source(sendpulse.url), session, template=template)).succeeded
    assert (await deliver(sp_source(sendpulse.url), session, media=image)).succeeded
    first, second = sendpulse.sent
    assert first.path == "/whatsapp/contacts/sendTemplateByPhone"
    assert first.request["template"] == template
    assert second.request["message"] == {
        "type": "image",
        "image": {"link": "https://files.example/a.jpg", "caption": "Olha"},
    }


async def test_no_video(sendpulse: FakeSendPulse, session: aiohttp.ClientSession) -> None:
    video = {"kind": "video", "url": "https://files.example/v.mp4"}
    outcome = await deliver(sp_source(sendpulse.url), session, media=video)
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "unsupported_message")
    assert (sendpulse.requests, sendpulse.token_requests) == (0, 0)


async def test_the_token_is_fetched_once_and_refreshed_after_a_401(
    sendpulse: FakeSendPulse, session: aiohttp.ClientSession
) -> None:
    client = client_for(sp_source(sendpulse.url), session, timeout_s=5)
    message = OutboundMessage(CUSTOMER, text="oi")
    for _ in range(3):
        assert (await client.send(message)).succeeded
    assert sendpulse.token_requests == 1

    sendpulse.expire_tokens()  # the hour is over: the next send is answered 401
    outcome = await client.send(message)
    assert outcome.succeeded
    assert sendpulse.token_requests == 2
    assert sendpulse.requests == 5  # the 401, then the retry with the new token
    assert len(sendpulse.sent) == 4


async def test_concurrent_sends_share_one_token(
    sendpulse: FakeSendPulse, session: aiohttp.ClientSession
) -> None:
    client = client_for(sp_source(sendpulse.url), session, timeout_s=5)
    outcomes = await asyncio.gather(
        *(client.send(OutboundMessage(CUSTOMER, text=f"oi {i}")) for i in range(8))
    )
    assert all(outcome.succeeded for outcome in outcomes)
    assert sendpulse.token_requests == 1


async def test_a_second_401_is_permanent(
    sendpulse: FakeSendPulse, session: aiohttp.ClientSession
) -> None:
    sendpulse.fail_next(2, 401, body={"message": "Unauthorized!", "error_code": 401})
    outcome = await deliver(sp_source(sendpulse.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "sendpulse_401")
    assert outcome.response_excerpt.startswith("401 Unauthorized!")
    assert sendpulse.token_requests == 2


async def test_wrong_client_secret(
    sendpulse: FakeSendPulse, session: aiohttp.ClientSession
) -> None:
    config = sp_source(sendpulse.url, client_secret="not-the-secret")
    outcome = await deliver(config, session, text="oi")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.PERMANENT, 401)
    assert outcome.error_class == "sendpulse_invalid_client"
    assert outcome.response_excerpt.startswith("invalid_client Client authentication failed")
    assert sendpulse.requests == 0


async def test_throttling(sendpulse: FakeSendPulse, session: aiohttp.ClientSession) -> None:
    sendpulse.throttle_next(1)
    outcome = await deliver(sp_source(sendpulse.url), session, text="oi")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.RETRYABLE, 429)
    assert outcome.error_class == "sendpulse_2020202020"
    assert outcome.retry_after_s is None  # §9.7: no rate-limit headers


@pytest.mark.parametrize("status", [200, 429])
async def test_the_rate_limit_code_in_an_unsuccessful_answer_is_a_slow_down(
    sendpulse: FakeSendPulse, session: aiohttp.ClientSession, status: int
) -> None:
    """§9.7: SendPulse maps none of its error codes to an HTTP status, and some endpoints
    answer `{"success": false, …}`. Its rate-limit code there asks to slow down (retried,
    no failure of the provider), as on a 429; it is not a refusal of the message."""
    body = {
        "success": False,
        "message": "More than 10 requests per second",
        "error_code": 2020202020,
    }
    sendpulse.fail_next(1, status, body=body)
    outcome = await deliver(sp_source(sendpulse.url), session, text="oi")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.RETRYABLE, status)
    assert outcome.throttled
    assert outcome.error_class == "sendpulse_2020202020"
    assert outcome.response_excerpt.startswith("2020202020 More than 10 requests per second")
    # The next send goes through: only one answer was planned.
    assert (await deliver(sp_source(sendpulse.url), session, text="oi")).succeeded


async def test_server_error(sendpulse: FakeSendPulse, session: aiohttp.ClientSession) -> None:
    sendpulse.fail_next(1, 503)
    outcome = await deliver(sp_source(sendpulse.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "sendpulse_503")


@pytest.mark.parametrize(
    ("reject", "error_class", "head"),
    [
        (422, "sendpulse_422", "422 Rejected by the fake with code 422"),
        ("Contact is not active", "sendpulse_400", "400 Contact is not active"),
    ],
)
async def test_rejected(
    sendpulse: FakeSendPulse,
    session: aiohttp.ClientSession,
    reject: int | str,
    error_class: str,
    head: str,
) -> None:
    sendpulse.reject_next(reject)
    outcome = await deliver(sp_source(sendpulse.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, error_class)
    assert outcome.response_excerpt.startswith(head)


async def test_only_the_bots_active_contacts_get_a_free_form_message(
    session: aiohttp.ClientSession,
) -> None:
    """contracts §9.5: sendByPhone needs a contact active in the bot's audience; a template
    (sendTemplateByPhone) is how the business writes first."""
    async with FakeSendPulse(
        client_id=SP["client_id"],
        client_secret=SP["client_secret"],
        bot_id=SP["bot_id"],
        audience=["5511912345678"],
    ) as sendpulse:
        config = sp_source(sendpulse.url)
        outcome = await deliver(config, session, text="oi")
        assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "sendpulse_400")
        assert outcome.response_excerpt.startswith("400 Contact is not active")
        template = {"name": "lembrete", "language": "pt_BR"}
        assert (await deliver(config, session, template=template)).succeeded
        assert [sent.path for sent in sendpulse.sent] == ["/whatsapp/contacts/sendTemplateByPhone"]


async def test_text_over_the_limit(
    sendpulse: FakeSendPulse, session: aiohttp.ClientSession
) -> None:
    outcome = await deliver(sp_source(sendpulse.url), session, text="x" * 1025)
    assert outcome.kind is OutcomeKind.PERMANENT
    assert "1 to 1024 characters" in outcome.response_excerpt


async def test_slow_is_one_timeout_for_token_and_send(
    sendpulse: FakeSendPulse, session: aiohttp.ClientSession
) -> None:
    sendpulse.slow(5)
    started = time.monotonic()
    outcome = await deliver(sp_source(sendpulse.url), session, timeout_s=0.3, text="oi")
    assert time.monotonic() - started < 2
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "timeout")

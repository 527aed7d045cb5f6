"""Twilio WhatsApp sends against the fake Messages API (contracts §2.4)."""

from __future__ import annotations

import base64
import time

import aiohttp
import orjson
import pytest

from estafeta.delivery.outcome import OutcomeKind
from estafeta.testing.fakes import FakeTwilio
from tests.integration.whatsapp_send.support import TW, deliver, source, tw_source

PUBLIC_URL = "https://hub.example.com.br"


async def test_text_yields_the_sid(twilio: FakeTwilio, session: aiohttp.ClientSession) -> None:
    config = tw_source(twilio.url, public_url=PUBLIC_URL)
    outcome = await deliver(config, session, text="Olá Maria!")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.SUCCESS, 201)
    [sent] = twilio.sent
    assert outcome.external_id == sent.message_id
    assert sent.message_id.startswith("SM") and len(sent.message_id) == 34
    assert sent.path == f"/2010-04-01/Accounts/{TW['account_sid']}/Messages.json"
    credentials = base64.b64encode(f"{TW['account_sid']}:{TW['auth_token']}".encode()).decode()
    assert sent.headers["authorization"] == f"Basic {credentials}"
    assert sent.headers["content-type"] == "application/x-www-form-urlencoded"
    assert sent.request == {
        "To": "whatsapp:+5511987654321",
        "From": "whatsapp:+551140028922",
        "Body": "Olá Maria!",
        # The message's own id rides in the callback, for its statuses to name it.
        "StatusCallback": f"{PUBLIC_URL}/in/tw-sol?sent_message_id=msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F",
    }


async def test_a_rotated_auth_token_sends_with_the_first(
    twilio: FakeTwilio, session: aiohttp.ClientSession
) -> None:
    """While verifying webhooks with both, sends authenticate with the first token only
    (docs/operations.md, "Rotating a secret"): the fake refuses any other."""
    keys = TW | {"auth_token": [TW["auth_token"], "an-old-token-twilio-no-longer-takes"]}
    config = source("twilio", "tw-sol", api_base=twilio.url, **keys)
    outcome = await deliver(config, session, text="Olá Maria!")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.SUCCESS, 201)
    credentials = base64.b64encode(f"{TW['account_sid']}:{TW['auth_token']}".encode()).decode()
    assert twilio.sent[0].headers["authorization"] == f"Basic {credentials}"


async def test_from_without_prefix(twilio: FakeTwilio, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(tw_source(twilio.url, **{"from": "+551140028922"}), session, text="x")
    assert outcome.succeeded
    assert twilio.sent[0].request["From"] == "whatsapp:+551140028922"
    assert "StatusCallback" not in twilio.sent[0].request


async def test_media_and_template(twilio: FakeTwilio, session: aiohttp.ClientSession) -> None:
    media = {"kind": "image", "url": "https://files.example/a.jpg", "caption": "Olha"}
    template = {
        "content_sid": "HXb5b62575e6e4ff6129ad7c8efe1f983e",
        "components": [
            {
                "type": "body",
                "parameters": [{"type": "text", "text": "Maria"}, {"type": "text", "text": "9h"}],
            }
        ],
    }
    assert (await deliver(tw_source(twilio.url), session, media=media)).succeeded
    assert (await deliver(tw_source(twilio.url), session, template=template)).succeeded
    image, content = (sent.request for sent in twilio.sent)
    assert image["MediaUrl"] == "https://files.example/a.jpg"
    assert image["Body"] == "Olha"
    assert content["ContentSid"] == "HXb5b62575e6e4ff6129ad7c8efe1f983e"
    assert orjson.loads(content["ContentVariables"]) == {"1": "Maria", "2": "9h"}
    assert "Body" not in content


async def test_a_cloud_template_is_not_sent(
    twilio: FakeTwilio, session: aiohttp.ClientSession
) -> None:
    template = {"name": "confirmacao", "language": "pt_BR"}
    outcome = await deliver(tw_source(twilio.url), session, template=template)
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "unsupported_message")
    assert twilio.requests == 0


@pytest.mark.parametrize("retry_after", [3.0, None])
async def test_throttling(
    twilio: FakeTwilio, session: aiohttp.ClientSession, retry_after: float | None
) -> None:
    twilio.throttle_next(1, retry_after_s=retry_after)
    outcome = await deliver(tw_source(twilio.url), session, text="oi")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.RETRYABLE, 429)
    assert outcome.error_class == "twilio_20429"
    assert outcome.retry_after_s == retry_after
    assert outcome.response_excerpt.startswith("20429 Too Many Requests")


@pytest.mark.parametrize(("status", "code"), [(500, 20500), (503, 20503)])
async def test_server_errors(
    twilio: FakeTwilio, session: aiohttp.ClientSession, status: int, code: int
) -> None:
    twilio.fail_next(1, status)
    outcome = await deliver(tw_source(twilio.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, f"twilio_{code}")


@pytest.mark.parametrize(
    ("code", "head"),
    [
        (
            63016,
            "63016 Failed to send freeform message because you are outside the allowed window.",
        ),
        (21610, "21610 Attempt to send to unsubscribed recipient"),
        (63112, "63112 The Meta Business Manager account has been disabled"),
        # Not a rate limit: the account's messages of a rolling 24 h window are spent, and
        # Twilio says to wait for the next day or ask for a higher limit (error 63038).
        (63038, "63038 Account exceeded the daily messages limit"),
    ],
)
async def test_permanent_codes(
    twilio: FakeTwilio, session: aiohttp.ClientSession, code: int, head: str
) -> None:
    twilio.reject_next(code)
    outcome = await deliver(tw_source(twilio.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, f"twilio_{code}")
    assert outcome.response_excerpt.startswith(head)
    assert f"https://www.twilio.com/docs/errors/{code}" in outcome.response_excerpt


async def test_channel_rate_limit_is_retryable(
    twilio: FakeTwilio, session: aiohttp.ClientSession
) -> None:
    twilio.reject_next(63018)
    outcome = await deliver(tw_source(twilio.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "twilio_63018")


async def test_wrong_credentials(twilio: FakeTwilio, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(tw_source(twilio.url, auth_token="0" * 32), session, text="oi")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.PERMANENT, 401)
    assert outcome.error_class == "twilio_20003"
    assert outcome.response_excerpt.startswith("20003 Authenticate")


async def test_a_sender_twilio_does_not_know(
    twilio: FakeTwilio, session: aiohttp.ClientSession
) -> None:
    config = tw_source(twilio.url, **{"from": "whatsapp:+15550001111"})
    outcome = await deliver(config, session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "twilio_63007")


async def test_slow_is_a_timeout(twilio: FakeTwilio, session: aiohttp.ClientSession) -> None:
    twilio.slow(5)
    started = time.monotonic()
    outcome = await deliver(tw_source(twilio.url), session, timeout_s=0.2, text="oi")
    assert time.monotonic() - started < 2
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "timeout")


async def test_the_fake_validates_what_a_client_sends(twilio: FakeTwilio) -> None:
    url = f"{twilio.url}/2010-04-01/Accounts/{TW['account_sid']}/Messages.json"
    credentials = base64.b64encode(f"{TW['account_sid']}:{TW['auth_token']}".encode()).decode()
    headers = {"Authorization": f"Basic {credentials}"}
    form = {"From": TW["from"], "Body": "oi"}
    async with (
        aiohttp.ClientSession() as client,
        client.post(url, data=form, headers=headers) as reply,
    ):
        body = await reply.json()
    assert (reply.status, body["code"]) == (400, 21604)
    assert body["message"] == "A 'To' phone number is required."

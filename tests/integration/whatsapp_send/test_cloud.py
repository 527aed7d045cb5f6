"""WhatsApp Cloud API sends against the fake Graph API (contracts §1.6–§1.8)."""

from __future__ import annotations

import socket
import time

import aiohttp
import pytest

from estafeta.delivery.breakers import counts_against
from estafeta.delivery.outcome import OutcomeKind
from estafeta.testing.fakes import FakeMeta
from estafeta.testing.fakes.meta import graph_error
from tests.integration.whatsapp_send.support import CUSTOMER, WA, deliver, wa_source

TEMPLATE = {
    "name": "confirmacao_consulta",
    "language": {"code": "pt_BR", "policy": "deterministic"},
    "components": [{"type": "body", "parameters": [{"type": "text", "text": "Maria"}]}],
}


async def test_text_yields_the_wamid(meta: FakeMeta, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(wa_source(meta.url), session, text="Olá Maria!")
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.status_code == 200
    [sent] = meta.sent
    assert outcome.external_id == sent.message_id
    assert sent.message_id.startswith("wamid.")
    assert sent.path == f"/v25.0/{WA['phone_number_id']}/messages"
    assert sent.headers["authorization"] == f"Bearer {WA['access_token']}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["accept-encoding"] == "identity"  # the shared session never inflates
    assert sent.request == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": CUSTOMER,
        "type": "text",
        "text": {"body": "Olá Maria!"},
        "biz_opaque_callback_data": "msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F",
    }


async def test_template(meta: FakeMeta, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(wa_source(meta.url), session, template=TEMPLATE)
    assert outcome.kind is OutcomeKind.SUCCESS
    [sent] = meta.sent
    assert sent.request["type"] == "template"
    assert sent.request["template"] == TEMPLATE


async def test_media(meta: FakeMeta, session: aiohttp.ClientSession) -> None:
    media = {
        "kind": "document",
        "url": "https://files.example/laudo.pdf",
        "caption": "Seu laudo",
        "filename": "laudo.pdf",
    }
    await deliver(wa_source(meta.url), session, media=media)
    await deliver(wa_source(meta.url), session, media={"kind": "audio", "url": "https://f/a.ogg"})
    assert [sent.request["type"] for sent in meta.sent] == ["document", "audio"]
    assert meta.sent[0].request["document"] == {
        "link": "https://files.example/laudo.pdf",
        "caption": "Seu laudo",
        "filename": "laudo.pdf",
    }
    assert meta.sent[1].request["audio"] == {"link": "https://f/a.ogg"}


async def test_any_graph_version(meta: FakeMeta, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(wa_source(f"{meta.url}/v19.0"), session, text="oi")
    assert outcome.kind is OutcomeKind.SUCCESS
    assert meta.sent[0].path.startswith("/v19.0/")


@pytest.mark.parametrize(
    ("code", "http_status", "retry_after"),
    [
        (130429, 400, None),
        (131056, 400, None),
        (4, 429, 7.0),
        (80007, 429, None),
        # §8 item 1: which status Meta pairs with a throttling code is unsettled.
        (130429, 429, None),
        (131056, 429, 2.0),
        (4, 400, None),
        # Graph's own rate-limit codes (graph-api/overview/rate-limiting), on HTTP 400.
        (613, 400, None),
        (17, 400, None),
    ],
)
async def test_throttling_is_retryable_whatever_the_status(
    meta: FakeMeta,
    session: aiohttp.ClientSession,
    code: int,
    http_status: int,
    retry_after: float | None,
) -> None:
    meta.throttle_next(1, code=code, retry_after_s=retry_after, status=http_status)
    outcome = await deliver(wa_source(meta.url), session, text="oi")
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert outcome.throttled  # a slow-down: no failure of the number's circuit
    assert outcome.status_code == http_status
    assert outcome.error_class == f"whatsapp_cloud_{code}"
    assert outcome.retry_after_s == retry_after
    assert meta.sent == []
    # The next attempt goes through: the throttling was planned for one request only.
    assert (await deliver(wa_source(meta.url), session, text="oi")).succeeded


@pytest.mark.parametrize(("status", "error_class"), [(500, "131000"), (503, "131016")])
async def test_server_errors_are_retryable(
    meta: FakeMeta, session: aiohttp.ClientSession, status: int, error_class: str
) -> None:
    meta.fail_next(1, status)
    outcome = await deliver(wa_source(meta.url), session, text="oi")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.RETRYABLE, status)
    assert outcome.error_class == f"whatsapp_cloud_{error_class}"


async def test_a_gateway_page_is_retryable(meta: FakeMeta, session: aiohttp.ClientSession) -> None:
    meta.fail_next(1, 502, body=b"<html><body>502 Bad Gateway</body></html>")
    outcome = await deliver(wa_source(meta.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "whatsapp_cloud_http_502")


async def test_a_proxys_200_page_is_no_send(meta: FakeMeta, session: aiohttp.ClientSession) -> None:
    """A 200 without the WAMID (§1.6) did not come from Meta: retried, not taken for sent."""
    meta.fail_next(1, 200, body=b"<html><body>Please log in to the proxy</body></html>")
    outcome = await deliver(wa_source(meta.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (
        OutcomeKind.RETRYABLE,
        "whatsapp_cloud_no_message_id",
    )
    assert outcome.external_id is None
    assert "Please log in to the proxy" in outcome.response_excerpt
    assert meta.sent == []


@pytest.mark.parametrize(
    ("code", "head"),
    [
        (131047, "131047 Re-engagement message"),
        (131026, "131026 Message undeliverable"),
        (132015, "132015 Template is paused"),
        (132000, "132000 Number of parameters does not match the expected number of params"),
        (131009, "131009 Parameter value is not valid"),
    ],
)
async def test_permanent_codes(
    meta: FakeMeta, session: aiohttp.ClientSession, code: int, head: str
) -> None:
    meta.reject_next(code)
    outcome = await deliver(wa_source(meta.url), session, text="oi")
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error_class == f"whatsapp_cloud_{code}"
    assert outcome.response_excerpt.splitlines()[0] == head
    assert '"fbtrace_id"' in outcome.response_excerpt  # the provider's body follows


@pytest.mark.parametrize("http_status", [400, 429])
async def test_the_spam_rate_limit_is_permanent_whatever_the_status(
    meta: FakeMeta, session: aiohttp.ClientSession, http_status: int
) -> None:
    """131048 restricts the number for its quality (§1.7: "no, fix quality"): not a
    slow-down to wait out, even when it comes with a 429 as Meta's throttling errors may."""
    meta.throttle_next(1, code=131048, retry_after_s=30.0, status=http_status)
    outcome = await deliver(wa_source(meta.url), session, text="oi")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.PERMANENT, http_status)
    assert (outcome.throttled, outcome.retry_after_s) == (False, None)
    assert outcome.error_class == "whatsapp_cloud_131048"
    assert outcome.response_excerpt.startswith("131048 Spam rate limit hit\n")


@pytest.mark.parametrize(("status", "code"), [(500, 131045), (503, 131026), (502, 190)])
async def test_a_refusal_on_a_server_error_status_is_permanent(
    meta: FakeMeta, session: aiohttp.ClientSession, status: int, code: int
) -> None:
    """§1.7: branch on `code`, never on the status. Meta's table answers 131045 (number not
    registered) with HTTP 500; retried as a 5xx, the delivery spent its attempts for hours
    and each one counted against the number's circuit."""
    meta.fail_next(1, status, body=graph_error(code, "Refused by the fake"))
    outcome = await deliver(wa_source(meta.url), session, text="oi")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.PERMANENT, status)
    assert outcome.error_class == f"whatsapp_cloud_{code}"
    assert counts_against(outcome) is None


async def test_a_graph_error_under_200_is_that_error(
    meta: FakeMeta, session: aiohttp.ClientSession
) -> None:
    """A 200 carrying the Graph error body says what went wrong: read by its code, not
    taken for a page that is not Meta's (retried, a failure of the number)."""
    meta.fail_next(1, 200, body=graph_error(131047))
    outcome = await deliver(wa_source(meta.url), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "whatsapp_cloud_131047")
    assert outcome.response_excerpt.startswith("131047 Re-engagement message\n")


async def test_unknown_template(session: aiohttp.ClientSession) -> None:
    async with FakeMeta(
        access_token=WA["access_token"],
        phone_number_id=WA["phone_number_id"],
        app_secret=WA["app_secret"],
        templates={"lembrete"},
    ) as fake:
        outcome = await deliver(wa_source(fake.url), session, template=TEMPLATE)
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.response_excerpt.startswith(
        "132001 Template name does not exist in the translation\n"
    )


async def test_wrong_token(meta: FakeMeta, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(wa_source(meta.url, access_token="EAAG-revoked"), session, text="oi")
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.PERMANENT, 401)
    assert outcome.error_class == "whatsapp_cloud_190"
    assert outcome.response_excerpt.startswith(
        "190 Invalid OAuth access token - Cannot parse access token"
    )


async def test_wrong_phone_number_id(meta: FakeMeta, session: aiohttp.ClientSession) -> None:
    outcome = await deliver(wa_source(meta.url, phone_number_id="999"), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "whatsapp_cloud_100")
    assert "Object with ID '999' does not exist" in outcome.response_excerpt


async def test_slow_is_a_timeout(meta: FakeMeta, session: aiohttp.ClientSession) -> None:
    meta.slow(5)
    started = time.monotonic()
    outcome = await deliver(wa_source(meta.url), session, timeout_s=0.2, text="oi")
    assert time.monotonic() - started < 2
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "timeout")
    assert outcome.status_code is None


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = await deliver(wa_source(f"http://127.0.0.1:{port}"), session, text="oi")
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "connection_refused")


async def test_the_fake_validates_what_a_client_sends(meta: FakeMeta) -> None:
    """The fake answers a malformed send with the documented 131008, as Meta would."""
    url = f"{meta.url}/v25.0/{WA['phone_number_id']}/messages"
    headers = {"Authorization": f"Bearer {WA['access_token']}"}
    async with (
        aiohttp.ClientSession() as client,
        client.post(url, json={"messaging_product": "whatsapp"}, headers=headers) as reply,
    ):
        body = await reply.json()
    assert reply.status == 400
    assert body["error"]["code"] == 131008
    assert body["error"]["error_data"]["details"] == "The parameter to is required."
    assert meta.sent == []


async def test_a_send_whose_answer_is_lost_reaches_the_customer_twice(
    meta: FakeMeta, session: aiohttp.ClientSession
) -> None:
    """What docs/guarantees.md says of WhatsApp sends: Meta accepted the message but its
    answer came after the attempt's timeout, so the retry sends it again. The Cloud API (as
    Twilio's, Z-API's and SendPulse's send endpoints, contracts §1.6, §2.4, §3.5, §9.5)
    takes no idempotency key: nothing lets the provider recognise the repeat."""
    config = wa_source(meta.url)
    meta.answer_late(5)
    lost = await deliver(config, session, timeout_s=0.3, text="Sua consulta é amanhã.")
    assert (lost.kind, lost.error_class) == (OutcomeKind.RETRYABLE, "timeout")
    assert len(meta.sent) == 1  # Meta took it; its answer never arrived
    meta.answer_late(0)
    retried = await deliver(config, session, text="Sua consulta é amanhã.")
    assert retried.kind is OutcomeKind.SUCCESS
    assert [sent.request["text"] for sent in meta.sent] == [{"body": "Sua consulta é amanhã."}] * 2
    # Both copies carry our message id, echoed in their status webhooks (§1.5).
    assert {sent.request["biz_opaque_callback_data"] for sent in meta.sent} == {
        "msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F"
    }

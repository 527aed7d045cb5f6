"""The fakes' status webhooks pass the hub's own inbound verification and parsing.

A message is sent through the fake (so the fake knows its recipient), the fake posts the
status webhook for the id it issued — twice, as providers re-deliver — to a stand-in for
the hub, and each request as it arrived is handed to `source_for(config)`: `verify()` must
accept it and `parse()` must give one `message.status` naming the id the send's outcome
carried as `external_id`, with the same idempotency key both times.
"""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from estafeta.config import SourceConfig
from estafeta.errors import HttpError
from estafeta.ingress.providers import InboundRequest, ParsedEvent, source_for
from estafeta.testing.fakes import FakeMeta, FakeProvider, FakeSendPulse, FakeTwilio, FakeZApi
from estafeta.testing.sink import Sink
from tests.integration.whatsapp_send.support import (
    WEBHOOK_TOKEN,
    deliver,
    sp_source,
    tw_source,
    wa_source,
    za_source,
)


def arrived(hub: Sink) -> list[InboundRequest]:
    """Every request the hub received, as its ingress endpoint would hand it over."""
    return [
        InboundRequest.build("POST", hub.url + received.path, received.headers, received.body)
        for received in hub.received
    ]


def ingest(config: SourceConfig, hub: Sink) -> list[ParsedEvent]:
    """verify() then parse() every request, as the ingress does."""
    provider = source_for(config)
    events: list[ParsedEvent] = []
    for request in arrived(hub):
        provider.verify(request)
        events.extend(provider.parse(request))
    return events


def check_pair(events: list[ParsedEvent], message_id: str | None, status: str) -> ParsedEvent:
    """Two identical `message.status` events (a duplicate webhook) for `message_id`."""
    assert message_id is not None
    assert [event.type for event in events] == ["message.status"] * 2
    first, second = events
    assert first.idempotency_key == second.idempotency_key
    assert first.data["message_id"] == message_id
    assert first.data["status"] == status
    assert first.data["recipient"] == "+5511987654321"
    return first


async def sent_id(config: SourceConfig, session: aiohttp.ClientSession) -> str:
    """Send a text to Maria through the fake behind `config`: the id its statuses name."""
    outcome = await deliver(config, session, text="Olá Maria!")
    assert outcome.external_id is not None
    return outcome.external_id


async def status_posted_twice(
    fake: FakeProvider,
    config: SourceConfig,
    hub: Sink,
    session: aiohttp.ClientSession,
    status: str,
    normalized: str,
) -> ParsedEvent:
    """A message sent through `fake`, whose `status` webhook it posts twice to the hub's
    /in/<source>: the one status both requests give, `normalized` (`check_pair`)."""
    message_id = await sent_id(config, session)
    url = f"{hub.url}/in/{config.id}"
    assert await fake.send_status(url, message_id, status, duplicate=True) == [200, 200]
    return check_pair(ingest(config, hub), message_id, normalized)


@pytest.mark.parametrize(
    ("status", "normalized"),
    [("sent", "sent"), ("delivered", "delivered"), ("read", "read"), ("failed", "failed")],
)
async def test_cloud(
    meta: FakeMeta,
    hub: Sink,
    session: aiohttp.ClientSession,
    status: str,
    normalized: str,
) -> None:
    event = await status_posted_twice(meta, wa_source(meta.url), hub, session, status, normalized)
    assert event.data["provider"] == "whatsapp_cloud"
    assert event.data["phone_number_id"] == meta.phone_number_id
    # Our message id went out as biz_opaque_callback_data and comes back with the status.
    assert event.data["biz_opaque_callback_data"] == "msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F"
    if normalized == "failed":
        assert event.data["error"]["code"] == 131026


async def test_cloud_statuses_are_those_of_the_message_sent(
    meta: FakeMeta, hub: Sink, session: aiohttp.ClientSession
) -> None:
    """contracts §1.5 (fixtures status_sent.json, status_failed.json): a free-form text is
    free service, a template is billed; a failure carries the code Meta reports, e.g. 131047
    for a free-form message outside the 24 h window, with `error_data` holding `details`."""
    config = wa_source(meta.url)
    text = await deliver(config, session, text="Olá Maria!")
    template = await deliver(config, session, template={"name": "lembrete", "language": "pt_BR"})
    assert text.external_id is not None and template.external_id is not None
    url = f"{hub.url}/in/wa-sol"
    await meta.send_status(url, text.external_id, "sent")
    await meta.send_status(url, template.external_id, "sent")
    meta.failed_code = 131047
    await meta.send_status(url, text.external_id, "failed")
    free, billed, failed = ingest(config, hub)
    assert free.data["pricing"] == {
        "billable": False,
        "pricing_model": "PMP",
        "category": "service",
        "type": "free_customer_service",
    }
    assert (billed.data["pricing"]["billable"], billed.data["pricing"]["type"]) == (True, "regular")
    assert failed.data["error"]["code"] == 131047
    assert failed.data["error"]["title"] == "Re-engagement message"
    [sent_error] = orjson.loads(hub.received[-1].body)["entry"][0]["changes"][0]["value"][
        "statuses"
    ][0]["errors"]
    assert set(sent_error["error_data"]) == {"details"}


async def test_cloud_signature_is_really_checked(meta: FakeMeta, hub: Sink) -> None:
    await meta.send_status(f"{hub.url}/in/wa-sol", "wamid.X", "read")
    [request] = arrived(hub)
    with pytest.raises(HttpError) as caught:
        source_for(wa_source(meta.url, app_secret="another-app-secret")).verify(request)
    assert caught.value.status == 401


@pytest.mark.parametrize(
    ("status", "normalized"),
    [
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("read", "read"),
        ("failed", "failed"),
        ("undelivered", "failed"),
    ],
)
async def test_twilio(
    twilio: FakeTwilio,
    hub: Sink,
    session: aiohttp.ClientSession,
    status: str,
    normalized: str,
) -> None:
    config = tw_source(twilio.url)
    event = await status_posted_twice(twilio, config, hub, session, status, normalized)
    assert (event.data["provider"], event.data["channel"]) == ("twilio", "whatsapp")
    assert event.data["provider_status"] == status
    if normalized == "failed":
        assert event.data["error"]["code"] == 63016
    # The duplicate is the same delivery retried: Twilio's idempotency token is the same.
    tokens = {received.headers["i-twilio-idempotency-token"] for received in hub.received}
    assert len(tokens) == 1


async def test_twilio_calls_back_the_status_callback_the_send_asked_for(
    twilio: FakeTwilio, hub: Sink, session: aiohttp.ClientSession
) -> None:
    """contracts §2.3: Twilio posts (and signs) the send's `StatusCallback`; behind a proxy
    (`public_url`) the request reaches the hub at another URL, and must still verify."""
    config = tw_source(twilio.url, public_url="https://hooks.example.com")
    message_id = await sent_id(config, session)
    [sent] = twilio.sent
    assert sent.request["StatusCallback"] == (
        "https://hooks.example.com/in/tw-sol?sent_message_id=msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F"
    )
    url = f"{hub.url}/in/tw-sol"  # where the proxy hands the request over
    assert await twilio.send_status(url, message_id, "delivered") == [200]
    [event] = ingest(config, hub)
    assert (event.data["message_id"], event.data["status"]) == (message_id, "delivered")
    # Signed for the callback URL, not for the address the hub happens to be reached at.
    with pytest.raises(HttpError):
        source_for(tw_source(twilio.url)).verify(arrived(hub)[0])


async def test_a_twilio_status_names_the_message_the_hub_sent(
    twilio: FakeTwilio, hub: Sink, session: aiohttp.ClientSession
) -> None:
    """A WhatsApp Cloud status carries the sent message's `msg_…` id (Meta echoes it); a
    Twilio status carried only Twilio's SID, so a consumer could not tie it to the message it
    had sent. Twilio calls back, and signs, the StatusCallback the send gave, query and all."""
    config = tw_source(twilio.url, public_url="https://hooks.example.com")
    sid = await sent_id(config, session)
    url = f"{hub.url}/in/tw-sol"
    assert await twilio.send_status(url, sid, "delivered") == [200]
    [ours] = ingest(config, hub)
    assert ours.data["message_id"] == sid
    assert ours.data["sent_message_id"] == "msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F"
    # A message sent from elsewhere (Twilio's console): called back at the console's URL.
    hub.received.clear()
    assert await twilio.send_status(url, "SM" + "0" * 32, "read") == [200]
    [other] = ingest(tw_source(twilio.url), hub)
    assert "sent_message_id" not in other.data


def test_twilio_sends_no_callback_for_queued(twilio: FakeTwilio) -> None:
    with pytest.raises(ValueError, match="not 'queued'"):
        twilio.status_webhook("http://127.0.0.1:1/in/tw-sol", "SM" + "0" * 32, "queued")


async def test_twilio_signature_covers_the_url(twilio: FakeTwilio, hub: Sink) -> None:
    await twilio.send_status(f"{hub.url}/in/tw-sol", "SM" + "0" * 32, "delivered")
    [request] = arrived(hub)
    moved = InboundRequest.build(
        "POST", request.url.replace("/in/tw-sol", "/in/other"), request.headers, request.body
    )
    with pytest.raises(HttpError):
        source_for(tw_source(twilio.url)).verify(moved)


@pytest.mark.parametrize(
    ("status", "normalized"),
    [
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("RECEIVED", "delivered"),
        ("read", "read"),
        ("played", "read"),
        ("failed", "failed"),
    ],
)
async def test_zapi(
    zapi: FakeZApi,
    hub: Sink,
    session: aiohttp.ClientSession,
    status: str,
    normalized: str,
) -> None:
    event = await status_posted_twice(zapi, za_source(zapi.url), hub, session, status, normalized)
    assert all(r.path == f"/in/za-sol?token={WEBHOOK_TOKEN}" for r in hub.received)
    assert event.data["provider"] == "zapi"
    assert event.data["instance_id"] == zapi.instance_id


async def test_zapi_read_by_me_is_no_status_of_ours(
    zapi: FakeZApi, hub: Sink, session: aiohttp.ClientSession
) -> None:
    """contracts §3.4: READ_BY_ME (the business read the customer's message) is taken, and
    says nothing about the message the hub sent."""
    config = za_source(zapi.url)
    message_id = await sent_id(config, session)
    assert await zapi.send_status(f"{hub.url}/in/za-sol", message_id, "READ_BY_ME") == [200]
    assert ingest(config, hub) == []


async def test_zapi_without_the_token_is_refused(zapi: FakeZApi, hub: Sink) -> None:
    zapi.webhook_token = None
    await zapi.send_status(f"{hub.url}/in/za-sol", "3EB0F1A9C2D47E8B6A15", "read")
    [request] = arrived(hub)
    with pytest.raises(HttpError) as caught:
        source_for(za_source(zapi.url)).verify(request)
    assert caught.value.status == 401


async def test_sendpulse_has_no_status_webhook(
    sendpulse: FakeSendPulse, hub: Sink, session: aiohttp.ClientSession
) -> None:
    """contracts §9.1/§9.10 item 5: the only event about our message is outgoing_message,
    which the hub verifies (the URL's token) and, rightly, does not take as a status or as
    customer input."""
    config = sp_source(sendpulse.url)
    message_id = await sent_id(config, session)
    url = f"{hub.url}/in/sp-sol"
    assert await sendpulse.send_status(url, message_id, "sent", duplicate=True) == [200, 200]
    assert ingest(config, hub) == []
    with pytest.raises(ValueError, match="no status webhooks"):
        sendpulse.status_webhook(url, message_id, "delivered")

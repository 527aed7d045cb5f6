"""`WhatsAppSendConnector` (payload → message → client) and `client_for` (config → client)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from estafeta.config import SourceConfig
from estafeta.connectors.base import Connector
from estafeta.connectors.whatsapp import (
    CloudClient,
    OutboundMessage,
    SendPulseClient,
    TwilioClient,
    WhatsAppSendConnector,
    ZApiClient,
    client_for,
)
from estafeta.delivery.outcome import Outcome, OutcomeKind
from tests.conftest import leased_delivery


class Recorder:
    """A ProviderClient that records what it is asked to send."""

    def __init__(self) -> None:
        self.messages: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> Outcome:
        self.messages.append(message)
        return Outcome(OutcomeKind.SUCCESS, 1.0, 200, external_id="wamid.X")


def event(data: Any, type_: str = "message.send") -> bytes:
    return orjson.dumps({"id": "evt_1", "type": type_, "tenant": "clinica-sol", "data": data})


DATA = {"source": "wa-sol", "to": "+5511987654321", "text": "Olá!", "message_id": "msg_1"}


async def test_a_valid_event_is_sent() -> None:
    client = Recorder()
    connector: Connector = WhatsAppSendConnector(client, source_id="wa-sol")
    outcome = await connector.deliver(leased_delivery(event(DATA), destination_id="wa-send"))
    assert outcome.external_id == "wamid.X"
    assert client.messages == [
        OutboundMessage("+5511987654321", text="Olá!", reference="msg_1", source="wa-sol")
    ]
    await connector.close()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "the payload is not JSON"),
        (b"[1]", "expected a 'message.send' event, got type None"),
        (event(DATA, "message.received"), "got type 'message.received'"),
        (event([DATA]), "the event's data must be an object"),
        (event({**DATA, "to": "11987654321"}), "to: must be an E.164"),
        (event({**DATA, "media": {"kind": "image", "url": "https://x/a"}}), "exactly one"),
        (event({**DATA, "source": "tw-sol"}), "data.source is 'tw-sol'"),
    ],
)
async def test_a_payload_that_cannot_be_sent_is_permanent(payload: bytes, reason: str) -> None:
    client = Recorder()
    outcome = await WhatsAppSendConnector(client, source_id="wa-sol").deliver(
        leased_delivery(payload, destination_id="wa-send")
    )
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error_class == "invalid_message"
    assert reason in outcome.response_excerpt
    assert client.messages == []


@given(st.binary(max_size=200) | st.builds(event, st.dictionaries(st.text(), st.text())))
def test_parse_never_raises(payload: bytes) -> None:
    parsed = WhatsAppSendConnector(Recorder()).parse(payload)
    assert isinstance(parsed, OutboundMessage | Outcome)


def source(kind: str, **keys: str) -> SourceConfig:
    return SourceConfig.model_validate({"id": "src", "tenant": "t", "kind": kind, **keys})


SOURCES: list[tuple[SourceConfig, type[Any]]] = [
    (
        source("whatsapp_cloud", app_secret="s", access_token="EAAG", phone_number_id="1149"),
        CloudClient,
    ),
    (
        source("twilio", auth_token="a", account_sid="AC1", **{"from": "whatsapp:+5511"}),
        TwilioClient,
    ),
    (
        source("zapi", token="t", instance_id="I", instance_token="T", client_token="C"),
        ZApiClient,
    ),
    (
        source("sendpulse", token="t", client_id="id", client_secret="sec", bot_id="66a1"),
        SendPulseClient,
    ),
]


@pytest.mark.parametrize(("config", "cls"), SOURCES)
async def test_client_for_each_kind(config: SourceConfig, cls: type[Any]) -> None:
    async with aiohttp.ClientSession() as session:
        assert isinstance(client_for(config, session, timeout_s=5), cls)


@pytest.mark.parametrize(
    ("config", "missing"),
    [
        # Receive-only sources: one with part of its outbound keys is refused at load.
        (source("whatsapp_cloud", app_secret="s"), "missing access_token, phone_number_id"),
        (source("twilio", auth_token="a"), "missing account_sid, from"),
        (source("zapi", token="t"), "missing instance_id, instance_token, client_token"),
        (source("sendpulse", token="t"), "missing client_id, client_secret, bot_id"),
        (source("generic", api_key="k"), "cannot send"),
    ],
)
async def test_client_for_names_the_missing_keys(config: SourceConfig, missing: str) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError) as caught:
            client_for(config, session, timeout_s=5)
    assert missing in str(caught.value)


async def test_client_for_rejects_a_timeout_that_is_not_positive() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError):
            client_for(SOURCES[0][0], session, timeout_s=0)

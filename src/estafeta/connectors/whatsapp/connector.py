"""The `whatsapp_send` destination: a `message.send` event in, one provider send out.

`client_for` builds the provider client of a configured source from its outbound keys
(DESIGN §3.2, "sends outbound with"); `WhatsAppSendConnector` implements
`connectors.base.Connector` on top of one client. The delivery's payload is the canonical
event (DESIGN §3.4) of type `message.send`, whose `data` holds `{"source", "to",
"text" | "template" | "media", "message_id"}`; one that does not parse into an
`OutboundMessage` can never be sent, so it is a PERMANENT `invalid_message` outcome and goes
to the dead-letter queue with the reason.
"""

from __future__ import annotations

import aiohttp
import orjson

from estafeta.config import SourceConfig
from estafeta.config.models import SOURCE_KEYS
from estafeta.connectors.whatsapp import cloud, sendpulse, twilio, zapi
from estafeta.connectors.whatsapp.base import ProviderClient
from estafeta.connectors.whatsapp.cloud import CloudClient
from estafeta.connectors.whatsapp.message import OutboundMessage
from estafeta.connectors.whatsapp.sendpulse import SendPulseClient
from estafeta.connectors.whatsapp.twilio import TwilioClient
from estafeta.connectors.whatsapp.zapi import ZApiClient
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import EXCERPT_LIMIT, Outcome, OutcomeKind
from estafeta.messaging.facts import SEND_TYPE

#: The outbound keys of each source kind that can send (DESIGN §3.2), by their TOML names.
OUTBOUND_KEYS: dict[str, tuple[str, ...]] = {
    kind: keys.sends_with for kind, keys in SOURCE_KEYS.items() if keys.sends_with
}


def client_for(
    source: SourceConfig, session: aiohttp.ClientSession, *, timeout_s: float
) -> ProviderClient:
    """The client that sends through `source`; ValueError if it lacks its outbound keys.

    A Twilio source with a `public_url` asks Twilio for status callbacks at
    `{public_url}/in/{source.id}`, the URL its signatures are checked against.
    """
    needed = OUTBOUND_KEYS.get(source.kind)
    if needed is None:
        raise ValueError(f"source {source.id!r} is of kind {source.kind!r}, which cannot send")
    values = {key: source.value_of(key) for key in needed}
    missing = [key for key, value in values.items() if not value]
    if missing:
        raise ValueError(
            f"source {source.id!r} ({source.kind}) cannot send: missing {', '.join(missing)}"
        )
    if source.kind == "whatsapp_cloud":
        return CloudClient(
            access_token=values["access_token"],
            phone_number_id=values["phone_number_id"],
            session=session,
            timeout_s=timeout_s,
            api_base=source.api_base,
        )
    if source.kind == "twilio":
        callback = f"{source.public_url.rstrip('/')}/in/{source.id}" if source.public_url else None
        return TwilioClient(
            account_sid=values["account_sid"],
            auth_token=values["auth_token"],
            sender=values["from"],
            session=session,
            timeout_s=timeout_s,
            api_base=source.api_base,
            status_callback=callback,
        )
    if source.kind == "zapi":
        return ZApiClient(
            instance_id=values["instance_id"],
            instance_token=values["instance_token"],
            client_token=values["client_token"],
            session=session,
            timeout_s=timeout_s,
            api_base=source.api_base,
        )
    return SendPulseClient(
        client_id=values["client_id"],
        client_secret=values["client_secret"],
        bot_id=values["bot_id"],
        session=session,
        timeout_s=timeout_s,
        api_base=source.api_base,
    )


def refusal(source: SourceConfig, message: OutboundMessage) -> str | None:
    """Why `source`'s provider can never send `message` (the reason its client would give,
    without a request), or None when it can. Pure: the API asks it before queueing."""
    reason: str | None = None
    if source.kind == "whatsapp_cloud":
        reason = None if cloud.build_payload(message) is not None else cloud.TEMPLATE_WITHOUT_NAME
    elif source.kind == "twilio":
        form = twilio.build_form(message, source.from_ or "")
        reason = form if isinstance(form, str) else None
    elif source.kind == "zapi":
        request = zapi.build_request(message)
        reason = request if isinstance(request, str) else None
    elif source.kind == "sendpulse":
        request = sendpulse.build_request(message, source.bot_id or "")
        reason = request if isinstance(request, str) else None
        if message.text is not None and len(message.text) > sendpulse.MAX_TEXT:
            reason = f"a text is at most {sendpulse.MAX_TEXT} characters, not {len(message.text)}"
        if message.media is not None and not str(message.media["url"]).startswith("https://"):
            reason = reason or "media links must be HTTPS URLs"
    return reason


def invalid_message(reason: str) -> Outcome:
    """A payload that can never be sent: PERMANENT, with the reason for the operator."""
    return Outcome(
        kind=OutcomeKind.PERMANENT,
        duration_ms=0.0,
        error_class="invalid_message",
        response_excerpt=reason[:EXCERPT_LIMIT],
    )


class WhatsAppSendConnector:
    """Sends `message.send` events through one provider client (`Connector` protocol).

    With `source_id`, an event whose `data.source` names another source is refused
    (`invalid_message`) rather than sent from the wrong business number.
    """

    def __init__(self, client: ProviderClient, *, source_id: str | None = None) -> None:
        self._client = client
        self._source_id = source_id

    def parse(self, payload: bytes) -> OutboundMessage | Outcome:
        """The message a delivery's payload asks for, or the `invalid_message` outcome."""
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            return invalid_message(f"the payload is not JSON: {exc}")
        if not isinstance(event, dict) or event.get("type") != SEND_TYPE:
            kind = event.get("type") if isinstance(event, dict) else None
            return invalid_message(f"expected a {SEND_TYPE!r} event, got type {kind!r}")
        data = event.get("data")
        if not isinstance(data, dict):
            return invalid_message("the event's data must be an object")
        try:
            message = OutboundMessage.from_data(data)
        except ValueError as exc:
            return invalid_message(str(exc))
        if self._source_id is not None and message.source not in (None, self._source_id):
            return invalid_message(
                f"data.source is {message.source!r}, but this destination sends through "
                f"{self._source_id!r}"
            )
        return message

    async def deliver(self, delivery: LeasedDelivery) -> Outcome:
        """One send; never raises for the provider, the network or a bad payload."""
        message = self.parse(delivery.payload)
        if isinstance(message, Outcome):
            return message
        return await self._client.send(message)

    async def close(self) -> None:
        """Nothing to release: the shared session belongs to whoever created it."""

"""SendPulse chatbots, WhatsApp channel: token check and normalization.

* DESIGN §3.2, contracts §9.2: SendPulse documents no signature, so the webhook URL carries
  `?token=<the source's token>`, compared in constant time.
* contracts §9.3: the body is a JSON array of events (a bare object is accepted too, as
  §9.3 recommends), each handled on its own.
* contracts §9.4: `incoming_message` → `message.received`. Its content is
  `info.message.channel_data.message`, Meta's Cloud API message passed through, so it is
  read with the WhatsApp Cloud reader; `contact.id` (what SendPulse sends replies to, §9.5)
  and `bot.id` are kept in `data`. `to`, the business's number, is the bot's
  `channel_data.phone` (§9.8, the Bot schema), else its `external_id` (§9.4).
* contracts §9.9: the key is `{bot.id}:{info.message.id}`; without a message id, a hash of
  (bot.id, contact.id, title, date).

Decisions: `outgoing_message` is the bot's or an operator's own message (§9.1, §9.4: never
customer input, or it loops): no event; so are the other titles (`new_subscriber`,
`open_chat` …, §9.1: ignore unknown titles, never fail on them). The Content-Type is not
checked, since SendPulse's is UNCONFIRMED (§9.3): the body has to be JSON, whatever it says.
`date` is Unix ms (§9.4); a value too small to be ms is read as seconds. An event without a
typed `channel_data.message` is kind `unsupported` with `contact.last_message` as its text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from estafeta.errors import HttpError
from estafeta.ingress.generic import ParsedEvent
from estafeta.ingress.providers.base import (
    InboundRequest,
    TokenInUrlSource,
    bounded_key,
    digest_key,
    dumps,
    e164,
    load_json,
    milliseconds,
    nonempty,
    obj,
    phone_digits,
    seconds_to_ms,
)
from estafeta.ingress.providers.whatsapp_cloud import message_content

PROVIDER = "sendpulse"
_SECONDS_BELOW = 10**11  # as ms, 1973: no SendPulse webhook is that old


class SendPulseSource(TokenInUrlSource):
    """A `kind = "sendpulse"` source: `token`, carried in the webhook URL (DESIGN §3.2)."""

    kind: str = PROVIDER

    def parse(self, request: InboundRequest) -> list[ParsedEvent]:
        """contracts §9.3/§9.4: every `incoming_message` of the array."""
        document = load_json(request, check_type=False)
        if isinstance(document, dict):
            document = [document]
        if not isinstance(document, list):
            raise HttpError(
                400,
                "invalid_body",
                "expected a SendPulse webhook: a JSON array of event objects",
            )
        return [
            _incoming(item)
            for item in document
            if isinstance(item, dict) and item.get("title") == "incoming_message"
        ]


def _incoming(item: Mapping[str, Any]) -> ParsedEvent:
    raw = dumps(item)
    bot = obj(item.get("bot"))
    contact = obj(item.get("contact"))
    stored = obj(obj(item.get("info")).get("message"))
    message = obj(obj(stored.get("channel_data")).get("message"))
    message_id = nonempty(stored.get("id"))
    bot_id = nonempty(bot.get("id"))
    contact_id = nonempty(contact.get("id"))
    phone = contact.get("phone")
    data: dict[str, Any] = {
        "channel": nonempty(item.get("service")) or "whatsapp",
        "provider": PROVIDER,
        "message_id": message_id,
        "conversation_id": phone_digits(phone) or contact_id,
        "from": e164(phone),
        "to": _business_number(bot),
        "contact_name": nonempty(contact.get("name")),
        "contact_id": contact_id,
        "bot_id": bot_id,
        **message_content(message),
    }
    if nonempty(message.get("type")) is None:
        # contracts §9.4: that SendPulse passes Meta's message through is an UNCONFIRMED
        # inference; receivers read the words from `contact.last_message`. Without a typed
        # message the kind stays unknown, but the customer's text is not lost.
        data["text"] = nonempty(contact.get("last_message"))
    wamid = nonempty(message.get("id"))
    if wamid is not None:
        data["wamid"] = wamid
    replied_to = nonempty(obj(message.get("context")).get("id"))
    if replied_to is not None:
        data["context"] = {"message_id": replied_to, "from": None}
    if message_id is not None:
        key = bounded_key(f"{bot_id}:{message_id}")
    else:
        key = digest_key(PROVIDER, bot_id, contact_id, item.get("title"), item.get("date"))
    return ParsedEvent(
        type="message.received",
        data=data,
        idempotency_key=key,
        occurred_at=_occurred_at(item.get("date")),
        raw=raw,
    )


def _business_number(bot: Mapping[str, Any]) -> str | None:
    """Which of the business's numbers got the message: the bot's WhatsApp number,
    `channel_data.phone` (contracts §9.8, an integer in the Bot schema), else its
    `external_id` (§9.4, the bot's id on the channel side: the number in the examples)."""
    return e164(obj(bot.get("channel_data")).get("phone")) or e164(bot.get("external_id"))


def _occurred_at(value: object) -> int | None:
    ms = milliseconds(value)
    if ms is not None and ms < _SECONDS_BELOW:
        return seconds_to_ms(ms)
    return ms

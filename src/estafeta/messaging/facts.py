"""What a WhatsApp event says about conversations and messages: pure, from its type and data.

* `message.received` touches the customer's conversation (one more inbound message) and is
  itself a provider message (its id: `data.message_id`);
* `message.status` is about one of our sent messages (`data.message_id` names it), and
  touches no counter;
* `message.send` (queued through POST /api/v1/messages) touches the conversation with one
  more outbound message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SEND_TYPE = "message.send"
ESCALATED_TYPE = "conversation.escalated"
SEND_DESTINATION_PREFIX = "send:"  # deliveries of sends go to "send:<source id>"

# Status ranks: a later webhook never moves a message back (they can arrive out of order).
STATUS_RANK = {"queued": 0, "sent": 1, "delivered": 2, "read": 3, "failed": 4}


def send_destination(source_id: str) -> str:
    """The destination id of messages sent through a provider source."""
    return f"{SEND_DESTINATION_PREFIX}{source_id}"


def digits(number: str) -> str:
    """`+55 11 98765-4321` → `5511987654321`: how conversations are keyed."""
    return re.sub(r"\D", "", number)


@dataclass(frozen=True, slots=True)
class Facts:
    conversation_id: str | None = None
    message_ref: str | None = None  # the provider's message id the event is or is about
    direction: str | None = None  # "inbound" | "outbound": which counter it adds to
    contact_name: str | None = None


def _text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None


def facts_of(event_type: str, data: Mapping[str, Any]) -> Facts:
    """The conversation and message facts of an event (empty for other event types)."""
    if event_type == "message.received":
        return Facts(
            conversation_id=_text(data, "conversation_id"),
            message_ref=_text(data, "message_id"),
            direction="inbound",
            contact_name=_text(data, "contact_name"),
        )
    if event_type == "message.status":
        return Facts(
            conversation_id=_text(data, "conversation_id"), message_ref=_text(data, "message_id")
        )
    if event_type == ESCALATED_TYPE:
        return Facts(conversation_id=_text(data, "conversation_id"))
    if event_type == SEND_TYPE:
        to = _text(data, "to")
        return Facts(conversation_id=digits(to) if to else None, direction="outbound")
    return Facts()


def current_status(queued_state: str, provider_statuses: list[str]) -> str:
    """A sent message's state: the furthest of what sending knows and what the provider said."""
    states = [queued_state, *provider_statuses]
    return max(states, key=lambda s: STATUS_RANK.get(s, -1))

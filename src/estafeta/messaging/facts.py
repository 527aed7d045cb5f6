"""What a WhatsApp event says about conversations and messages: pure, from its type and data.

* `message.received` touches the customer's conversation (one more inbound message) and is
  itself a provider message (its id: `data.message_id`) — unless it is a reaction
  (`data.kind` `reaction`) or an edit (`data.edited`) of an earlier message: no new message,
  so it counts nothing, moves no conversation to the top of the list and reopens none;
* `message.status` is about one of our sent messages (`data.message_id` names it), and
  touches no counter;
* `message.send` (queued through POST /api/v1/messages) touches the conversation with one
  more outbound message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from estafeta.record import Record

SEND_TYPE = "message.send"
ESCALATED_TYPE = "conversation.escalated"
SEND_DESTINATION_PREFIX = "send:"  # deliveries of sends go to "send:<source id>"
# The query parameter of a Twilio StatusCallback naming the message sent (`msg_…`).
SENT_MESSAGE_PARAM = "sent_message_id"

# Status ranks: a later webhook never moves a message back (they can arrive out of order).
STATUS_RANK = {"queued": 0, "sent": 1, "delivered": 2, "read": 3, "played": 4, "failed": 5}


def send_destination(source_id: str) -> str:
    """The destination id of messages sent through a provider source."""
    return f"{SEND_DESTINATION_PREFIX}{source_id}"


def digits(number: str) -> str:
    """`+55 11 98765-4321` → `5511987654321`: how conversations are keyed."""
    return re.sub(r"\D", "", number)


class Facts(Record, frozen=True):
    conversation_id: str | None = None
    message_ref: str | None = None  # the provider's message id the event is or is about
    direction: str | None = None  # "inbound" | "outbound": which counter it adds to
    contact_name: str | None = None


# The columns these facts are stored in (store/schema.py): events.conversation_id and
# conversations.id, events.message_ref.
CONVERSATION_ID_MAX = 64
MESSAGE_REF_MAX = 255


def storable(value: str) -> str:
    """`value` with U+0000, which PostgreSQL text cannot hold, as U+FFFD: a key keeps one
    form on both engines, and a stray NUL in a provider's id cannot fail the insert."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def fitted(value: str, limit: int) -> str:
    """`value` as it can be stored, or when it is longer than its column, a digest of it that
    fits: a provider's oversized id still names one conversation or message (the same id, the
    same digest) instead of failing the webhook's insert."""
    if len(value) <= limit:
        return storable(value)
    return ("sha256:" + hashlib.sha256(value.encode()).hexdigest())[:limit]


def _text(data: Mapping[str, Any], key: str, limit: int) -> str | None:
    value = data.get(key)
    return fitted(value, limit) if isinstance(value, str) and value else None


def _name(data: Mapping[str, Any]) -> str | None:
    value = data.get("contact_name")
    return storable(value) if isinstance(value, str) and value else None


def _about_earlier(data: Mapping[str, Any]) -> bool:
    """A reaction to, or an edit of, a message already received (any provider's)."""
    return data.get("kind") == "reaction" or data.get("edited") is True


def facts_of(event_type: str, data: Mapping[str, Any]) -> Facts:
    """The conversation and message facts of an event (empty for other event types)."""
    if event_type == "message.received":
        return Facts(
            conversation_id=_text(data, "conversation_id", CONVERSATION_ID_MAX),
            message_ref=_text(data, "message_id", MESSAGE_REF_MAX),
            direction=None if _about_earlier(data) else "inbound",
            contact_name=_name(data),
        )
    if event_type == "message.status":
        return Facts(
            conversation_id=_text(data, "conversation_id", CONVERSATION_ID_MAX),
            message_ref=_text(data, "message_id", MESSAGE_REF_MAX),
        )
    if event_type == ESCALATED_TYPE:
        return Facts(conversation_id=_text(data, "conversation_id", CONVERSATION_ID_MAX))
    if event_type == SEND_TYPE:
        to = data.get("to")
        number = digits(to) if isinstance(to, str) else ""
        return Facts(
            conversation_id=fitted(number, CONVERSATION_ID_MAX) if number else None,
            direction="outbound",
        )
    return Facts()


def status_step(data: Mapping[str, Any]) -> str:
    """The step of a sent message a `message.status` event's `data` is: its `status`, except
    that a voice note played (WhatsApp Cloud's `played`, Z-API's `PLAYED`), which routes get
    as `read` (DESIGN §3.4) with `provider_status` saying so, is `played`, a step after it."""
    status = str(data.get("status"))
    said = data.get("provider_status")
    if status == "read" and isinstance(said, str) and said.lower() == "played":
        return "played"
    return status


def current_status(queued_state: str, provider_statuses: list[str]) -> str:
    """A sent message's state: the furthest of what sending knows and what the provider said."""
    states = [queued_state, *provider_statuses]
    return max(states, key=lambda s: STATUS_RANK.get(s, -1))

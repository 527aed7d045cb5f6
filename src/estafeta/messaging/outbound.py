"""Which sources can send, and what a send needs (DESIGN §3.2, "sends outbound with")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from estafeta.config import SourceConfig
from estafeta.connectors.whatsapp.connector import OUTBOUND_KEYS, refusal
from estafeta.connectors.whatsapp.message import OutboundMessage
from estafeta.errors import HttpError

SEND_PRIORITY = 1  # a reply to a customer goes before routine integration traffic


def missing_outbound_keys(source: SourceConfig) -> list[str]:
    """The keys this source lacks to send (all of them for a generic source)."""
    needed = OUTBOUND_KEYS.get(source.kind)
    if needed is None:
        return ["a provider kind (whatsapp_cloud, twilio, zapi or sendpulse)"]
    return [key for key in needed if not source.value_of(key)]


def can_send(source: SourceConfig) -> bool:
    return not missing_outbound_keys(source)


def check_sendable(source: SourceConfig, data: Mapping[str, Any]) -> None:
    """Refuse at the door a message the worker could only dead-letter: `400
    invalid_request` when `data` is no message (`OutboundMessage.from_data`'s reason), `400
    unsupported_message` when `source`'s provider cannot send it (a Z-API template …)."""
    try:
        message = OutboundMessage.from_data(data)
    except ValueError as exc:
        raise HttpError(400, "invalid_request", f"body.{exc}") from None
    reason = refusal(source, message)
    if reason is not None:
        raise HttpError(
            400, "unsupported_message", f"source {source.id!r} ({source.kind}): {reason}"
        )

"""Which sources can send, and what a send needs (DESIGN §3.2, "sends outbound with")."""

from __future__ import annotations

from estafeta.config import SourceConfig
from estafeta.connectors.whatsapp.connector import OUTBOUND_KEYS

SEND_PRIORITY = 1  # a reply to a customer goes before routine integration traffic


def missing_outbound_keys(source: SourceConfig) -> list[str]:
    """The keys this source lacks to send (all of them for a generic source)."""
    needed = OUTBOUND_KEYS.get(source.kind)
    if needed is None:
        return ["a provider kind (whatsapp_cloud, twilio, zapi or sendpulse)"]
    return [key for key in needed if not source.value_of(key)]


def can_send(source: SourceConfig) -> bool:
    return not missing_outbound_keys(source)

"""The messaging providers' inbound half: handshake, verification and normalization.

One module per source kind of DESIGN §3.2 (`whatsapp_cloud`, `twilio`, `zapi`,
`sendpulse`), each implementing `ProviderSource` and turning the provider's webhook into
the canonical `message.received` / `message.status` events of DESIGN §3.4. `source_for`
picks the class for a configured source; generic sources live in `ingress/generic.py`.
"""

from estafeta.ingress.providers.base import (
    InboundRequest,
    ParsedEvent,
    ProviderSource,
    source_for,
)
from estafeta.ingress.providers.sendpulse import SendPulseSource
from estafeta.ingress.providers.twilio import TwilioSource
from estafeta.ingress.providers.whatsapp_cloud import WhatsAppCloudSource
from estafeta.ingress.providers.zapi import ZApiSource

__all__ = [
    "InboundRequest",
    "ParsedEvent",
    "ProviderSource",
    "SendPulseSource",
    "TwilioSource",
    "WhatsAppCloudSource",
    "ZApiSource",
    "source_for",
]

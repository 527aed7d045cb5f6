"""Sending WhatsApp messages through the providers (DESIGN §3.2 "sends outbound with").

The outbound half of the four provider source kinds, one module each: `cloud`
(WhatsApp Cloud API, contracts §1.6–§1.8), `twilio` (§2.4), `zapi` (§3.1, §3.5) and
`sendpulse` (§9.5–§9.7). Each client turns an `OutboundMessage` into the provider's
documented request and its answer into an `Outcome` whose `external_id` is the id the
provider's status webhooks will name:

| kind | external_id | the inbound status names it as |
|---|---|---|
| whatsapp_cloud | `messages[0].id` (WAMID) | `statuses[].id` |
| twilio | `sid` (`SM…`) | `MessageSid` |
| zapi | `messageId` (else `id`, `zaapId`) | `ids[]`; DeliveryCallback `messageId` |
| sendpulse | `data.id` (SendPulse's) | none: no status webhooks (§9.10 item 5) |

In every case the hub's ingress puts that id in the status event's `data.message_id`. Z-API
gives a second id, `zaapId` (the outcome's `external_alt_id`), that a DeliveryCallback
without `messageId` names instead: the store keeps both and matches a status by either.
"""

from estafeta.connectors.whatsapp.base import ProviderClient
from estafeta.connectors.whatsapp.cloud import CloudClient
from estafeta.connectors.whatsapp.connector import (
    OUTBOUND_KEYS,
    WhatsAppSendConnector,
    client_for,
)
from estafeta.connectors.whatsapp.message import OutboundMessage
from estafeta.connectors.whatsapp.sendpulse import SendPulseClient
from estafeta.connectors.whatsapp.twilio import TwilioClient
from estafeta.connectors.whatsapp.zapi import ZApiClient

__all__ = [
    "OUTBOUND_KEYS",
    "CloudClient",
    "OutboundMessage",
    "ProviderClient",
    "SendPulseClient",
    "TwilioClient",
    "WhatsAppSendConnector",
    "ZApiClient",
    "client_for",
]

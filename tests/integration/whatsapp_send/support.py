"""What the tests against the fake providers share: credentials, sources and deliveries.

Credentials follow the shared fixtures (tests/fixtures/README.md): the business number
+55 11 4002-8922, phone_number_id 114950281736452, the customer Maria +55 11 98765-4321.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from estafeta.config import SourceConfig
from estafeta.connectors.whatsapp import WhatsAppSendConnector, client_for
from estafeta.delivery.outcome import Outcome
from tests.conftest import leased_delivery

CUSTOMER = "+5511987654321"
WA = {
    "access_token": "EAAGm0PX4ZCpsBAKZC9fake",
    "phone_number_id": "114950281736452",
    "app_secret": "6f1d3b8e2a9c47f05e8d1c3b7a9f2e4d",
}
TW = {
    "account_sid": "AC8f3e2d1c0b9a87654321fedcba098765",
    "auth_token": "c8a1f4e7b2d95a3e6f0b1c7d4e9a2f58",
    "from": "whatsapp:+551140028922",
}
ZA = {
    "instance_id": "3D9F1A2B4C6E8F0A1B2C3D4E5F6A7B8C",
    "instance_token": "A1B2C3D4E5F6A7B8C9D0E1F2",
    "client_token": "Fa1b2c3d4e5f60718293a4b5c6d7e8f9aS",
}
SP = {
    "client_id": "sp-client-7f3a",
    "client_secret": "sp-secret-9c1e4b",
    "bot_id": "66a1f2c3d4e5f60718293a4b",
}
WEBHOOK_TOKEN = "tok_9Yq2mX7vK3pL8sR4"
EVENT_ID = "evt_01J1ZK6Q4M8R2T5W7Y9B3C6D8G"  # the send event every delivery carries


def source(kind: str, source_id: str = "src", **keys: Any) -> SourceConfig:
    return SourceConfig.model_validate(
        {"id": source_id, "tenant": "clinica-sol", "kind": kind, **keys}
    )


def wa_source(api_base: str, **overrides: str) -> SourceConfig:
    return source("whatsapp_cloud", "wa-sol", api_base=api_base, **(WA | overrides))


def tw_source(api_base: str, **overrides: str) -> SourceConfig:
    return source("twilio", "tw-sol", api_base=api_base, **(TW | overrides))


def za_source(api_base: str, **overrides: str) -> SourceConfig:
    keys = ZA | {"token": WEBHOOK_TOKEN} | overrides
    return source("zapi", "za-sol", api_base=api_base, **keys)


def sp_source(api_base: str, **overrides: str) -> SourceConfig:
    keys = SP | {"token": WEBHOOK_TOKEN} | overrides
    return source("sendpulse", "sp-sol", api_base=api_base, **keys)


def payload(source_id: str = "src", **content: Any) -> bytes:
    """A `message.send` canonical event (DESIGN §3.4) as the worker leases it."""
    data = {"source": source_id, "to": CUSTOMER, "message_id": "msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F"}
    event = {
        "id": EVENT_ID,
        "type": "message.send",
        "tenant": "clinica-sol",
        "source": "api",
        "data": data | content,
    }
    return orjson.dumps(event)


async def deliver(
    config: SourceConfig,
    session: aiohttp.ClientSession,
    *,
    timeout_s: float = 5.0,
    **content: Any,
) -> Outcome:
    """Send `content` (text=…, template=…, media=…) through `config`, as the worker would."""
    connector = WhatsAppSendConnector(
        client_for(config, session, timeout_s=timeout_s), source_id=config.id
    )
    try:
        return await connector.deliver(
            leased_delivery(
                payload(config.id, **content), event_id=EVENT_ID, destination_id="wa-send"
            )
        )
    finally:
        await connector.close()

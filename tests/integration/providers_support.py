"""What the provider ingress tests share: the fixtures' folder, the providers' secrets and
published vectors, and the configured sources (the `http` fixture is in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

FIXTURES = Path(__file__).parent.parent / "fixtures"
ADMIN = {"authorization": "Bearer test-admin-key"}
WA_VECTOR = orjson.loads((FIXTURES / "whatsapp_cloud/signature_vector.json").read_bytes())
TWILIO_VECTOR = orjson.loads((FIXTURES / "twilio/signature_vector.json").read_bytes())
ZAPI_TOKEN = "zapi-webhook-token-1"
SENDPULSE_TOKEN = "sendpulse-webhook-token-1"
PUBLIC_URL = "https://hub.example.com.br"


def provider_sources() -> list[dict[str, Any]]:
    return [
        {
            "id": "wa-sol",
            "tenant": "clinica-sol",
            "kind": "whatsapp_cloud",
            "app_secret": WA_VECTOR["app_secret"],
            "verify_token": "estafeta-verify-2f7c1e9a",
        },
        {
            "id": "twilio-sol",
            "tenant": "clinica-sol",
            "kind": "twilio",
            "auth_token": TWILIO_VECTOR["auth_token"],
        },
        {
            "id": "twilio-proxied",
            "tenant": "clinica-sol",
            "kind": "twilio",
            "auth_token": TWILIO_VECTOR["auth_token"],
            "public_url": PUBLIC_URL,
        },
        {"id": "zapi-sol", "tenant": "clinica-sol", "kind": "zapi", "token": ZAPI_TOKEN},
        {"id": "sp-sol", "tenant": "clinica-sol", "kind": "sendpulse", "token": SENDPULSE_TOKEN},
    ]

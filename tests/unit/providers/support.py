"""What the provider tests share: the repository's fixture copies, sources and requests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from estafeta.config import SourceConfig
from estafeta.ingress.providers import InboundRequest

#: The repository's copy of the shared fixtures (tests/fixtures/<provider>/…).
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PROVIDER_DIRS = ("whatsapp_cloud", "twilio", "zapi", "sendpulse")

WA_APP_SECRET = "6f1d3b8e2a9c47f05e8d1c3b7a9f2e4d"
WA_VERIFY_TOKEN = "estafeta-verify-2f7c1e9a"
TWILIO_AUTH_TOKEN = "c8a1f4e7b2d95a3e6f0b1c7d4e9a2f58"
QUERY_TOKEN = "tok_9Yq2mX7vK3pL8sR4"

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


def fixture_bytes(relative: str) -> bytes:
    """The exact bytes of a fixture file, e.g. `whatsapp_cloud/text.json`."""
    return (FIXTURES / relative).read_bytes()


def fixture_json(relative: str) -> Any:
    return orjson.loads(fixture_bytes(relative))


def source(kind: str, **keys: str) -> SourceConfig:
    """A validated source of `kind` with the given keys."""
    return SourceConfig.model_validate({"id": "src", "tenant": "tenant", "kind": kind, **keys})


def post(
    url: str,
    body: bytes,
    content_type: str | None = JSON,
    headers: Mapping[str, str] | None = None,
) -> InboundRequest:
    """A POST to `url` with `body`, as the endpoint would hand it over."""
    all_headers = dict(headers or {})
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    return InboundRequest.build("POST", url, all_headers, body)


def subset(data: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """The items of `data` named in `expected`, to compare with `expected` in one assert."""
    return {key: data.get(key, "<absent>") for key in expected}

"""Generic sources: a business's own systems posting JSON.

Who is calling is proven by a Standard Webhooks signature made with the source's `secret`,
or by an API key (`Authorization: Bearer …`) equal to the source's `api_key`. The body is
`{"type": …, "data": {…}}`, or any JSON object, which becomes `data` under the source's
`event_type`.
"""

from __future__ import annotations

import hmac
import json
import re
from typing import TYPE_CHECKING, Any

import orjson
from standardwebhooks.webhooks import Webhook

from estafeta.config import SourceConfig
from estafeta.errors import HttpError
from estafeta.record import Record

if TYPE_CHECKING:
    from estafeta.ingress.providers.base import InboundRequest

# What the standardwebhooks library says, and what we tell the caller instead.
_VERIFY_MESSAGES = {
    "Missing required headers": "missing webhook-id, webhook-timestamp or webhook-signature header",
    "Message timestamp too old": "webhook-timestamp is older than the 5-minute tolerance",
    "Message timestamp too new": "webhook-timestamp is more than 5 minutes in the future",
    "No matching signature found": "webhook-signature does not match the body and the secret",
    "Invalid Signature Headers": "webhook-timestamp is not a Unix time in seconds",
}


class ParsedEvent(Record, frozen=True):
    """What a source's payload says, before it becomes a canonical event."""

    type: str
    data: dict[str, Any]
    idempotency_key: str | None
    occurred_at: int | None = None  # Unix ms, when the sender says
    raw: str | None = None  # the provider's own JSON for this item, kept for audit


class GenericSource:
    """A `ProviderSource` (providers/base.py) for the business's own systems."""

    kind = "generic"
    methods: tuple[str, ...] = ("POST",)

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self._webhook = Webhook(source.secret) if source.secret else None
        self._api_key = source.api_key.encode() if source.api_key else None

    def handshake(self, request: InboundRequest) -> str:
        raise HttpError(405, "method_not_allowed", "send events with POST", {"Allow": "POST"})

    def verify(self, request: InboundRequest) -> None:
        """Raise HttpError(401) unless the request is signed or carries the source's key."""
        body, headers = request.body, request.headers
        if self._webhook is not None and "webhook-signature" in headers:
            try:
                text = body.decode()
            except UnicodeDecodeError:
                raise HttpError(400, "invalid_body", "the body is not UTF-8") from None
            try:
                self._webhook.verify(text, dict(headers), json_parse=False)
            except Exception as exc:  # the library raises more than its own error: catch all
                reason = _VERIFY_MESSAGES.get(str(exc), "webhook-signature is malformed")
                raise HttpError(401, "invalid_signature", reason) from None
            return
        if self._api_key is not None:
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self._api_key):
                return
            if given:
                raise HttpError(401, "invalid_api_key", "the API key does not match this source")
            raise HttpError(401, "missing_credentials", "send Authorization: Bearer <api key>")
        raise HttpError(
            401,
            "missing_signature",
            "missing webhook-id, webhook-timestamp or webhook-signature header",
        )

    def parse(self, request: InboundRequest) -> list[ParsedEvent]:
        body, headers = request.body, request.headers
        if request.content_type != "application/json" and not request.content_type.endswith(
            "+json"
        ):
            raise HttpError(
                415,
                "unsupported_media_type",
                f"expected Content-Type application/json, got {request.content_type or 'none'!r}",
            )
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise HttpError(400, "invalid_body", "the body must be a JSON object")
        if _MAYBE_BEYOND_64_BITS.search(body):
            _refuse_integers_beyond_64_bits(body)
        key = headers.get("webhook-id") or headers.get("idempotency-key") or None
        if key is not None and len(key) > 255:
            raise HttpError(
                400, "invalid_idempotency_key", "the idempotency key is over 255 characters"
            )
        event_type = document.get("type")
        data = document.get("data")
        if isinstance(event_type, str) and isinstance(data, dict):
            return [ParsedEvent(type=_checked_type(event_type), data=data, idempotency_key=key)]
        if self.source.event_type:
            return [ParsedEvent(type=self.source.event_type, data=document, idempotency_key=key)]
        raise HttpError(
            400,
            "invalid_body",
            'the body needs "type" (a string) and "data" (an object), '
            "or the source needs an event_type",
        )


# orjson reads an integer outside [-2**63, 2**64) as the nearest double, silently: an order
# number of 20+ digits would reach every destination rounded. Such a literal has 19 digits
# or more; only a body that has a run of them (in a string too: harmless) is read again.
_MAYBE_BEYOND_64_BITS = re.compile(rb"[0-9]{19}")
_INT64_MIN, _UINT64_END = -(2**63), 2**64


def _refuse_integers_beyond_64_bits(body: bytes) -> None:
    """400 naming the first integer no JSON consumer of ours keeps exact, as the API does."""
    try:
        exact = json.loads(body)  # Python's own parser keeps every integer exact
    except ValueError:  # more digits than Python converts (4300): beyond 64 bits too
        where: str | None = "body"
    except RecursionError:  # nested deeper than Python parses (orjson takes 1024 levels)
        return
    else:
        where = _first_wide_integer(exact)
    if where is not None:
        raise HttpError(
            400,
            "invalid_body",
            f"{where}: an integer beyond 64 bits would reach destinations rounded; "
            "send it as a string",
        )


def _first_wide_integer(document: object) -> str | None:
    """Where the first integer outside orjson's range is (`body.data.items.0.id`), if any."""
    stack: list[tuple[str, object]] = [("body", document)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}", v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, int) and not _INT64_MIN <= value < _UINT64_END:
            return where
    return None


def _checked_type(event_type: str) -> str:
    if not event_type or len(event_type) > 200:
        raise HttpError(400, "invalid_type", '"type" must be 1 to 200 characters')
    return event_type

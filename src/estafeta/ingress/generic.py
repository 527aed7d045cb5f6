"""Generic sources: a business's own systems posting JSON.

Who is calling is proven by a Standard Webhooks signature made with the source's `secret`,
or by an API key (`Authorization: Bearer …`) equal to the source's `api_key`; either may
be a list while it is rotated, and a request made with any of them is accepted. The body is
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

from estafeta.bearer import CHALLENGE, INVALID_KEY_CHALLENGE, bearer_key
from estafeta.config import SourceConfig
from estafeta.config.models import EVENT_TYPE_MAX_LENGTH
from estafeta.errors import HttpError
from estafeta.jsonvalues import DATA_LEVELS_ABOVE, WIDE_INTEGER, may_nest_too_deep, unstorable
from estafeta.messaging.facts import storable
from estafeta.record import Record

if TYPE_CHECKING:
    from estafeta.ingress.providers.base import InboundRequest

# A UTF-8 byte order mark, which RFC 8259 lets a parser skip (the API's does, and some .NET
# clients write one): no JSON to orjson, so taken off before a webhook's body is read.
UTF8_BOM = b"\xef\xbb\xbf"

_NO_MATCH = "No matching signature found"
# What the standardwebhooks library says, and what we tell the caller instead.
_VERIFY_MESSAGES = {
    "Missing required headers": "missing webhook-id, webhook-timestamp or webhook-signature header",
    "Message timestamp too old": "webhook-timestamp is older than the 5-minute tolerance",
    "Message timestamp too new": "webhook-timestamp is more than 5 minutes in the future",
    _NO_MATCH: "webhook-signature does not match the body and the secret",
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
    accepted_status = 202
    answers_twiml = False

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        # Several while a secret is rotated (docs/operations.md): the current one first.
        self._webhooks = tuple(Webhook(secret) for secret in source.secrets_of("secret"))
        self._api_keys = tuple(key.encode() for key in source.secrets_of("api_key"))

    def handshake(self, request: InboundRequest) -> str:
        raise HttpError(405, "method_not_allowed", "send events with POST", {"Allow": "POST"})

    def verify(self, request: InboundRequest) -> None:
        """Raise HttpError(401) unless the request is signed or carries the source's key."""
        body, headers = request.body, request.headers
        if self._webhooks and "webhook-signature" in headers:
            try:
                text = body.decode()
            except UnicodeDecodeError as exc:
                raise not_utf8(exc) from None
            _verify_any(self._webhooks, text, dict(headers))
            return
        if self._api_keys:
            given = headers.get("authorization", "")
            token = bearer_key(given)
            if token is not None and _any_equal(token.encode(), self._api_keys):
                return
            # As the API's 401s: say how to authenticate, and that a bearer key was refused.
            if given:
                challenge = CHALLENGE if token is None else INVALID_KEY_CHALLENGE
                detail = "the API key does not match this source"
                raise HttpError(401, "invalid_api_key", detail, challenge)
            detail = "send Authorization: Bearer <api key>"
            raise HttpError(401, "missing_credentials", detail, CHALLENGE)
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
        text = body.removeprefix(UTF8_BOM)  # verified as sent; read without it
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise not_json(body, exc) from None
        if not isinstance(document, dict):
            raise HttpError(400, "invalid_body", "the body must be a JSON object")
        key = headers.get("webhook-id")
        shown = "webhook-id"
        if key is None:
            key, shown = headers.get("idempotency-key"), "Idempotency-Key"
        if key == "":  # taken for "no key", every retry of the request was stored anew
            raise HttpError(
                400,
                "invalid_idempotency_key",
                f"the {shown} header is empty: send a key or leave the header out",
            )
        # Headers are read as latin-1, one character per byte, and the key is stored so: the
        # limit (the column's 255 characters) is the header's bytes.
        if key is not None and len(key) > 255:
            raise HttpError(400, "invalid_idempotency_key", "the idempotency key is over 255 bytes")
        event_type = document.get("type")
        data = document.get("data")
        if isinstance(event_type, str) and isinstance(data, dict):
            _refuse_unstorable(text, data, "data")
            return [ParsedEvent(type=_checked_type(event_type), data=data, idempotency_key=key)]
        if self.source.event_type:
            _refuse_unstorable(text, document, None)
            return [ParsedEvent(type=self.source.event_type, data=document, idempotency_key=key)]
        raise HttpError(
            400,
            "invalid_body",
            'the body needs "type" (a string) and "data" (an object), '
            "or the source needs an event_type",
        )


def _verify_any(webhooks: tuple[Webhook, ...], text: str, headers: dict[str, str]) -> None:
    """Return if the request is signed with any of the secrets, else raise the 401 saying
    why. Only a signature that matches none tries the next secret: a missing header or a
    stale timestamp is the same for each."""
    reason = ""
    for webhook in webhooks:
        try:
            webhook.verify(text, headers, json_parse=False)
        except Exception as exc:  # the library raises more than its own error: catch all
            reason = _VERIFY_MESSAGES.get(str(exc), "webhook-signature is malformed")
            if str(exc) != _NO_MATCH:
                break
        else:
            return
    raise HttpError(401, "invalid_signature", reason)


def _any_equal(given: bytes, keys: tuple[bytes, ...]) -> bool:
    """Whether `given` is one of `keys`, each compared in constant time."""
    return any(hmac.compare_digest(given, key) for key in keys)


def not_utf8(exc: UnicodeDecodeError) -> HttpError:
    return HttpError(400, "invalid_body", f"the body is not UTF-8 at byte {exc.start}")


def not_json(body: bytes, exc: orjson.JSONDecodeError) -> HttpError:
    """The 400 for a body orjson cannot read. orjson calls any byte that is not UTF-8
    "surrogates not allowed" at "char 0": a body that is not UTF-8 (Latin-1 …) is told so,
    where it stops being UTF-8, as a signed one is (`verify`). `body` is the body as sent,
    byte order mark included, so that the byte is counted from the first one sent. Only a
    refused body is decoded again."""
    try:
        body.decode()
    except UnicodeDecodeError as bad:
        return not_utf8(bad)
    return HttpError(400, "invalid_json", f"the body is not valid JSON: {exc}")


# A body may hold what estafeta cannot store as sent (jsonvalues.py) only if it has a run
# of 19 digits (an integer beyond 64 bits; in a string too: harmless) or brackets enough to
# nest too deep: only such a body is walked, so the common one costs three scans in C.
_MAYBE_BEYOND_64_BITS = re.compile(rb"[0-9]{19}")


def _refuse_unstorable(body: bytes, data: dict[str, Any], member: str | None) -> None:
    """400 naming the first part of `data` (the body's `member`, or the whole body) that
    could not be stored and delivered as sent, as the API refuses it."""
    wide = _MAYBE_BEYOND_64_BITS.search(body) is not None
    if not wide and not may_nest_too_deep(body):
        return
    exact: object = data
    if wide:  # orjson read any such integer as a double: Python's parser keeps it exact
        try:
            document = json.loads(body)
        except ValueError:  # more digits than Python converts (4300): beyond 64 bits too
            raise HttpError(400, "invalid_body", f"body: {WIDE_INTEGER}") from None
        except RecursionError:  # deeper than Python parses, so than orjson writes: walked
            pass
        else:
            exact = document[member] if member is not None else document
    problem = unstorable(exact, levels_above=DATA_LEVELS_ABOVE)
    if problem is not None:
        root = f"body.{member}" if member is not None else "body"
        raise HttpError(400, "invalid_body", problem.at(root))


def _checked_type(event_type: str) -> str:
    if not event_type or len(event_type) > EVENT_TYPE_MAX_LENGTH:
        detail = f'"type" must be 1 to {EVENT_TYPE_MAX_LENGTH} characters'
        raise HttpError(400, "invalid_type", detail)
    # PostgreSQL cannot store U+0000: the type is made storable before it is routed and put
    # in the canonical event, so the stored type, the delivered one and both engines agree.
    return storable(event_type)

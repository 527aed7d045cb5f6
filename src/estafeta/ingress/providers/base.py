"""What every messaging provider's inbound half shares (DESIGN §3.2, §3.3; contracts §1–§3, §9).

A provider source answers three questions about a request to `/in/{source}`:

* `handshake(request)`: what to answer a GET with (WhatsApp Cloud's subscription check,
  contracts §1.1); the other providers send none and get 405.
* `verify(request)`: who is calling; raises `HttpError(401, …)` unless the request carries
  the provider's signature or the source's token.
* `parse(request)`: the request's payload as `ParsedEvent`s, normalized to the canonical
  `data` of DESIGN §3.4; raises only `HttpError` 400 or 415, never anything else, whatever
  the body holds. A valid webhook that says nothing we use gives `[]`.

The helpers below read untrusted JSON defensively: a value of the wrong type reads as
absent, so a malformed field never becomes an exception.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson

from estafeta.errors import HttpError
from estafeta.ingress.generic import UTF8_BOM, ParsedEvent, not_json
from estafeta.jsonvalues import (
    DATA_LEVELS_ABOVE,
    INT64_MIN,
    UINT64_END,
    may_nest_too_deep,
    unstorable,
)
from estafeta.messaging.facts import fitted
from estafeta.record import Record

if TYPE_CHECKING:
    from estafeta.config import SourceConfig

__all__ = [
    "InboundRequest",
    "ParsedEvent",
    "ProviderSource",
    "source_for",
]

#: The events' idempotency keys live in a 255-character column (store schema).
MAX_KEY_LENGTH = 255
# Unix seconds below this are plausible timestamps (year 5138); anything larger is garbage.
_MAX_SECONDS = 10**11


class InboundRequest(Record, frozen=True):
    """One HTTP request to `/in/{source}`, as the provider sources need to see it."""

    method: str  # "GET" | "POST"
    url: str  # the full URL as received, scheme://host/path?query (Twilio signs it)
    path_qs: str  # path + "?" + raw query, for rebuilding with `public_url`
    query: Mapping[str, str]  # first value of each query parameter
    headers: Mapping[str, str]  # lower-case header names
    body: bytes
    content_type: str  # media type only, lower-case ("application/json")

    @classmethod
    def build(
        cls,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> InboundRequest:
        """Derive `path_qs`, `query` and `content_type` from a URL and headers (any case)."""
        parts = urlsplit(url)
        path_qs = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lowered = {name.lower(): value for name, value in (headers or {}).items()}
        return cls(
            method.upper(),
            url,
            path_qs,
            first_values(parts.query),
            lowered,
            body,
            media_type(lowered),
        )


def first_values(raw_query: str) -> dict[str, str]:
    """The first value of each query parameter (blank values kept)."""
    query: dict[str, str] = {}
    if not raw_query:  # most webhooks: parse_qsl costs the hot path even for nothing
        return query
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        query.setdefault(name, value)
    return query


def media_type(headers: Mapping[str, str]) -> str:
    """`application/json` of a lower-case `content-type` of `Application/JSON; charset=…`;
    "" when there is none."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


class ProviderSource(Protocol):
    """The inbound half of one provider kind; one instance per configured source."""

    kind: str
    # The methods its URL answers, for a 405's `Allow`: POST, and GET where `handshake` can
    # answer one.
    methods: tuple[str, ...]
    # The status a webhook whose events are committed (or spooled) is answered with. The
    # providers ask for 200: Meta retries any other status for 7 days (contracts §1.3),
    # Twilio and SendPulse expect 200. Generic sources answer 202, as the API does.
    accepted_status: int
    # Twilio reads the answer to an incoming message as TwiML: any other content type is its
    # error 12300, reported to the business for every message (contracts §2.2).
    answers_twiml: bool

    def handshake(self, request: InboundRequest) -> str:
        """The text to answer a GET with (200); raises HttpError (403, 405 …) otherwise."""
        ...

    def verify(self, request: InboundRequest) -> None:
        """Raise HttpError(401, …) unless the request provably comes from the provider."""
        ...

    def parse(self, request: InboundRequest) -> list[ParsedEvent]:
        """The request's events; raises only HttpError 400/415, with a clear detail."""
        ...


def source_for(config: SourceConfig) -> ProviderSource:
    """The provider source for a `[[sources]]` entry of kind whatsapp_cloud, twilio, zapi or
    sendpulse. Generic sources have their own class (`estafeta.ingress.generic`)."""
    # Imported here: the provider modules import this one.
    from estafeta.ingress.providers.sendpulse import SendPulseSource
    from estafeta.ingress.providers.twilio import TwilioSource
    from estafeta.ingress.providers.whatsapp_cloud import WhatsAppCloudSource
    from estafeta.ingress.providers.zapi import ZApiSource

    kinds: dict[str, type[WhatsAppCloudSource | TwilioSource | ZApiSource | SendPulseSource]]
    kinds = {
        "whatsapp_cloud": WhatsAppCloudSource,
        "twilio": TwilioSource,
        "zapi": ZApiSource,
        "sendpulse": SendPulseSource,
    }
    factory = kinds.get(config.kind)
    if factory is None:
        raise ValueError(f"source {config.id!r} is of kind {config.kind!r}, not a provider kind")
    return factory(config)


def require_all(config: SourceConfig, kind: str, key: str) -> tuple[str, ...]:
    """Every secret of a key the source cannot verify without, current first (several
    while it is rotated); the configuration checks it is set, this is a guard."""
    found = config.secrets_of(key)
    if not found:
        raise ValueError(f"a {kind} source needs `{key}`")
    return found


def no_handshake(kind: str) -> HttpError:
    """What providers without a GET handshake answer a GET with."""
    return HttpError(
        405, "method_not_allowed", f"a {kind} source accepts POST only", {"Allow": "POST"}
    )


def equal(given: str, expected: str) -> bool:
    """Constant-time comparison of two strings of any characters."""
    return hmac.compare_digest(given.encode(), expected.encode())


def verify_query_token(request: InboundRequest, tokens: tuple[str, ...]) -> None:
    """The `?token=` of the webhook URL must equal one of the source's tokens (DESIGN §3.2:
    Z-API §3.1 and SendPulse §9.2 document no signature, so the URL carries a secret; several
    while it is rotated)."""
    given = request.query.get("token")
    if not given:
        raise HttpError(401, "missing_token", "the webhook URL needs ?token=<the source's token>")
    # A token pasted into the URL as it is keeps its `+` (base64 tokens have them), which
    # form decoding reads as a space; so the value is also read without that rule.
    raw = _raw_query_value(request.path_qs, "token")
    if not any(equal(given, token) or equal(raw, token) for token in tokens):
        raise HttpError(401, "invalid_token", "the token does not match this source")


class TokenInUrlSource:
    """The common half of Z-API and SendPulse sources, whose providers sign nothing: the
    webhook URL carries the source's `token` (DESIGN §3.2), and there is no GET handshake.
    A subclass sets `kind` and writes `parse`."""

    kind: str
    methods: tuple[str, ...] = ("POST",)
    accepted_status = 200
    answers_twiml = False

    def __init__(self, config: SourceConfig) -> None:
        self._tokens = require_all(config, self.kind, "token")

    def handshake(self, request: InboundRequest) -> str:
        raise no_handshake(self.kind)

    def verify(self, request: InboundRequest) -> None:
        verify_query_token(request, self._tokens)


def _raw_query_value(path_qs: str, name: str) -> str:
    """The first `name=` value of the query, percent-decoded but with `+` kept as `+`."""
    for part in path_qs.partition("?")[2].split("&"):
        key, _, value = part.partition("=")
        if unquote(key) == name:
            return unquote(value)
    return ""


def is_json_type(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def load_json(request: InboundRequest, *, check_type: bool = True) -> object:
    """The body as JSON: 415 when the Content-Type is not JSON, 400 when the body is not,
    or nests arrays and objects deeper than estafeta could store the parts it keeps: taken,
    such a body failed with a 500, which the provider retries for ever (none sends one)."""
    if check_type and not is_json_type(request.content_type):
        raise HttpError(
            415,
            "unsupported_media_type",
            f"expected Content-Type application/json, got {request.content_type or 'none'!r}",
        )
    body = request.body.removeprefix(UTF8_BOM)  # verified as sent; read without it
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        document = _with_lone_surrogates_mended(body, exc, sent=request.body)
    if may_nest_too_deep(body):
        # What a parser keeps (a `referral`, an unsupported message's part) lies deeper in
        # the body than in `data`: a body within `data`'s bound keeps it within too.
        problem = unstorable(document, levels_above=DATA_LEVELS_ABOVE)
        if problem is not None:
            raise HttpError(400, "invalid_body", problem.at("body"))
    return document


# A UTF-16 surrogate code point: in what the standard library reads, one that was half of a
# pair is one character already, so any left is a lone half.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _with_lone_surrogates_mended(
    body: bytes, exc: orjson.JSONDecodeError, *, sent: bytes
) -> object:
    """A body orjson refuses only for a lone surrogate escape (`"\\ud83d"`, text cut in the
    middle of an emoji by a sender counting UTF-16 units, as Node's JSON.stringify writes
    it), read by the standard library with each lone half as U+FFFD, which a store can hold:
    refused, the provider's message was lost. Numbers are read as orjson reads them. Any
    other refusal is the 400 it was, told of the body as `sent` (its byte order mark too: a
    byte that is not UTF-8 is counted from the first byte sent). Only a refused body is
    read again."""
    if "surrogate" not in str(exc):
        raise not_json(sent, exc) from None
    try:
        document = json.loads(
            body.decode(), parse_int=_orjson_int, parse_float=_finite, parse_constant=_no_constant
        )
    except (ValueError, RecursionError):  # not UTF-8 (no surrogate escape), or no JSON
        raise not_json(sent, exc) from None
    stack: list[object] = [document]
    while stack:  # without recursion: the body may nest deeper than a walk could recurse
        item = stack.pop()
        if isinstance(item, dict):
            pairs = list(item.items())
            item.clear()
            for key, value in pairs:
                item[_mended(key)] = _mended(value)
                stack.append(value)
        elif isinstance(item, list):
            for index, value in enumerate(item):
                item[index] = _mended(value)
                stack.append(value)
    return _mended(document)


def _mended(value: Any) -> Any:
    return _SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value


def _orjson_int(text: str) -> int | float:
    """An integer as orjson reads it: exact within 64 bits, else the nearest double."""
    value = int(text)
    return value if INT64_MIN <= value < UINT64_END else _finite(text)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # orjson refuses it: "number is infinity when parsed as double"
        raise ValueError(text)
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is no JSON")


def dumps(value: object) -> str:
    """The provider's own JSON for one item, kept in `ParsedEvent.raw`."""
    return orjson.dumps(value).decode()


# Reading untrusted JSON: a value of the wrong type reads as absent.


def obj(value: object) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def objects(value: object) -> list[dict[str, Any]]:
    """The JSON objects of a list; anything else (and a non-list) is skipped."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def text(value: object) -> str | None:
    """A string, or an integer written as one (ids and timestamps come both ways)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def nonempty(value: object) -> str | None:
    """`text(value)` unless it is empty."""
    return text(value) or None


def number(value: object) -> float | None:
    """A coordinate: a JSON number or a numeric string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            return None
        return parsed if parsed == parsed and abs(parsed) != float("inf") else None
    return None


def flag(value: object) -> bool | None:
    """A boolean, or the strings "true"/"false" (form fields)."""
    if isinstance(value, bool):
        return value
    if value in ("true", "True"):
        return True
    if value in ("false", "False"):
        return False
    return None


def phone_digits(value: object) -> str | None:
    """The digits of a phone number (`whatsapp:+55 11 98765-4321` → `5511987654321`), or
    None when it is not one (a group id, a `@lid` identifier, garbage)."""
    raw = text(value)
    if raw is None:
        return None
    if raw.isdigit() and raw.isascii() and len(raw) <= 20:
        return raw  # how WhatsApp Cloud writes them: a webhook reads up to five per message
    raw = raw.removeprefix("whatsapp:").strip().removeprefix("+")
    for separator in " -().":
        raw = raw.replace(separator, "")
    if not 1 <= len(raw) <= 20 or not raw.isascii() or not raw.isdigit():
        return None
    return raw


def e164(value: object) -> str | None:
    """`+<digits>` of a phone number, or None."""
    digits = phone_digits(value)
    return None if digits is None else f"+{digits}"


def whole(value: object) -> int | None:
    """A non-negative integer, given as a JSON integer or a string of digits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and 0 < len(value) <= 20 and value.isascii() and value.isdigit():
        return int(value)
    return None


def seconds_to_ms(value: object) -> int | None:
    """Unix seconds (WhatsApp Cloud's `timestamp`, a string) as Unix milliseconds."""
    seconds = whole(value)
    return seconds * 1000 if seconds is not None and seconds < _MAX_SECONDS else None


def milliseconds(value: object) -> int | None:
    """Unix milliseconds (Z-API's `momment`, SendPulse's `date`)."""
    ms = whole(value)
    return ms if ms is not None and ms < _MAX_SECONDS * 1000 else None


# A message sent through POST /api/v1/messages: `msg_` + a ULID (ids.py).
_SENT_MESSAGE_ID = re.compile(r"msg_[0-9A-HJKMNP-TV-Z]{26}")


def sent_message_id(value: object) -> str | None:
    """`value` when it is the id of a message the hub sent (`msg_…`), as a provider echoes it
    back in a status; None for anything else (another sender's callback data)."""
    return value if isinstance(value, str) and _SENT_MESSAGE_ID.fullmatch(value) else None


def bounded_key(key: str) -> str:
    """An idempotency key that fits its column: longer keys become their SHA-256, by the
    same rule as the conversation and message ids (`messaging.facts.fitted`)."""
    return fitted(key, MAX_KEY_LENGTH)


def digest_key(*parts: object) -> str:
    """A stable key from parts when the provider gives no id: the same item retried gives
    the same key, so dedup still works."""
    return "sha256:" + hashlib.sha256(orjson.dumps(list(parts))).hexdigest()

"""Robustness: whatever a caller sends, a provider answers with events or a 4xx HttpError.

For each provider, `parse` gets arbitrary bytes, arbitrary JSON built from the providers'
own vocabulary, and real fixtures with random subtrees replaced (which reaches the deep
branches); Twilio also gets arbitrary form fields. `verify` and `handshake` get arbitrary
input too. Any exception other than HttpError, or a 5xx, is a bug.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estafeta.errors import HttpError
from estafeta.ingress.generic import ParsedEvent
from estafeta.ingress.providers import InboundRequest, ProviderSource, source_for
from estafeta.ingress.providers.base import MAX_KEY_LENGTH
from tests.deep_json import nested
from tests.unit.providers.support import (
    FIXTURES,
    FORM,
    JSON,
    PROVIDER_DIRS,
    QUERY_TOKEN,
    TWILIO_AUTH_TOKEN,
    WA_APP_SECRET,
    WA_VERIFY_TOKEN,
    post,
    source,
)

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
URL = f"https://hub.example.com/in/src?token={QUERY_TOKEN}"
KINDS = {
    "text", "image", "audio", "video", "document", "sticker", "location",
    "contacts", "interactive", "button", "reaction", "unsupported",
}  # fmt: skip
STATUSES = {"sent", "delivered", "read", "failed"}

SOURCES: dict[str, ProviderSource] = {
    "whatsapp_cloud": source_for(
        source("whatsapp_cloud", app_secret=WA_APP_SECRET, verify_token=WA_VERIFY_TOKEN)
    ),
    "twilio": source_for(source("twilio", auth_token=TWILIO_AUTH_TOKEN)),
    "zapi": source_for(source("zapi", token=QUERY_TOKEN)),
    "sendpulse": source_for(source("sendpulse", token=QUERY_TOKEN)),
}


def _json_fixtures(provider: str) -> list[Any]:
    return [
        orjson.loads(path.read_bytes())
        for path in sorted((FIXTURES / provider).glob("*.json"))
        if "signature_vector" not in path.name
    ]


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in _keys(item)}
    if isinstance(value, list):
        return {key for item in value for key in _keys(item)}
    return set()


def _strings(value: Any) -> set[str]:
    if isinstance(value, dict):
        return {s for item in value.values() for s in _strings(item)}
    if isinstance(value, list):
        return {s for item in value for s in _strings(item)}
    return {value} if isinstance(value, str) and len(value) < 40 else set()


DOCUMENTS = {
    provider: _json_fixtures(provider) for provider in PROVIDER_DIRS if provider != "twilio"
}
_ALL = [document for documents in DOCUMENTS.values() for document in documents]
VOCABULARY = sorted(
    set().union(*map(_keys, _ALL))
    | {"statuses", "errors", "context", "referral", "order", "ids", "fromMe", "isGroup"}
    | {"buttonsResponseMessage", "listResponseMessage", "contact", "reaction", "location"}
)
WORDS = sorted(
    set().union(*map(_strings, _ALL))
    | {"ReceivedCallback", "MessageStatusCallback", "DeliveryCallback", "incoming_message"}
    | {"button_reply", "list_reply", "nfm_reply", "played", "failed", "READ", "PLAYED"}
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(WORDS)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(VOCABULARY) | st.text(max_size=6), children, max_size=6)
    ),
    max_leaves=40,
)


@st.composite
def mutated(draw: st.DrawFn, provider: str) -> Any:
    """A fixture of `provider` with random subtrees replaced by arbitrary JSON."""

    def mutate(value: Any) -> Any:
        if draw(st.integers(0, 7)) == 0:
            return draw(json_values)
        if isinstance(value, dict):
            return {key: mutate(item) for key, item in value.items()}
        if isinstance(value, list):
            return [mutate(item) for item in value]
        return value

    return mutate(copy.deepcopy(draw(st.sampled_from(DOCUMENTS[provider]))))


def check_parse(provider: str, request: InboundRequest) -> None:
    """`parse` returns well-formed events or raises a 4xx HttpError, nothing else."""
    try:
        events = SOURCES[provider].parse(request)
    except HttpError as exc:
        assert 400 <= exc.status < 500, exc
        return
    assert isinstance(events, list)
    for event in events:
        assert isinstance(event, ParsedEvent)
        assert event.type in ("message.received", "message.status")
        assert isinstance(event.idempotency_key, str)
        assert 0 < len(event.idempotency_key) <= MAX_KEY_LENGTH
        assert event.occurred_at is None or isinstance(event.occurred_at, int)
        # Storable as is, and writable where estafeta writes it deepest (jsonvalues.py).
        orjson.loads(orjson.dumps({"event": {"data": event.data}}))
        orjson.loads(event.raw or "")
        assert event.data["provider"] == provider
        if event.type == "message.received":
            assert event.data["kind"] in KINDS
        else:
            assert event.data["status"] in STATUSES


@pytest.mark.parametrize("provider", PROVIDER_DIRS)
@PROPERTY
@given(body=st.binary(max_size=512), content_type=st.sampled_from([JSON, FORM, "", "text/plain"]))
def test_parse_arbitrary_bytes(provider: str, body: bytes, content_type: str) -> None:
    check_parse(provider, post(URL, body, content_type))


@pytest.mark.parametrize("provider", PROVIDER_DIRS)
@PROPERTY
@given(document=json_values)
def test_parse_arbitrary_json(provider: str, document: Any) -> None:
    check_parse(provider, post(URL, orjson.dumps(document), JSON))


@pytest.mark.parametrize("provider", ["whatsapp_cloud", "zapi", "sendpulse"])
@PROPERTY
@given(data=st.data())
def test_parse_mutated_fixtures(provider: str, data: st.DataObject) -> None:
    document = data.draw(mutated(provider))
    check_parse(provider, post(URL, orjson.dumps(document), JSON))


@pytest.mark.parametrize("provider", ["whatsapp_cloud", "zapi", "sendpulse"])
@pytest.mark.parametrize(("depth", "refused"), [(238, False), (400, True)])
def test_a_webhook_nested_past_what_estafeta_writes_is_refused_not_failed(
    provider: str, depth: int, refused: bool
) -> None:
    # Copied into `data` (a referral, an unsupported part) or kept as the item's `raw`, such
    # a part failed the request with a 500 that the provider retries for ever.
    for document in DOCUMENTS[provider]:

        def deepen(value: Any) -> Any:
            if isinstance(value, dict):
                return {**{k: deepen(v) for k, v in value.items()}, "referral": nested(depth)}
            if isinstance(value, list):
                return [deepen(item) for item in value]
            return value

        body = json.dumps(deepen(document)).encode()  # orjson writes no deeper than 254
        request = post(URL, body, JSON)
        if refused:
            with pytest.raises(HttpError) as caught:
                SOURCES[provider].parse(request)
            assert (caught.value.status, caught.value.error) == (400, "invalid_body")
            assert caught.value.detail == "body: arrays and objects nested more than 252 deep"
        else:
            check_parse(provider, request)


TWILIO_FIELDS = sorted(
    {
        name
        for path in (FIXTURES / "twilio").glob("*.form")
        for name in (pair.split("=", 1)[0] for pair in path.read_text().split("&"))
    }
    | {"Latitude", "Longitude", "Label", "Address", "ButtonText", "ButtonPayload", "MediaUrl1"}
    | {"OriginalRepliedMessageSid", "Forwarded", "ErrorMessage", "ReferralSourceId", "Body"}
)
TWILIO_VALUES = (
    st.text(max_size=20)
    | st.sampled_from(["0", "1", "10", "99999999999999999999999", "-1", "1e309", "nan"])
    | st.sampled_from(["whatsapp:+5511987654321", "image/jpeg", "https://x/ME1", "true"])
    | st.sampled_from(["delivered", "failed", "undelivered", "read", "queued", "sent"])
)


@PROPERTY
@given(
    fields=st.dictionaries(
        st.sampled_from(TWILIO_FIELDS) | st.text(max_size=8), TWILIO_VALUES, max_size=12
    )
)
def test_twilio_parse_arbitrary_form_fields(fields: dict[str, str]) -> None:
    check_parse("twilio", post(URL, urlencode(fields).encode(), FORM))


SIGNATURE_HEADERS = ("x-hub-signature-256", "x-twilio-signature")


@pytest.mark.parametrize("provider", PROVIDER_DIRS)
@PROPERTY
@given(
    body=st.binary(max_size=256),
    query=st.dictionaries(
        st.sampled_from(["token", "bodySHA256"]) | st.text(max_size=5), st.text()
    ),
    headers=st.dictionaries(st.sampled_from(SIGNATURE_HEADERS), st.text(max_size=80)),
    content_type=st.sampled_from([JSON, FORM, ""]),
)
def test_verify_refuses_with_401_only(
    provider: str,
    body: bytes,
    query: dict[str, str],
    headers: dict[str, str],
    content_type: str,
) -> None:
    url = "https://hub.example.com/in/src?" + urlencode(query)
    request = post(url, body, content_type, headers)
    try:
        SOURCES[provider].verify(request)
    except HttpError as exc:
        assert exc.status == 401, exc
    else:  # only the right token can pass, and hypothesis will not guess it
        assert query.get("token") == QUERY_TOKEN


@pytest.mark.parametrize("provider", PROVIDER_DIRS)
@PROPERTY
@given(
    query=st.dictionaries(
        st.sampled_from(["hub.mode", "hub.verify_token", "hub.challenge"]), st.text()
    )
)
def test_handshake_answers_or_refuses(provider: str, query: dict[str, str]) -> None:
    request = InboundRequest.build("GET", "https://hub.example.com/in/src?" + urlencode(query))
    handshake: Callable[[InboundRequest], str] = SOURCES[provider].handshake
    try:
        answer = handshake(request)
    except HttpError as exc:
        assert exc.status in (400, 403, 405), exc
    else:
        assert answer == query["hub.challenge"]
        assert query["hub.verify_token"] == WA_VERIFY_TOKEN

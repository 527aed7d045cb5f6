"""Twilio (contracts §2): X-Twilio-Signature vectors and every fixture's normalization."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest

from estafeta.errors import HttpError
from estafeta.ingress.providers import InboundRequest, TwilioSource
from estafeta.ingress.providers.twilio import form, signature
from estafeta.testing.fakes.twilio import twilio_signature
from tests.unit.providers.support import (
    FORM,
    TWILIO_AUTH_TOKEN,
    fixture_bytes,
    fixture_json,
    post,
    source,
    subset,
)

URL = "https://hub.example.com/in/twilio-sol"
INBOUND_SID = "SM4c9e1f7a2b8d3e6f0a5c9b1d7e3f2a84"
MEDIA_SID = "MM7a2e9c4b1f8d6e3a0c5b9d2f7e1a4c63"
DELIVERED_SID = "SM9d2b7e4f1a6c8e3b0f5d9a2c7e4b1f68"
FAILED_SID = "SMe1c7a4f9b2d6e8a3c0f7b5d1e9a2c4b6"
MEDIA_URL = (
    "https://api.twilio.com/2010-04-01/Accounts/AC8f3e2d1c0b9a87654321fedcba098765/Messages/"
    f"{MEDIA_SID}/Media/ME2b8f4d1a9c7e3b6f0d5a8c2e9b1f7d40"
)
# contracts §2.1: Twilio's published vector.
PUBLISHED_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PUBLISHED_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}
PUBLISHED_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def twilio(**keys: str) -> TwilioSource:
    return TwilioSource(source("twilio", auth_token=TWILIO_AUTH_TOKEN, **keys))


def parse(body: bytes | dict[str, str]) -> list[Any]:
    raw = body if isinstance(body, bytes) else urlencode(body).encode()
    return twilio().parse(post(URL, raw, FORM))


MEDIA_NO_CAPTION = {
    "id": "ME5d1a7c3e9f2b6d8a0c4e7b1f9d3a6c52",
    "mime_type": "image/jpeg",
    "sha256": None,
    "caption": None,
    "filename": None,
    "url": (
        "https://api.twilio.com/2010-04-01/Accounts/AC8f3e2d1c0b9a87654321fedcba098765/"
        "Messages/MM3c8f1e6a9d2b7c4e0a5f8b1d6e3a9c27/Media/ME5d1a7c3e9f2b6d8a0c4e7b1f9d3a6c52"
    ),
    "voice": None,
}

CASES: list[tuple[str, list[tuple[str, str, dict[str, Any]]]]] = [
    (
        "inbound_text.form",
        [
            (
                "message.received",
                INBOUND_SID,
                {
                    "channel": "whatsapp",
                    "provider": "twilio",
                    "message_id": INBOUND_SID,
                    "conversation_id": "5511987654321",
                    "from": "+5511987654321",
                    "to": "+551140028922",
                    "contact_name": "Maria Silva",
                    "kind": "text",
                    "text": "Olá! Gostaria de remarcar minha consulta de quinta-feira.",
                    "account_sid": "AC8f3e2d1c0b9a87654321fedcba098765",
                },
            )
        ],
    ),
    (
        "inbound_media.form",
        [
            (
                "message.received",
                MEDIA_SID,
                {
                    "message_id": MEDIA_SID,
                    "from": "+5511987654321",
                    "contact_name": "Maria Silva",
                    "kind": "image",
                    "text": "Foto da receita",
                    "media": {
                        "id": "ME2b8f4d1a9c7e3b6f0d5a8c2e9b1f7d40",
                        "mime_type": "image/jpeg",
                        "sha256": None,
                        "caption": "Foto da receita",
                        "filename": None,
                        "url": MEDIA_URL,
                        "voice": None,
                    },
                },
            )
        ],
    ),
    (
        # Twilio sends `Body` empty for media without a caption: null, as every provider.
        "inbound_media_no_caption.form",
        [
            (
                "message.received",
                "MM3c8f1e6a9d2b7c4e0a5f8b1d6e3a9c27",
                {"kind": "image", "text": None, "media": {**MEDIA_NO_CAPTION}},
            )
        ],
    ),
    (
        "status_delivered.form",
        [
            (
                "message.status",
                f"{DELIVERED_SID}:delivered",
                {
                    "channel": "whatsapp",
                    "provider": "twilio",
                    "status": "delivered",
                    "provider_status": "delivered",
                    "message_id": DELIVERED_SID,
                    "recipient": "+5511987654321",
                    "conversation_id": "5511987654321",
                    "error": "<absent>",
                },
            )
        ],
    ),
    (
        "status_failed.form",
        [
            (
                "message.status",
                f"{FAILED_SID}:failed",
                {
                    "status": "failed",
                    "message_id": FAILED_SID,
                    "error": {"code": 63016, "title": None, "message": None, "details": None},
                },
            )
        ],
    ),
]


@pytest.mark.parametrize(("name", "expected"), CASES, ids=[name for name, _ in CASES])
def test_fixture_normalizes(name: str, expected: list[tuple[str, str, dict[str, Any]]]) -> None:
    events = parse(fixture_bytes(f"twilio/{name}"))
    assert [(e.type, e.idempotency_key, e.occurred_at) for e in events] == [
        (event_type, key, None) for event_type, key, _ in expected
    ]
    for event, (*_, data) in zip(events, expected, strict=True):
        assert subset(event.data, data) == data
        assert event.raw is not None


STATUS_BASE = {"MessageSid": "SM1", "AccountSid": "AC1", "To": "whatsapp:+5511987654321"}


@pytest.mark.parametrize(
    ("twilio_status", "ours"),
    [
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("read", "read"),
        ("failed", "failed"),
        ("undelivered", "failed"),
        ("canceled", "failed"),
        ("queued", None),
        ("sending", None),
        ("accepted", None),
        ("scheduled", None),
        ("receiving", None),
        ("received", None),
        ("partially_delivered", None),
        ("something_new", None),
    ],
)
def test_status_mapping(twilio_status: str, ours: str | None) -> None:
    events = parse({**STATUS_BASE, "MessageStatus": twilio_status})
    assert [e.data["status"] for e in events] == ([] if ours is None else [ours])
    if ours is not None:
        assert events[0].idempotency_key == f"SM1:{twilio_status}"
        assert events[0].data["provider_status"] == twilio_status


def test_a_status_of_a_message_the_hub_sent_carries_its_id_from_the_callback_url() -> None:
    """The hub's send asks Twilio to call back `/in/{source}?sent_message_id=msg_…`, and
    Twilio signs the URL it calls: the status says which sent message it is about, as a
    WhatsApp Cloud status does. A callback to the plain URL (a message sent from elsewhere,
    Twilio's console callback) or with a value that is no message id of ours says nothing."""
    ours = "msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F"
    body = urlencode({**STATUS_BASE, "MessageStatus": "delivered"}).encode()
    (event,) = twilio().parse(post(f"{URL}?sent_message_id={ours}", body, FORM))
    assert event.data["sent_message_id"] == ours
    for url in (URL, f"{URL}?sent_message_id=outbox:42", f"{URL}?other={ours}"):
        (event,) = twilio().parse(post(url, body, FORM))
        assert "sent_message_id" not in event.data
    (inbound,) = twilio().parse(
        post(
            f"{URL}?sent_message_id={ours}",
            urlencode({"MessageSid": "SM2", "Body": "oi"}).encode(),
            FORM,
        )
    )
    assert "sent_message_id" not in inbound.data  # a customer's message is no status of ours


def test_undelivered_carries_code_and_message() -> None:
    fields = {**STATUS_BASE, "MessageStatus": "undelivered", "ErrorCode": "30008"}
    (event,) = parse({**fields, "ErrorMessage": "Unknown error"})
    assert event.data["error"] == {
        "code": 30008,
        "title": None,
        "message": "Unknown error",
        "details": None,
    }


def test_an_inbound_message_is_not_taken_for_a_status() -> None:
    (event,) = parse({"MessageSid": "SM2", "MessageStatus": "received", "Body": "oi"})
    assert (event.type, event.data["text"]) == ("message.received", "oi")


def test_location_button_and_reply_context() -> None:
    base = {"MessageSid": "SM3", "From": "whatsapp:+5511987654321", "NumMedia": "0", "Body": ""}
    (location,) = parse(
        {**base, "Latitude": "-23.56", "Longitude": "-46.65", "Label": "MASP", "Address": "Av."}
    )
    assert location.data["kind"] == "location"
    assert location.data["location"] == {
        "latitude": -23.56,
        "longitude": -46.65,
        "name": "MASP",
        "address": "Av.",
        "url": None,
    }
    (button,) = parse(
        {
            **base,
            "Body": "Confirmar",
            "ButtonText": "Confirmar",
            "ButtonPayload": "confirm-42",
            "OriginalRepliedMessageSid": "SM0",
        }
    )
    assert button.data["kind"] == "button"
    assert button.data["button"] == {"text": "Confirmar", "payload": "confirm-42"}
    assert button.data["context"] == {"message_id": "SM0", "from": None}


def test_every_media_of_a_message_is_kept_not_only_the_first() -> None:
    """Twilio posts a message with several pictures as one webhook (`NumMedia` 2,
    `MediaUrl0`, `MediaUrl1`): `media` is the first, as for one, and `media_items` all."""
    account = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media"
    (event,) = parse(
        {
            "MessageSid": "MM1",
            "From": "whatsapp:+5511987654321",
            "Body": "",
            "NumMedia": "2",
            "MediaUrl0": f"{account}/ME1",
            "MediaContentType0": "image/jpeg",
            "MediaUrl1": f"{account}/ME2",
            "MediaContentType1": "application/pdf",
        }
    )
    assert (event.data["kind"], event.data["text"]) == ("image", None)
    assert event.data["media"]["id"] == "ME1"
    items = event.data["media_items"]
    assert [(m["id"], m["mime_type"]) for m in items] == [
        ("ME1", "image/jpeg"),
        ("ME2", "application/pdf"),
    ]
    (single,) = parse({"MessageSid": "MM2", "NumMedia": "1", "MediaUrl0": f"{account}/ME3"})
    assert "media_items" not in single.data


@pytest.mark.parametrize(
    ("field", "key", "value"),
    [
        ("FlowData", "flow_data", '{"flow_token":"appt-1","date":"2025-07-03","time":"09:00"}'),
        (
            "InteractiveData",
            "interactive_data",
            '{"type":"list_reply","list_reply":{"id":"slot-9","title":"9h"}}',
        ),
    ],
)
def test_what_a_flow_or_an_interactive_reply_says_reaches_the_event(
    field: str, key: str, value: str
) -> None:
    """contracts §2.2: JSON strings. They were dropped: a booking form sent through Twilio
    reached destinations as an empty `unsupported` message (the Cloud reader keeps a Flow's
    `response_json`). Kept as the strings Twilio sent."""
    base = {"MessageSid": "SM4", "From": "whatsapp:+5511987654321", "NumMedia": "0"}
    (event,) = parse({**base, "Body": "Sent", "MessageType": "interactive", field: value})
    assert event.data[key] == value


def test_a_form_key_given_twice_reads_its_first_value_and_keeps_both_in_raw() -> None:
    """Twilio sends each of its parameters once; a repeated one (signed, so Twilio's) reads
    its first value, as a repeated query parameter does, and the stored raw keeps both."""
    body = b"MessageSid=SM6&From=whatsapp%3A%2B5511987654321&NumMedia=0&Body=Sim&Body=N%C3%A3o"
    (event,) = twilio().parse(post(URL, body, FORM))
    assert (event.data["kind"], event.data["text"]) == ("text", "Sim")
    assert orjson.loads(event.raw or "")["Body"] == ["Sim", "Não"]


def test_sms_and_unknown_message_types() -> None:
    (sms,) = parse({"MessageSid": "SM4", "From": "+14155550100", "Body": "hi", "NumMedia": "0"})
    assert (sms.data["channel"], sms.data["from"]) == ("sms", "+14155550100")
    (odd,) = parse({"MessageSid": "SM5", "Body": "", "MessageType": "poll"})
    assert odd.data["kind"] == "unsupported"
    assert odd.data["unsupported"] == {"type": "poll", "part": None}


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"MessageSid=SM1", "application/json", 415),
        (b"MessageSid=SM1", None, 415),
        (b"Body=hello", FORM, 400),
        (b"MessageSid=SM1&Body=%ff", FORM, 400),
        (b"MessageSid=\xff", FORM, 400),
    ],
)
def test_bad_bodies(body: bytes, content_type: str | None, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        twilio().parse(post(URL, body, content_type))
    assert caught.value.status == status


# Signature (contracts §2.1).


def test_published_vector() -> None:
    params = {name: [value] for name, value in PUBLISHED_PARAMS.items()}
    assert signature(b"12345", PUBLISHED_URL, params) == PUBLISHED_SIGNATURE


def test_fixture_vector() -> None:
    vector = fixture_json("twilio/signature_vector.json")
    body = fixture_bytes(f"twilio/{vector['body_file']}")
    assert {name: values[0] for name, values in (form(body) or {}).items()} == vector["params"]
    assert vector["auth_token"] == TWILIO_AUTH_TOKEN
    request = post(vector["url"], body, FORM, {vector["header_name"]: vector["expected_signature"]})
    twilio().verify(request)


def published_request(
    url: str, signature_header: str | None = PUBLISHED_SIGNATURE
) -> InboundRequest:
    headers = {} if signature_header is None else {"X-Twilio-Signature": signature_header}
    return post(url, urlencode(PUBLISHED_PARAMS).encode(), FORM, headers)


def published_source(**keys: str) -> TwilioSource:
    return TwilioSource(source("twilio", auth_token="12345", **keys))


def test_url_with_a_query_string() -> None:
    published_source().verify(published_request(PUBLISHED_URL))
    # The query is signed: reordering or changing it breaks the signature.
    with pytest.raises(HttpError):
        published_source().verify(published_request("https://mycompany.com/myapp.php?bar=2&foo=1"))


def test_public_url_replaces_the_url_the_hub_sees() -> None:
    behind_proxy = "http://10.0.0.7:8080/myapp.php?foo=1&bar=2"
    with pytest.raises(HttpError) as caught:
        published_source().verify(published_request(behind_proxy))
    assert caught.value.error == "invalid_signature"
    published_source(public_url="https://mycompany.com").verify(published_request(behind_proxy))
    published_source(public_url="https://mycompany.com/").verify(published_request(behind_proxy))
    vector = fixture_json("twilio/signature_vector.json")
    request = post(
        "http://127.0.0.1:8080/webhooks/twilio/whatsapp",
        fixture_bytes("twilio/inbound_text.form"),
        FORM,
        {"X-Twilio-Signature": vector["expected_signature"]},
    )
    twilio(public_url="https://hub.example.com.br").verify(request)


@pytest.mark.parametrize(
    "url",
    [
        "https://mycompany.com:443/myapp.php?foo=1&bar=2",
        "https://mycompany.com:8443/myapp.php?foo=1&bar=2",
    ],
)
def test_ports_are_accepted_with_and_without(url: str) -> None:
    published_source().verify(published_request(url))
    # …and a signature made over the URL with the port matches the URL without it.
    with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2"
    params = {name: [value] for name, value in PUBLISHED_PARAMS.items()}
    signed = signature(b"12345", with_port, params)
    published_source().verify(published_request(PUBLISHED_URL, signed))


def rejection(verifier: TwilioSource, request: InboundRequest) -> tuple[int, str]:
    with pytest.raises(HttpError) as caught:
        verifier.verify(request)
    return caught.value.status, caught.value.error


def test_wrong_token_tampered_body_and_missing_header() -> None:
    invalid = (401, "invalid_signature")
    assert rejection(twilio(), published_request(PUBLISHED_URL)) == invalid
    tampered = {**PUBLISHED_PARAMS, "Digits": "9999"}
    request = post(
        PUBLISHED_URL,
        urlencode(tampered).encode(),
        FORM,
        {"X-Twilio-Signature": PUBLISHED_SIGNATURE},
    )
    assert rejection(published_source(), request) == invalid
    extra = post(
        PUBLISHED_URL,
        urlencode({**PUBLISHED_PARAMS, "Extra": "1"}).encode(),
        FORM,
        {"X-Twilio-Signature": PUBLISHED_SIGNATURE},
    )
    assert rejection(published_source(), extra) == invalid
    missing = (401, "missing_signature")
    assert rejection(published_source(), published_request(PUBLISHED_URL, None)) == missing
    assert rejection(published_source(), published_request(PUBLISHED_URL, "ü")) == invalid


def test_json_bodies_are_signed_through_body_sha256() -> None:
    body = b'{"hello": "world"}'
    url = f"https://mycompany.com/hook?bodySHA256={hashlib.sha256(body).hexdigest()}"
    header = {"X-Twilio-Signature": signature(b"12345", url, {})}
    published_source().verify(post(url, body, "application/json", header))
    with pytest.raises(HttpError):
        published_source().verify(post(url, b'{"hello": "moon"}', "application/json", header))


@pytest.mark.parametrize("content_type", ["text/plain", FORM, None])
def test_body_sha256_is_checked_whatever_the_content_type(content_type: str | None) -> None:
    # A URL signed with `bodySHA256` authenticates only the body with that hash: replayed
    # with another body under another Content-Type, it must not pass as signed.
    body = b'{"hello": "world"}'
    url = f"https://mycompany.com/hook?bodySHA256={hashlib.sha256(body).hexdigest()}"
    header = {"X-Twilio-Signature": signature(b"12345", url, {})}
    for forged in (b"&", b"anything else"):
        request = post(url, forged, content_type, header)
        assert rejection(published_source(), request) == (401, "invalid_signature")


def test_multi_valued_parameters_are_signed_in_sorted_order() -> None:
    body = b"B=2&A=z&A=y"
    expected = signature(b"12345", PUBLISHED_URL, {"A": ["y", "z"], "B": ["2"]})
    assert expected == signature(b"12345", PUBLISHED_URL, {"B": ["2"], "A": ["z", "y"]})
    published_source().verify(post(PUBLISHED_URL, body, FORM, {"X-Twilio-Signature": expected}))


def test_a_repeated_value_is_signed_once_per_copy() -> None:
    """contracts §2.1: a multi-valued name is appended once per value, values sorted (its
    snippet: `for v in sorted(params.getlist(k))`; twilio-python@dd225d4's validator does
    `for value in sorted(values)`): two identical copies are both in the signed string. The
    hub's validator and the fake's signer agree, so a fake-signed request with a repeated
    `MediaUrl` passes and one signed over a single copy does not."""
    body = b"MediaUrl=https%3A%2F%2Ff%2Fa&B=2&MediaUrl=https%3A%2F%2Ff%2Fa"
    signed = PUBLISHED_URL + "B2" + "MediaUrlhttps://f/a" * 2
    expected = base64.b64encode(hmac.new(b"12345", signed.encode(), hashlib.sha1).digest())
    params = {"B": ["2"], "MediaUrl": ["https://f/a", "https://f/a"]}
    assert signature(b"12345", PUBLISHED_URL, params) == expected.decode()
    assert twilio_signature("12345", PUBLISHED_URL, params) == expected.decode()
    header = {"X-Twilio-Signature": expected.decode()}
    published_source().verify(post(PUBLISHED_URL, body, FORM, header))
    once = signature(b"12345", PUBLISHED_URL, {"B": ["2"], "MediaUrl": ["https://f/a"]})
    request = post(PUBLISHED_URL, body, FORM, {"X-Twilio-Signature": once})
    assert rejection(published_source(), request) == (401, "invalid_signature")


def test_twilio_has_no_handshake() -> None:
    with pytest.raises(HttpError) as caught:
        twilio().handshake(InboundRequest.build("GET", URL))
    assert (caught.value.status, caught.value.headers) == (405, {"Allow": "POST"})

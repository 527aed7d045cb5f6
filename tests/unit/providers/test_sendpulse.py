"""SendPulse (contracts §9): the URL token and every fixture's normalization."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from estafeta.errors import HttpError
from estafeta.ingress.providers import InboundRequest, SendPulseSource
from tests.unit.providers.support import (
    QUERY_TOKEN,
    fixture_bytes,
    fixture_json,
    post,
    source,
    subset,
)

URL = f"https://hub.example.com/in/sendpulse-sol?token={QUERY_TOKEN}"
BOT_ID = "66a1f2c3d4e5f60718293a4b"


def sendpulse() -> SendPulseSource:
    return SendPulseSource(source("sendpulse", token=QUERY_TOKEN))


def parse(document: Any, content_type: str | None = "application/json") -> list[Any]:
    body = document if isinstance(document, bytes) else orjson.dumps(document)
    return sendpulse().parse(post(URL, body, content_type))


CASES: list[tuple[str, list[tuple[str, str, int, dict[str, Any]]]]] = [
    (
        "incoming_message.json",
        [
            (
                "message.received",
                f"{BOT_ID}:66b2e41c9f1a2b3c4d5e6f70",
                1751371201123,
                {
                    "channel": "whatsapp",
                    "provider": "sendpulse",
                    "message_id": "66b2e41c9f1a2b3c4d5e6f70",
                    "conversation_id": "5511987654321",
                    "from": "+5511987654321",
                    "to": "+551140028922",
                    "contact_name": "Maria Silva",
                    "contact_id": "66b2e3f4a5b6c7d8e9f00112",
                    "bot_id": BOT_ID,
                    "kind": "text",
                    "text": "Olá! Gostaria de agendar uma consulta.",
                },
            )
        ],
    ),
    (
        # An image with an empty caption: `text` and `caption` null, as for every provider.
        # The bot names its number in `channel_data.phone` (the Bot schema's, an integer)
        # and gives no `external_id`: that number is `to` (it was null).
        "incoming_image_no_caption.json",
        [
            (
                "message.received",
                f"{BOT_ID}:66b2e4a79f1a2b3c4d5e6f81",
                1751371561234,
                {
                    "to": "+551140028922",
                    "bot_id": BOT_ID,
                    "kind": "image",
                    "text": None,
                    "media": {
                        "id": "1283746501928411",
                        "mime_type": "image/jpeg",
                        "sha256": None,
                        "caption": None,
                        "filename": None,
                        "url": None,
                        "voice": None,
                    },
                },
            )
        ],
    ),
    ("outgoing_message.json", []),
]


@pytest.mark.parametrize(("name", "expected"), CASES, ids=[name for name, _ in CASES])
def test_fixture_normalizes(
    name: str, expected: list[tuple[str, str, int, dict[str, Any]]]
) -> None:
    events = parse(fixture_bytes(f"sendpulse/{name}"))
    assert [(e.type, e.idempotency_key, e.occurred_at) for e in events] == [
        (event_type, key, occurred_at) for event_type, key, occurred_at, _ in expected
    ]
    for event, (*_, data) in zip(events, expected, strict=True):
        assert subset(event.data, data) == data
        assert orjson.loads(event.raw or "") == fixture_json(f"sendpulse/{name}")[0]


def incoming() -> dict[str, Any]:
    document: dict[str, Any] = fixture_json("sendpulse/incoming_message.json")[0]
    return document


def test_a_bare_object_is_accepted_and_items_are_independent() -> None:
    (single,) = parse(incoming())
    assert single.data["text"] == "Olá! Gostaria de agendar uma consulta."
    second = incoming()
    second["info"]["message"]["id"] = "66b2e41c9f1a2b3c4d5e6f99"
    outgoing = fixture_json("sendpulse/outgoing_message.json")[0]
    events = parse([incoming(), outgoing, {"title": "new_subscriber"}, "junk", second])
    assert [e.data["message_id"] for e in events] == [
        "66b2e41c9f1a2b3c4d5e6f70",
        "66b2e41c9f1a2b3c4d5e6f99",
    ]


def test_the_content_type_is_not_required() -> None:
    assert len(parse(fixture_bytes("sendpulse/incoming_message.json"), "text/plain")) == 1
    assert len(parse(fixture_bytes("sendpulse/incoming_message.json"), None)) == 1


def test_cloud_message_shapes_pass_through() -> None:
    document = incoming()
    document["info"]["message"]["channel_data"]["message"] = {
        "type": "interactive",
        "id": "wamid.X",
        "context": {"id": "wamid.Y"},
        "interactive": {"type": "list_reply", "list_reply": {"id": "r1", "title": "9h"}},
    }
    (event,) = parse([document])
    expected = {
        "kind": "interactive",
        "text": "9h",
        "wamid": "wamid.X",
        "context": {"message_id": "wamid.Y", "from": None},
    }
    assert subset(event.data, expected) == expected


def test_without_the_passed_through_message_the_text_is_the_contact_s_last_message() -> None:
    # contracts §9.4: `channel_data.message` is an UNCONFIRMED inference, while receivers
    # read the customer's words from `contact.last_message`: without the first, the text
    # of the message must not be lost. Its kind stays unknown, as Twilio's unknown kinds do.
    document = incoming()
    del document["info"]["message"]["channel_data"]
    (event,) = parse([document])
    expected = {
        "message_id": "66b2e41c9f1a2b3c4d5e6f70",
        "kind": "unsupported",
        "text": "Olá! Gostaria de agendar uma consulta.",
    }
    assert subset(event.data, expected) == expected


def test_a_passed_through_message_s_own_words_win_over_the_last_message() -> None:
    document = incoming()
    document["contact"]["last_message"] = "an older text"
    document["info"]["message"]["channel_data"]["message"] = {
        "type": "image",
        "image": {"id": "1283746501928374", "mime_type": "image/jpeg"},
    }
    (event,) = parse([document])
    assert (event.data["kind"], event.data["text"]) == ("image", None)


def test_without_a_message_id_the_key_is_a_stable_hash() -> None:
    document = incoming()
    del document["info"]
    first, second = parse([document])[0], parse([document])[0]
    assert first.idempotency_key == second.idempotency_key
    assert (first.idempotency_key or "").startswith("sha256:")
    assert first.data["kind"] == "unsupported"
    other = {**document, "date": document["date"] + 1}
    assert parse([other])[0].idempotency_key != first.idempotency_key


def test_a_date_in_seconds_is_read_as_seconds() -> None:
    (event,) = parse([{**incoming(), "date": 1751371201}])
    assert event.occurred_at == 1751371201000


@pytest.mark.parametrize("body", [b"", b"not json", b'"a string"', b"42", b"null"])
def test_bad_bodies(body: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        parse(body)
    assert caught.value.status == 400


def test_empty_array_gives_no_events() -> None:
    assert parse([]) == []


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("https://hub.example.com/in/sendpulse-sol", "missing_token"),
        ("https://hub.example.com/in/sendpulse-sol?token=wrong", "invalid_token"),
    ],
)
def test_token_refusals(url: str, error: str) -> None:
    with pytest.raises(HttpError) as caught:
        sendpulse().verify(post(url, b"[]"))
    assert (caught.value.status, caught.value.error) == (401, error)


def test_token_accepted_and_no_handshake() -> None:
    sendpulse().verify(post(URL, fixture_bytes("sendpulse/incoming_message.json")))
    with pytest.raises(HttpError) as caught:
        sendpulse().handshake(InboundRequest.build("GET", URL))
    assert caught.value.status == 405

"""Z-API (contracts §3): the URL token and every fixture's normalization."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from estafeta.errors import HttpError
from estafeta.ingress.providers import InboundRequest, ZApiSource
from tests.unit.providers.support import (
    QUERY_TOKEN,
    fixture_bytes,
    fixture_json,
    post,
    source,
    subset,
)

URL = f"https://hub.example.com/in/zapi-sol?token={QUERY_TOKEN}"
OUTBOUND_ID = "3EB0F1A9C2D47E8B6A15"
INSTANCE = "3D9F1A2B4C6E8F0A1B2C3D4E5F6A7B8C"
MEDIA_BASE = f"https://f004.backblazeb2.com/file/temp-file-download/instances/{INSTANCE}/"


def zapi() -> ZApiSource:
    return ZApiSource(source("zapi", token=QUERY_TOKEN))


def parse(document: Any) -> list[Any]:
    body = document if isinstance(document, bytes) else orjson.dumps(document)
    return zapi().parse(post(URL, body))


CASES: list[tuple[str, list[tuple[str, str, int | None, dict[str, Any]]]]] = [
    (
        "received_text.json",
        [
            (
                "message.received",
                "3EB0A7C19F4D2E8B6C30",
                1751371200123,
                {
                    "channel": "whatsapp",
                    "provider": "zapi",
                    "message_id": "3EB0A7C19F4D2E8B6C30",
                    "conversation_id": "5511987654321",
                    "from": "+5511987654321",
                    "to": "+551140028922",
                    "contact_name": "Maria Silva",
                    "instance_id": INSTANCE,
                    "sender_lid": "81896604192873@lid",
                    "kind": "text",
                    "text": "Oi, boa tarde! Vocês abrem no sábado?",
                },
            )
        ],
    ),
    (
        "received_image.json",
        [
            (
                "message.received",
                "3EB05D2F8A1C9E7B4D62",
                1751371264321,
                {
                    "from": "+5511987654321",
                    "kind": "image",
                    "text": "Foto da carteirinha do convênio",
                    "media": {
                        "id": None,
                        "mime_type": "image/jpeg",
                        "sha256": None,
                        "caption": "Foto da carteirinha do convênio",
                        "filename": None,
                        "url": f"{MEDIA_BASE}3EB05D2F8A1C9E7B4D62.jpeg",
                        "voice": None,
                    },
                },
            )
        ],
    ),
    (
        # A video sent with an empty caption: no words, `text` and `caption` null (they were
        # "", where Twilio's empty `Body` read as null).
        "received_video_empty_caption.json",
        [
            (
                "message.received",
                "3EB07B3E5C9A1D2F8E40",
                1751371384567,
                {
                    "kind": "video",
                    "text": None,
                    "media": {
                        "id": None,
                        "mime_type": "video/mp4",
                        "sha256": None,
                        "caption": None,
                        "filename": None,
                        "url": f"{MEDIA_BASE}3EB07B3E5C9A1D2F8E40.mp4",
                        "voice": None,
                    },
                },
            )
        ],
    ),
    (
        # A customer WhatsApp names by linked id only (`@lid`), no number: the id keys the
        # conversation and is `sender_lid`; `from` is null, never digits made up of the id.
        "received_lid.json",
        [
            (
                "message.received",
                "3EB0D9A41C7E2B5F6A83",
                1751371444789,
                {
                    "conversation_id": "81896604192873@lid",
                    "from": None,
                    "sender_lid": "81896604192873@lid",
                    "to": "+551140028922",
                    "contact_name": "Maria Silva",
                    "kind": "text",
                    "text": "Oi, queria remarcar minha consulta",
                },
            )
        ],
    ),
    (
        # A group member known by linked id only: who wrote was nowhere in `data`.
        "received_group_lid.json",
        [
            (
                "message.received",
                "3EB04F8E2A6C1D9B7E52",
                1751371505123,
                {
                    "conversation_id": "120363019502650977-group",
                    "from": None,
                    "sender_lid": "27418349012345@lid",
                    "contact_name": "João Pereira",
                    "group": {"id": "120363019502650977-group", "name": "Família"},
                    "text": "Alguém sabe o horário de sábado?",
                },
            )
        ],
    ),
    # A post of a WhatsApp channel the business follows: not a customer's message.
    ("received_newsletter.json", []),
    (
        "message_status.json",
        [
            (
                "message.status",
                f"{OUTBOUND_ID}:READ",
                1751371295000,
                {
                    "channel": "whatsapp",
                    "provider": "zapi",
                    "status": "read",
                    "provider_status": "READ",
                    "message_id": OUTBOUND_ID,
                    "recipient": "+5511987654321",
                    "conversation_id": "5511987654321",
                },
            )
        ],
    ),
    (
        "received_from_ad.json",
        [
            (
                "message.received",
                "3EB0C4E7A19B2D5F8C61",
                1751371500456,
                {
                    "from": "+5511912345678",
                    "contact_name": "João Pereira",
                    "kind": "text",
                    "text": "Olá! Vi o anúncio do check-up, como agendo?",
                    # The ad the customer came from, named as WhatsApp Cloud's `referral`
                    # and Twilio's `Referral*` are: which campaign brought the lead.
                    "referral": {
                        "source_url": "https://fb.me/3kQ8xZb2c",
                        "source_id": "120211234567890123",
                        "source_type": "ad",
                        "body": "Agende seu check-up com 20% de desconto",
                        "headline": "Check-up completo em julho",
                        "thumbnail_url": (
                            "https://scontent.whatsapp.net/v/t61.24694-24/"
                            "ad-thumb-120211234567890123.jpg"
                        ),
                    },
                },
            )
        ],
    ),
    (
        "delivery_callback.json",
        [
            (
                "message.status",
                f"{OUTBOUND_ID}:SENT",
                None,
                {
                    "status": "sent",
                    "message_id": OUTBOUND_ID,
                    "zaap_id": "39F2C7A18E4B6D0F2A9C5E1B7D3F8A60",
                    "recipient": "+5511987654321",
                    "error": "<absent>",
                },
            )
        ],
    ),
]


@pytest.mark.parametrize(("name", "expected"), CASES, ids=[name for name, _ in CASES])
def test_fixture_normalizes(
    name: str, expected: list[tuple[str, str, int | None, dict[str, Any]]]
) -> None:
    events = parse(fixture_bytes(f"zapi/{name}"))
    assert [(e.type, e.idempotency_key, e.occurred_at) for e in events] == [
        (event_type, key, occurred_at) for event_type, key, occurred_at, _ in expected
    ]
    for event, (*_, data) in zip(events, expected, strict=True):
        assert subset(event.data, data) == data
        assert orjson.loads(event.raw or "") == fixture_json(f"zapi/{name}")


def test_delivery_and_status_of_one_message_share_the_sent_key() -> None:
    status = {**fixture_json("zapi/message_status.json"), "status": "SENT"}
    (delivery,) = parse(fixture_bytes("zapi/delivery_callback.json"))
    (sent,) = parse(status)
    assert delivery.idempotency_key == sent.idempotency_key == f"{OUTBOUND_ID}:SENT"


@pytest.mark.parametrize("written", ["ReceivedCallBack", "receivedcallback"])
def test_a_callback_type_is_read_whatever_its_case(written: str) -> None:
    # Z-API's field table writes `ReceivedCallBack`; matched exactly, such a webhook was
    # answered 200 and stored nothing.
    document = fixture_json("zapi/received_text.json")
    [read] = parse({**document, "type": written})
    [expected] = parse(document)
    assert (read.type, read.idempotency_key, read.data) == (
        expected.type,
        expected.idempotency_key,
        expected.data,
    )


def test_from_me_is_an_echo_and_gives_no_event() -> None:
    assert parse({**fixture_json("zapi/received_text.json"), "fromMe": True}) == []


def test_a_channel_post_is_not_a_customer_message() -> None:
    """contracts §3.3 `isNewsletter`: a post of a channel (newsletter) the business follows
    reaches the received webhook too; taken as a customer's message, it opened a conversation
    named `…@newsletter` and reached the routes as if someone had written."""
    channel_post = {**fixture_json("zapi/received_text.json"), "isNewsletter": True}
    assert parse(channel_post) == []
    assert parse({**channel_post, "isNewsletter": False}) != []


@pytest.mark.parametrize("flag", ["fromMe", "isGroup", "isNewsletter"])
@pytest.mark.parametrize("value", ["true", "false", 1, 0, {}, []])
def test_a_routing_flag_that_is_not_a_boolean_is_refused_naming_it(flag: str, value: Any) -> None:
    """These flags decide whose message it is (contracts §3.3, documented booleans): read as
    absent, `"fromMe": "true"` made the business's own echo a customer message (a loop)."""
    with pytest.raises(HttpError) as caught:
        parse({**fixture_json("zapi/received_text.json"), flag: value})
    assert (caught.value.status, caught.value.error) == (400, "invalid_body")
    assert caught.value.detail.startswith(f"body.{flag}: expected true or false")


@pytest.mark.parametrize("flag", ["fromMe", "isGroup", "isNewsletter"])
def test_a_null_routing_flag_reads_as_false(flag: str) -> None:
    (event,) = parse({**fixture_json("zapi/received_text.json"), flag: None})
    assert event.data["from"] == "+5511987654321"


@pytest.mark.parametrize(
    ("zapi_status", "ours"),
    [
        ("SENT", "sent"),
        ("RECEIVED", "delivered"),
        ("READ", "read"),
        ("PLAYED", "read"),
        ("READ_BY_ME", None),
        ("PENDING", None),
        ("NEW", None),
    ],
)
def test_status_mapping_one_event_per_id(zapi_status: str, ours: str | None) -> None:
    callback = {"type": "MessageStatusCallback", "status": zapi_status, "ids": ["a", "b", "a"]}
    events = parse(callback)
    if ours is None:
        assert events == []
    else:
        assert [(e.data["message_id"], e.data["status"]) for e in events] == [
            ("a", ours),
            ("b", ours),
        ]
        assert [e.idempotency_key for e in events] == [f"a:{zapi_status}", f"b:{zapi_status}"]


def test_a_delivery_of_a_send_given_a_custom_id_names_it() -> None:
    """Z-API echoes a send's `customId` in its delivery callback: kept as `custom_id`, the
    sender's own reference; absent when the send had none."""
    (event,) = parse({**fixture_json("zapi/delivery_callback.json"), "customId": "pedido-77"})
    assert event.data["custom_id"] == "pedido-77"
    (plain,) = parse({**fixture_json("zapi/delivery_callback.json"), "customId": ""})
    assert "custom_id" not in plain.data


def test_failed_delivery() -> None:
    callback = {**fixture_json("zapi/delivery_callback.json"), "error": "number not on WhatsApp"}
    (event,) = parse(callback)
    assert (event.data["status"], event.idempotency_key) == ("failed", f"{OUTBOUND_ID}:FAILED")
    assert event.data["error"]["message"] == "number not on WhatsApp"


@pytest.mark.parametrize(
    ("error", "kept"),
    [
        ({"message": "not on WhatsApp"}, '{"message":"not on WhatsApp"}'),
        (["x"], '["x"]'),
        (True, "true"),
    ],
)
def test_a_delivery_error_that_is_not_a_string_is_still_a_failure(error: Any, kept: str) -> None:
    """contracts §3.4: `error` is a string. Read as absent, an error of another shape turned a
    failed send into `sent`."""
    (event,) = parse({**fixture_json("zapi/delivery_callback.json"), "error": error})
    assert (event.data["status"], event.idempotency_key) == ("failed", f"{OUTBOUND_ID}:FAILED")
    assert event.data["error"]["message"] == kept


@pytest.mark.parametrize("error", [None, "", False, {}, []])
def test_a_delivery_without_an_error_is_sent(error: Any) -> None:
    (event,) = parse({**fixture_json("zapi/delivery_callback.json"), "error": error})
    assert (event.data["status"], event.idempotency_key) == ("sent", f"{OUTBOUND_ID}:SENT")


def received(**content: Any) -> dict[str, Any]:
    base = fixture_json("zapi/received_text.json")
    del base["text"]
    return {**base, **content}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            {"audio": {"audioUrl": "https://a/1.ogg", "mimeType": "audio/ogg", "ptt": True}},
            {"kind": "audio", "text": None},
        ),
        (
            {"document": {"documentUrl": "https://a/1.pdf", "fileName": "a.pdf", "title": "A"}},
            {"kind": "document"},
        ),
        (
            {"location": {"latitude": -23.5, "longitude": -46.6, "address": "Av."}},
            {
                "kind": "location",
                "location": {
                    "latitude": -23.5,
                    "longitude": -46.6,
                    "name": None,
                    "address": "Av.",
                    "url": None,
                },
            },
        ),
        (
            {"reaction": {"value": "❤️", "referencedMessage": {"messageId": OUTBOUND_ID}}},
            {"kind": "reaction", "reaction": {"message_id": OUTBOUND_ID, "emoji": "❤️"}},
        ),
        (
            {"buttonsResponseMessage": {"buttonId": "yes", "message": "Sim"}},
            {
                "kind": "interactive",
                "text": "Sim",
                "interactive": {
                    "type": "button_reply",
                    "id": "yes",
                    "title": "Sim",
                    "description": None,
                },
            },
        ),
        (
            {"listResponseMessage": {"selectedRowId": "r1", "title": "9h", "message": "Agenda"}},
            {
                "interactive": {
                    "type": "list_reply",
                    "id": "r1",
                    "title": "9h",
                    "description": "Agenda",
                }
            },
        ),
        (
            {
                "contact": {
                    "displayName": "Ana",
                    "vCard": "BEGIN:VCARD",
                    "phones": ["5511977771234"],
                }
            },
            {
                "kind": "contacts",
                "contacts": [
                    {
                        "name": {"formatted_name": "Ana"},
                        "phones": [{"phone": "5511977771234"}],
                        "vcard": "BEGIN:VCARD",
                    }
                ],
            },
        ),
        (
            {"poll": {"question": "?"}, "externalAdReply": {"title": "ad"}},
            {"kind": "unsupported", "unsupported": {"type": "poll", "part": {"question": "?"}}},
        ),
        ({}, {"kind": "unsupported", "unsupported": {"type": None, "part": None}}),
        (
            # Z-API's "ligação perdida" example: a missed call is a ReceivedCallback with no
            # content block, told only by `notification`; it must not arrive as nothing.
            {
                "notification": "CALL_MISSED_VOICE",
                "notificationParameters": [],
                "callId": "F44E0E2011E7C784BB9A4AC11749C436",
            },
            {
                "kind": "unsupported",
                "text": None,
                "unsupported": {
                    "type": "notification",
                    "part": {
                        "notification": "CALL_MISSED_VOICE",
                        "notificationParameters": [],
                        "callId": "F44E0E2011E7C784BB9A4AC11749C436",
                    },
                },
            },
        ),
    ],
)
def test_content_blocks(content: dict[str, Any], expected: dict[str, Any]) -> None:
    (event,) = parse(received(**content))
    assert subset(event.data, expected) == expected


def test_a_group_member_whose_participant_phone_is_a_linked_id_keeps_it() -> None:
    """`participantPhone` itself a `…@lid`, no `participantLid`/`senderLid`: the only word
    of who wrote is that id, so it is `sender_lid`, and `from` is no number made of it."""
    document = fixture_json("zapi/received_group_lid.json")
    document.update(participantPhone="27418349012345@lid", participantLid=None, senderLid=None)
    (event,) = parse(document)
    assert (event.data["from"], event.data["sender_lid"]) == (None, "27418349012345@lid")


def test_audio_voice_and_document_filename() -> None:
    (audio,) = parse(received(audio={"audioUrl": "https://a/1.ogg", "ptt": True}))
    assert audio.data["media"]["voice"] is True
    assert audio.data["media"]["url"] == "https://a/1.ogg"
    (document,) = parse(received(document={"documentUrl": "https://a/1.pdf", "fileName": "a.pdf"}))
    assert document.data["media"]["filename"] == "a.pdf"


def test_group_message_reply_and_forward() -> None:
    callback = {
        **fixture_json("zapi/received_text.json"),
        "isGroup": True,
        "phone": "120363019502650977-group",
        "participantPhone": "5511912345678",
        "chatName": "Família",
        "senderName": "João",
        "referenceMessageId": OUTBOUND_ID,
        "forwarded": True,
    }
    (event,) = parse(callback)
    expected = {
        "conversation_id": "120363019502650977-group",
        "from": "+5511912345678",
        "contact_name": "João",
        "group": {"id": "120363019502650977-group", "name": "Família"},
        "context": {"message_id": OUTBOUND_ID, "from": None},
        "forwarded": True,
    }
    assert subset(event.data, expected) == expected


@pytest.mark.parametrize(
    "document",
    [
        {"type": "DisconnectedCallback", "instanceId": INSTANCE},
        {"type": "PresenceChatCallback", "status": "AVAILABLE"},
        {"type": "MessageStatusCallback", "status": "READ"},
        {"type": "DeliveryCallback", "phone": "5511987654321"},
    ],
)
def test_callbacks_with_nothing_to_report(document: dict[str, Any]) -> None:
    assert parse(document) == []


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b'{"type": "ReceivedCallback"}', "text/plain", 415),
        (b"{", "application/json", 400),
        (b'{"phone": "1"}', "application/json", 400),
        (b'[{"type": "ReceivedCallback"}]', "application/json", 400),
    ],
)
def test_bad_bodies(body: bytes, content_type: str, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        zapi().parse(post(URL, body, content_type))
    assert caught.value.status == status


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("https://hub.example.com/in/zapi-sol", "missing_token"),
        ("https://hub.example.com/in/zapi-sol?token=", "missing_token"),
        ("https://hub.example.com/in/zapi-sol?tok=x", "missing_token"),
        (f"https://hub.example.com/in/zapi-sol?token={QUERY_TOKEN.upper()}", "invalid_token"),
        (f"https://hub.example.com/in/zapi-sol?token={QUERY_TOKEN}x", "invalid_token"),
        ("https://hub.example.com/in/zapi-sol?token=%C3%BC", "invalid_token"),
    ],
)
def test_token_refusals(url: str, error: str) -> None:
    with pytest.raises(HttpError) as caught:
        zapi().verify(post(url, b"{}"))
    assert (caught.value.status, caught.value.error) == (401, error)


def test_token_accepted() -> None:
    zapi().verify(post(URL, fixture_bytes("zapi/received_text.json")))
    zapi().verify(post(f"{URL}&other=1", b"{}"))


@pytest.mark.parametrize("written", ["ab+cd/ef==", "ab%2Bcd%2Fef%3D%3D"])
def test_a_token_with_plus_signs_is_accepted_as_written_in_the_url(written: str) -> None:
    # A base64 token pasted into the webhook URL as it is: its `+` is the token's, not a
    # space (only HTML forms encode spaces as `+`).
    verifier = ZApiSource(source("zapi", token="ab+cd/ef=="))
    verifier.verify(post(f"https://hub.example.com/in/zapi-sol?token={written}", b"{}"))
    with pytest.raises(HttpError) as caught:
        verifier.verify(post("https://hub.example.com/in/zapi-sol?token=ab%20cd/ef==", b"{}"))
    assert caught.value.error == "invalid_token"


def test_zapi_has_no_handshake() -> None:
    with pytest.raises(HttpError) as caught:
        zapi().handshake(InboundRequest.build("GET", URL))
    assert caught.value.status == 405


def test_an_edit_is_never_taken_for_a_repeat_of_the_message_it_edits() -> None:
    """Z-API does not say whether an edit's callback reuses the edited message's `messageId`
    (contracts §3.3): if it does, keying it by that id alone would drop the edit as a
    duplicate. The same edit delivered twice is still one event."""
    original = received(text={"message": "Chego às 10h"})
    edit = {**original, "isEdit": True, "text": {"message": "Chego às 11h"}}
    other_edit = {**edit, "text": {"message": "Chego às 12h"}}
    (first,) = parse(original)
    (edited,) = parse(edit)
    (again,) = parse(edit)
    (edited_twice,) = parse(other_edit)
    assert edited.data["edited"] is True
    assert edited.data["message_id"] == first.data["message_id"]
    keys = {first.idempotency_key, edited.idempotency_key, edited_twice.idempotency_key}
    assert len(keys) == 3
    assert again.idempotency_key == edited.idempotency_key

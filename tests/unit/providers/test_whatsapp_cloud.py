"""WhatsApp Cloud (contracts §1): handshake, signature and every fixture's normalization."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import orjson
import pytest

from estafeta.errors import HttpError
from estafeta.ingress.providers import InboundRequest, WhatsAppCloudSource
from tests.unit.providers.support import (
    WA_APP_SECRET,
    WA_VERIFY_TOKEN,
    fixture_bytes,
    fixture_json,
    post,
    source,
    subset,
)

URL = "https://hub.example.com/in/wa-sol"
BUSINESS = {"to": "+551140028922", "phone_number_id": "114950281736452"}
MARIA = {
    "from": "+5511987654321",
    "conversation_id": "5511987654321",
    "contact_name": "Maria Silva",
}
OUTBOUND_WAMID = "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEjJGOUM0RTFBN0IzRDVBOEMwRQA="
REPLIED_WAMID = "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEjVCN0EyQzlFMUQ0RjZBOEIzMAA="
WAMID = {
    "text": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBNkYxQzlCMkU3RDQwQTg1QzEzAA==",
    "image": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBMEI3RTJEOUM0RjYxQThCMzUwAA==",
    "audio": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBQzREMTlFMDdCMkY4NUE2RTExAA==",
    "document": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBNTlFOEMxQjZEMjA3NEY5QTJDAA==",
    "location": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBMkU5RjdDNEIxRDhBMDY1RTM3AA==",
    "contacts": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBN0QzQjBFNUM5RjJBNDFENjg4AA==",
    "button": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBOEM2RjJCMUUwRDlBNTc0QjNFAA==",
    "list": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBNEI5RTFDN0QyRjBBOEU2QzU1AA==",
    "reaction": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBRjBCMkQ4RTZDNEExOTczNUQwAA==",
    "unsupported": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBMUQ1QzhFMkI5RjdBMDM2NEUyAA==",
    "failed": "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEjhEMUU2QjRGMkE5QzdFM0I1MQA=",
}
IMAGE_URL = (
    "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1283746501928374"
    "&ext=1751371560&hash=ATtk3Yb9QmVvZrXq1cLs0pWfHn2oE8uJx4aDgKi7Rm5TzA"
)
PRICING = {
    "billable": False,
    "pricing_model": "PMP",
    "type": "free_customer_service",
    "category": "service",
}


def wa() -> WhatsAppCloudSource:
    return WhatsAppCloudSource(
        source("whatsapp_cloud", app_secret=WA_APP_SECRET, verify_token=WA_VERIFY_TOKEN)
    )


def sign(body: bytes, secret: str = WA_APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def parse(document: Any) -> list[Any]:
    body = document if isinstance(document, bytes) else orjson.dumps(document)
    return wa().parse(post(URL, body))


def envelope(*values: dict[str, Any]) -> dict[str, Any]:
    """One entry with one change per value."""
    changes = [{"field": "messages", "value": value} for value in values]
    return {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": changes}]}


# One row per fixture: (file, [(type, idempotency key, occurred_at, data that matters)]).
EMPTY_CAPTION_MEDIA = {
    "id": "1283746501928399",
    "mime_type": "image/jpeg",
    "sha256": "hN2cXq4mTz8vB1kR6yLpW3sD9fG0aJ7eU5oI2nK8rQs=",
    "caption": None,
    "filename": None,
    "url": (
        "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1283746501928399"
        "&ext=1751371680&hash=ATu7Qe2Lm9XvZcTq4bNs1pWfHn2oE8uJx4aDgKi7Rm5TzB"
    ),
    "voice": None,
}

CASES: list[tuple[str, list[tuple[str, str, int, dict[str, Any]]]]] = [
    (
        "text.json",
        [
            (
                "message.received",
                WAMID["text"],
                1751371200000,
                {
                    **BUSINESS,
                    **MARIA,
                    "channel": "whatsapp",
                    "provider": "whatsapp_cloud",
                    "message_id": WAMID["text"],
                    "waba_id": "108372914455201",
                    "kind": "text",
                    "text": "Olá! Gostaria de agendar uma consulta para amanhã de manhã.",
                },
            )
        ],
    ),
    (
        "image.json",
        [
            (
                "message.received",
                WAMID["image"],
                1751371260000,
                {
                    **MARIA,
                    "kind": "image",
                    "text": "Segue a foto do pedido médico",
                    "media": {
                        "id": "1283746501928374",
                        "mime_type": "image/jpeg",
                        "sha256": "7Co2SslFEvqUM5v/HlUTnz/ks8L+zEcrWzSN2uH3y18=",
                        "caption": "Segue a foto do pedido médico",
                        "filename": None,
                        "url": IMAGE_URL,
                        "voice": None,
                    },
                },
            )
        ],
    ),
    (
        # An image sent with an empty caption: no words, so `text` and `caption` are null,
        # as Twilio's empty `Body` reads (they were "", and Twilio's null).
        "image_empty_caption.json",
        [
            (
                "message.received",
                "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBMEI5QzFENEU3RjJBNkI4QzUxAA==",
                1751371380000,
                {"kind": "image", "text": None, "media": {**EMPTY_CAPTION_MEDIA}},
            )
        ],
    ),
    (
        "audio.json",
        [
            (
                "message.received",
                WAMID["audio"],
                1751371320000,
                {"kind": "audio", "text": None},
            )
        ],
    ),
    (
        "document.json",
        [
            (
                "message.received",
                WAMID["document"],
                1751371380000,
                {"kind": "document", "text": "Comprovante de pagamento"},
            )
        ],
    ),
    (
        "location.json",
        [
            (
                "message.received",
                WAMID["location"],
                1751371440000,
                {
                    "kind": "location",
                    "location": {
                        "latitude": -23.561414,
                        "longitude": -46.655881,
                        "name": "MASP - Museu de Arte de São Paulo",
                        "address": "Av. Paulista, 1578 - Bela Vista, São Paulo - SP, 01310-200",
                        "url": "https://masp.org.br/",
                    },
                },
            )
        ],
    ),
    (
        "contacts.json",
        [("message.received", WAMID["contacts"], 1751371500000, {**MARIA, "kind": "contacts"})],
    ),
    (
        "interactive_button_reply.json",
        [
            (
                "message.received",
                WAMID["button"],
                1751371560000,
                {
                    "kind": "interactive",
                    "text": "Confirmar",
                    "interactive": {
                        "type": "button_reply",
                        "id": "confirmar_consulta",
                        "title": "Confirmar",
                        "description": None,
                    },
                    "context": {"message_id": REPLIED_WAMID, "from": "+551140028922"},
                },
            )
        ],
    ),
    (
        "interactive_list_reply.json",
        [
            (
                "message.received",
                WAMID["list"],
                1751371620000,
                {
                    "kind": "interactive",
                    "interactive": {
                        "type": "list_reply",
                        "id": "horario_2025-07-08_0900",
                        "title": "Ter 08/07 às 09:00",
                        "description": "Dra. Camila Rocha - Clínica Geral",
                    },
                    "context": {"message_id": REPLIED_WAMID, "from": "+551140028922"},
                },
            )
        ],
    ),
    (
        "reaction.json",
        [
            (
                "message.received",
                WAMID["reaction"],
                1751371680000,
                {"kind": "reaction", "reaction": {"message_id": OUTBOUND_WAMID, "emoji": "👍"}},
            )
        ],
    ),
    (
        "unsupported.json",
        [
            (
                "message.received",
                WAMID["unsupported"],
                1751371740000,
                {
                    **MARIA,
                    "kind": "unsupported",
                    "unsupported": {"type": "poll_creation", "part": {"type": "poll_creation"}},
                    "error": {
                        "code": 131051,
                        "title": "Message type unknown",
                        "message": "Message type unknown",
                        "details": "Message type is currently not supported.",
                    },
                },
            )
        ],
    ),
    (
        "status_sent.json",
        [
            (
                "message.status",
                f"{OUTBOUND_WAMID}:sent",
                1751371205000,
                {
                    "channel": "whatsapp",
                    "provider": "whatsapp_cloud",
                    "status": "sent",
                    "message_id": OUTBOUND_WAMID,
                    "recipient": "+5511987654321",
                    "conversation_id": "5511987654321",
                    "phone_number_id": "114950281736452",
                    "pricing": PRICING,
                    "biz_opaque_callback_data": "outbox:01J1ZK6Q4M8R2T5W7Y9B3C6D8F",
                    "error": "<absent>",
                },
            )
        ],
    ),
    (
        "status_delivered.json",
        [
            (
                "message.status",
                f"{OUTBOUND_WAMID}:delivered",
                1751371207000,
                {"status": "delivered", "message_id": OUTBOUND_WAMID, "pricing": PRICING},
            )
        ],
    ),
    (
        "status_read.json",
        [
            (
                "message.status",
                f"{OUTBOUND_WAMID}:read",
                1751371295000,
                {"status": "read", "recipient": "+5511987654321", "pricing": "<absent>"},
            )
        ],
    ),
    (
        "status_failed.json",
        [
            (
                "message.status",
                f"{WAMID['failed']}:failed",
                1751461200000,
                {
                    "status": "failed",
                    "message_id": WAMID["failed"],
                    "biz_opaque_callback_data": "outbox:01J1ZN0A2B4C6D8E0F2G4H6J8K",
                    "error": {
                        "code": 131047,
                        "title": "Re-engagement message",
                        "message": "Re-engagement message",
                        "details": "Message failed to send because more than 24 hours have "
                        "passed since the customer last replied to this number.",
                    },
                },
            )
        ],
    ),
    (
        "batch_two_messages.json",
        [
            (
                "message.received",
                "wamid.HBgNNTUxMTkxMjM0NTY3OBUCABIYFDNBOUU0QzJCN0QxRjA1QThFNkI0AA==",
                1751371800000,
                {
                    "from": "+5511912345678",
                    "contact_name": "João Pereira",
                    "text": "Bom dia, vocês atendem convênio Bradesco Saúde?",
                },
            ),
            (
                "message.received",
                "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBM0M4RjZFMUI5RDJBNzA0QzdGAA==",
                1751371801000,
                {**MARIA, "text": "Pode ser às 10h em vez das 9h?"},
            ),
        ],
    ),
]


@pytest.mark.parametrize(("name", "expected"), CASES, ids=[name for name, _ in CASES])
def test_fixture_normalizes(
    name: str, expected: list[tuple[str, str, int, dict[str, Any]]]
) -> None:
    events = parse(fixture_bytes(f"whatsapp_cloud/{name}"))
    assert [(e.type, e.idempotency_key, e.occurred_at) for e in events] == [
        (event_type, key, occurred_at) for event_type, key, occurred_at, _ in expected
    ]
    for event, (*_, data) in zip(events, expected, strict=True):
        assert subset(event.data, data) == data


def test_a_question_about_a_catalog_product_names_the_product() -> None:
    """contracts §1.4: `context.referred_product` ("Message business" on a product); only
    the context's id and sender were kept, so the question reached the clinic without it."""
    document = fixture_json("whatsapp_cloud/text.json")
    message = document["entry"][0]["changes"][0]["value"]["messages"][0]
    product = {"catalog_id": "367025965434465", "product_retailer_id": "consulta-cardio"}
    message["context"] = {"from": "551140028922", "id": "wamid.CAT", "referred_product": product}
    (event,) = parse(document)
    assert event.data["context"] == {
        "message_id": "wamid.CAT",
        "from": "+551140028922",
        "referred_product": product,
    }


def _text_message_as(**fields: Any) -> dict[str, Any]:
    """The text fixture with its message's `type` block (and context) replaced."""
    document: dict[str, Any] = fixture_json("whatsapp_cloud/text.json")
    message = document["entry"][0]["changes"][0]["value"]["messages"][0]
    del message["text"]
    message.update(fields)
    return document


def test_a_template_quick_reply_button_is_a_button_with_its_text_and_payload() -> None:
    """contracts §1.4: a tap on a template's quick-reply button is `type: button`, not an
    interactive reply; its payload is what an integration branches on."""
    document = _text_message_as(
        type="button", button={"text": "Confirmar", "payload": "confirmar-consulta-1234"}
    )
    (event,) = parse(document)
    expected = {
        "kind": "button",
        "text": "Confirmar",
        "button": {"text": "Confirmar", "payload": "confirmar-consulta-1234"},
    }
    assert subset(event.data, expected) == expected


def test_a_flow_answer_carries_its_response_json() -> None:
    """A WhatsApp Flow's answer (`interactive.nfm_reply`): its `body` is the title and its
    `response_json` (the form's answers) is kept."""
    answers = '{"flow_token": "tk-1", "data_consulta": "2026-12-10"}'
    document = _text_message_as(
        type="interactive",
        interactive={
            "type": "nfm_reply",
            "nfm_reply": {"name": "flow", "body": "Sent", "response_json": answers},
        },
    )
    (event,) = parse(document)
    assert event.data["kind"] == "interactive" and event.data["text"] == "Sent"
    assert event.data["interactive"] == {
        "type": "nfm_reply",
        "id": None,
        "title": "Sent",
        "description": None,
        "response_json": answers,
    }


@pytest.mark.parametrize("flag", ["forwarded", "frequently_forwarded"])
def test_a_forwarded_message_says_so(flag: str) -> None:
    document = fixture_json("whatsapp_cloud/text.json")
    message = document["entry"][0]["changes"][0]["value"]["messages"][0]
    message["context"] = {flag: True}
    (event,) = parse(document)
    assert event.data[flag] is True
    assert "context" not in event.data  # no message it replies to
    (plain,) = parse(fixture_json("whatsapp_cloud/text.json"))
    assert flag not in plain.data


def test_media_block_of_voice_note_and_document() -> None:
    (audio,) = parse(fixture_bytes("whatsapp_cloud/audio.json"))
    assert audio.data["media"]["voice"] is True
    assert audio.data["media"]["mime_type"] == "audio/ogg; codecs=opus"
    (document,) = parse(fixture_bytes("whatsapp_cloud/document.json"))
    assert document.data["media"]["filename"] == "comprovante-pix.pdf"
    assert document.data["media"]["voice"] is None


def test_contacts_are_passed_through() -> None:
    (event,) = parse(fixture_bytes("whatsapp_cloud/contacts.json"))
    (card,) = event.data["contacts"]
    assert card["name"]["formatted_name"] == "Ana Souza"
    assert card["phones"][0]["wa_id"] == "5511977771234"


def test_raw_is_the_json_of_that_one_item() -> None:
    document = fixture_json("whatsapp_cloud/batch_two_messages.json")
    items = document["entry"][0]["changes"][0]["value"]["messages"]
    events = parse(document)
    assert [orjson.loads(e.raw or "") for e in events] == items


def test_batching_at_every_level() -> None:
    def message(n: int) -> dict[str, Any]:
        return {"from": f"55119000000{n}", "id": f"wamid.{n}", "timestamp": "1", "type": "text"}

    document = {
        "entry": [
            {
                "changes": [
                    {"field": "messages", "value": {"messages": [message(1), message(2)]}},
                    {
                        "field": "messages",
                        "value": {"statuses": [{"id": "wamid.0", "status": "read"}]},
                    },
                ]
            },
            {"changes": [{"value": {"messages": [message(3)]}}]},
        ]
    }
    keys = [event.idempotency_key for event in parse(document)]
    assert keys == ["wamid.1", "wamid.2", "wamid.0:read", "wamid.3"]


def test_contact_names_match_by_wa_id_not_position() -> None:
    value = {
        "contacts": [{"wa_id": "2", "profile": {"name": "Two"}}],
        "messages": [
            {"id": "a", "from": "1", "type": "text"},
            {"id": "b", "from": "2", "type": "text"},
        ],
    }
    assert [e.data["contact_name"] for e in parse(envelope(value))] == [None, "Two"]


def test_a_sole_contact_names_the_sole_message_however_its_wa_id_is_written() -> None:
    # contracts §1.4: wa_id can differ from the number (Brazil's ninth digit, for one).
    value = {
        "contacts": [{"wa_id": "551187654321", "profile": {"name": "Maria"}}],
        "messages": [{"id": "a", "from": "5511987654321", "type": "text"}],
    }
    assert [e.data["contact_name"] for e in parse(envelope(value))] == ["Maria"]


def test_unknown_types_are_kept_as_unsupported() -> None:
    order = {"catalog_id": "c1", "product_items": [{"product_retailer_id": "p1"}]}
    value = {"messages": [{"id": "w1", "from": "1", "type": "order", "order": order}]}
    (event,) = parse(envelope(value))
    assert event.data["kind"] == "unsupported"
    assert event.data["unsupported"] == {"type": "order", "part": order}
    (missing,) = parse(envelope({"messages": [{"id": "w2"}]}))
    assert missing.data["unsupported"] == {"type": None, "part": None}


def test_played_is_read_and_unknown_statuses_give_no_event() -> None:
    statuses = [
        {"id": "w1", "status": "played", "recipient_id": "1"},
        {"id": "w1", "status": "deleted"},
        {"id": "w1"},
    ]
    (event,) = parse(envelope({"statuses": statuses}))
    assert (event.data["status"], event.data["provider_status"]) == ("read", "played")
    assert event.idempotency_key == "w1:played"


def test_a_status_echoing_one_of_our_message_ids_names_the_sent_message() -> None:
    """Our `msg_…` id goes out as `biz_opaque_callback_data` and comes back with each
    status: `sent_message_id`, the one field every provider's status names it by. Another
    sender's callback data (the fixtures' `outbox:…`) is passed through and names nothing."""
    ours = "msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F"
    statuses = [
        {"id": "w1", "status": "read", "biz_opaque_callback_data": ours},
        {"id": "w2", "status": "read", "biz_opaque_callback_data": "outbox:01J1ZK6Q4M8R2T5W"},
        {"id": "w3", "status": "read"},
    ]
    echoed, other, plain = parse(envelope({"statuses": statuses}))
    assert echoed.data["sent_message_id"] == ours
    assert other.data["biz_opaque_callback_data"] == "outbox:01J1ZK6Q4M8R2T5W"
    assert "sent_message_id" not in other.data and "sent_message_id" not in plain.data


def test_failed_without_errors_still_has_an_error() -> None:
    (event,) = parse(envelope({"statuses": [{"id": "w1", "status": "failed"}]}))
    assert event.data["error"] == {"code": None, "title": None, "message": None, "details": None}


@pytest.mark.parametrize(
    "document",
    [
        {"entry": []},
        envelope({"statuses": []}),
        envelope({}),
        {
            "entry": [
                {"changes": [{"field": "account_update", "value": {"messages": [{"id": "x"}]}}]}
            ]
        },
        envelope({"errors": [{"code": 130429, "title": "Rate limit hit"}]}),
    ],
)
def test_valid_webhooks_with_nothing_to_report_give_no_events(document: Any) -> None:
    assert parse(document) == []


def test_an_item_without_id_gets_a_stable_key() -> None:
    document = envelope({"messages": [{"from": "1", "type": "text", "text": {"body": "hi"}}]})
    first, second = parse(document)[0], parse(document)[0]
    assert first.idempotency_key == second.idempotency_key
    assert (first.idempotency_key or "").startswith("sha256:")


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error"),
    [
        (b"{}", "text/plain", 415, "unsupported_media_type"),
        (b"{}", None, 415, "unsupported_media_type"),
        (b"{not json", "application/json", 400, "invalid_json"),
        (b"[]", "application/json", 400, "invalid_body"),
        (b'{"entry": {}}', "application/json", 400, "invalid_body"),
    ],
)
def test_bad_bodies(body: bytes, content_type: str | None, status: int, error: str) -> None:
    with pytest.raises(HttpError) as caught:
        wa().parse(post(URL, body, content_type))
    assert (caught.value.status, caught.value.error) == (status, error)


# Signature (contracts §1.2) with the known vector.


def signed(body: bytes, header: str | None) -> InboundRequest:
    return post(URL, body, headers={} if header is None else {"X-Hub-Signature-256": header})


def test_signature_vector_matches_the_raw_bytes() -> None:
    vector = fixture_json("whatsapp_cloud/signature_vector.json")
    body = fixture_bytes(f"whatsapp_cloud/{vector['body_file']}")
    assert len(body) == vector["body_length"]
    assert hashlib.sha256(body).hexdigest() == vector["body_sha256_hex"]
    assert sign(body, vector["app_secret"]) == vector["expected_header"]
    wa().verify(signed(body, vector["expected_header"]))
    wa().verify(signed(body, vector["expected_header"].upper().replace("SHA256=", "sha256=")))


def rejection(request: InboundRequest) -> tuple[int, str]:
    with pytest.raises(HttpError) as caught:
        wa().verify(request)
    return caught.value.status, caught.value.error


def test_wrong_secret_tampered_body_and_reserialized_body_are_rejected() -> None:
    body = fixture_bytes("whatsapp_cloud/text.json")
    header = sign(body)
    assert rejection(signed(body, sign(body, "another-secret"))) == (401, "invalid_signature")
    tampered = body.replace(b"consulta", b"consulte")
    assert rejection(signed(tampered, header)) == (401, "invalid_signature")
    # The same JSON written differently (UTF-8 instead of \\u escapes) is other bytes.
    reserialized = orjson.dumps(orjson.loads(body))
    assert reserialized != body
    assert rejection(signed(reserialized, header)) == (401, "invalid_signature")
    assert rejection(signed(body, header.removeprefix("sha256="))) == (401, "invalid_signature")
    assert rejection(signed(body, "sha256=ünïcode")) == (401, "invalid_signature")


def test_missing_signature() -> None:
    body = fixture_bytes("whatsapp_cloud/text.json")
    assert rejection(signed(body, None)) == (401, "missing_signature")
    assert rejection(signed(body, "")) == (401, "missing_signature")


# Handshake (contracts §1.1).


def handshake_request(query: str) -> InboundRequest:
    return InboundRequest.build("GET", f"{URL}?{query}")


def test_handshake_echoes_the_challenge() -> None:
    query = fixture_bytes("whatsapp_cloud/verify_handshake.txt").decode()
    assert wa().handshake(handshake_request(query)) == "1158201444"


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=wrong", 403),
        ("hub.mode=subscribe&hub.challenge=1158201444", 403),
        (f"hub.mode=unsubscribe&hub.challenge=1&hub.verify_token={WA_VERIFY_TOKEN}", 403),
        (f"hub.mode=subscribe&hub.verify_token={WA_VERIFY_TOKEN}", 400),
    ],
)
def test_handshake_refusals(query: str, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        wa().handshake(handshake_request(query))
    assert caught.value.status == status


def test_handshake_without_a_configured_verify_token_is_refused() -> None:
    source_without = WhatsAppCloudSource(source("whatsapp_cloud", app_secret=WA_APP_SECRET))
    query = fixture_bytes("whatsapp_cloud/verify_handshake.txt").decode()
    with pytest.raises(HttpError) as caught:
        source_without.handshake(handshake_request(query))
    assert (caught.value.status, caught.value.error) == (403, "invalid_verify_token")


def test_each_group_member_s_status_of_one_message_is_its_own_event() -> None:
    # contracts §1.5: a group message's statuses name the member (`recipient_participant_id`)
    # beside the group (`recipient_id`); every member reads it, under one WAMID and status.
    group = {"id": OUTBOUND_WAMID, "status": "read", "timestamp": "1751371295"}
    group |= {"recipient_type": "group", "recipient_id": "120363401234567890"}
    statuses = [
        {**group, "recipient_participant_id": "5511987654321"},
        {**group, "recipient_participant_id": "5511912345678"},
    ]
    events = parse(envelope({"statuses": statuses}))
    assert [e.idempotency_key for e in events] == [
        f"{OUTBOUND_WAMID}:read:5511987654321",
        f"{OUTBOUND_WAMID}:read:5511912345678",
    ]
    expected = {
        "status": "read",
        "message_id": OUTBOUND_WAMID,
        "recipient": "+5511912345678",
        "conversation_id": "120363401234567890",
        "group": {"id": "120363401234567890", "name": None},
    }
    assert subset(events[1].data, expected) == expected

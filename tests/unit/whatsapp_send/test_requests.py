"""Each provider's request for each kind of message (contracts §1.6, §2.4, §3.5, §9.5)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
import pytest

from estafeta.connectors.whatsapp import OutboundMessage, cloud, sendpulse, twilio, zapi

TO = "+5511987654321"
COMPONENTS = [
    {"type": "header", "parameters": [{"type": "text", "text": "Clínica Sol"}]},
    {
        "type": "body",
        "parameters": [{"type": "text", "text": "Maria"}, {"type": "text", "text": "9h"}],
    },
]


def message(**content: Any) -> OutboundMessage:
    return OutboundMessage.from_data({"to": TO, **content})


# -- WhatsApp Cloud API (§1.6) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_base", "url"),
    [
        (None, "https://graph.facebook.com/v25.0/1149/messages"),
        ("http://127.0.0.1:8/", "http://127.0.0.1:8/v25.0/1149/messages"),
        ("http://127.0.0.1:8/v19.0", "http://127.0.0.1:8/v19.0/1149/messages"),
        ("https://proxy.example/graph/v21.0/", "https://proxy.example/graph/v21.0/1149/messages"),
    ],
)
def test_cloud_url(api_base: str | None, url: str) -> None:
    assert cloud.messages_url(api_base, "1149") == url


def test_cloud_text() -> None:
    assert cloud.build_payload(message(text="Olá!", message_id="msg_1")) == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": TO,
        "type": "text",
        "text": {"body": "Olá!"},
        "biz_opaque_callback_data": "msg_1",
    }


def test_cloud_template() -> None:
    payload = cloud.build_payload(
        message(template={"name": "lembrete", "language": "pt_BR", "components": COMPONENTS})
    )
    assert payload is not None
    assert payload["type"] == "template"
    assert payload["template"] == {
        "name": "lembrete",
        "language": {"code": "pt_BR"},
        "components": COMPONENTS,
    }
    policy = {"code": "en_US", "policy": "deterministic"}
    payload = cloud.build_payload(message(template={"name": "t", "language": policy}))
    assert payload is not None
    assert payload["template"] == {"name": "t", "language": policy}


def test_cloud_media() -> None:
    document = {"kind": "document", "url": "https://x.example/l.pdf", "filename": "laudo.pdf"}
    payload = cloud.build_payload(message(media=document | {"caption": "Seu laudo"}))
    assert payload is not None
    assert payload["type"] == "document"
    assert payload["document"] == {
        "link": "https://x.example/l.pdf",
        "caption": "Seu laudo",
        "filename": "laudo.pdf",
    }


def test_cloud_cannot_send_a_twilio_template() -> None:
    assert cloud.build_payload(message(template={"content_sid": "HX1"})) is None


# -- Twilio (§2.4) -------------------------------------------------------------------------


def test_twilio_text_with_status_callback() -> None:
    fields = twilio.build_form(message(text="Olá!"), "+551140028922", "https://hub/in/tw")
    assert fields == [
        ("To", "whatsapp:+5511987654321"),
        ("From", "whatsapp:+551140028922"),
        ("Body", "Olá!"),
        ("StatusCallback", "https://hub/in/tw"),
    ]
    assert "To=whatsapp%3A%2B5511987654321" in urlencode(fields)


def test_twilio_asks_for_its_status_callbacks_with_the_messages_own_id() -> None:
    """Twilio echoes nothing of a send in its callbacks but the URL it calls: the message's
    `msg_…` id rides in the StatusCallback's query, so the statuses can name it."""
    sent = OutboundMessage.from_data(
        {"to": TO, "text": "Olá!", "message_id": "msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F"}
    )
    fields = twilio.build_form(sent, "+551140028922", "https://hub/in/tw")
    assert isinstance(fields, list)
    assert dict(fields)["StatusCallback"] == (
        "https://hub/in/tw?sent_message_id=msg_01J1ZK6Q4M8R2T5W7Y9B3C6D8F"
    )


def test_twilio_media() -> None:
    media = {"kind": "image", "url": "https://x.example/a.jpg", "caption": "Olha"}
    assert twilio.build_form(message(media=media), "whatsapp:+551140028922") == [
        ("To", "whatsapp:+5511987654321"),
        ("From", "whatsapp:+551140028922"),
        ("MediaUrl", "https://x.example/a.jpg"),
        ("Body", "Olha"),
    ]


@pytest.mark.parametrize(
    ("template", "content"),
    [
        (
            {"content_sid": "HXabc", "components": COMPONENTS},
            [("ContentSid", "HXabc"), ("ContentVariables", '{"1":"Maria","2":"9h"}')],
        ),
        (
            {"content_sid": "HXabc", "variables": {"1": "Ana", 2: 3}},
            [("ContentSid", "HXabc"), ("ContentVariables", '{"1":"Ana","2":"3"}')],
        ),
        ({"name": "HXdef", "language": "pt_BR"}, [("ContentSid", "HXdef")]),
    ],
)
def test_twilio_template(template: dict[str, Any], content: list[tuple[str, str]]) -> None:
    fields = twilio.build_form(message(template=template), "whatsapp:+551140028922")
    addresses = [("To", "whatsapp:+5511987654321"), ("From", "whatsapp:+551140028922")]
    assert fields == [*addresses, *content]
    if len(content) == 2:
        assert isinstance(orjson.loads(content[1][1]), dict)


def test_twilio_cannot_send_a_cloud_template_name() -> None:
    reason = twilio.build_form(message(template={"name": "lembrete", "language": "pt_BR"}), "+1")
    assert isinstance(reason, str)
    assert "content_sid" in reason


# -- Z-API (§3.5) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media", "endpoint", "body"),
    [
        (
            {"kind": "image", "url": "https://x.example/a.jpg", "caption": "Olha"},
            "send-image",
            {"image": "https://x.example/a.jpg", "caption": "Olha"},
        ),
        (
            {"kind": "video", "url": "https://x.example/v.mp4"},
            "send-video",
            {"video": "https://x.example/v.mp4"},
        ),
        (
            {"kind": "audio", "url": "https://x.example/a.ogg"},
            "send-audio",
            {"audio": "https://x.example/a.ogg"},
        ),
        (
            {"kind": "document", "url": "https://x.example/download?id=1", "filename": "Laudo.PDF"},
            "send-document/pdf",
            {"document": "https://x.example/download?id=1", "fileName": "Laudo.PDF"},
        ),
        (
            {"kind": "document", "url": "https://x.example/files/tabela%20final.xlsx"},
            "send-document/xlsx",
            {"document": "https://x.example/files/tabela%20final.xlsx"},
        ),
    ],
)
def test_zapi_media(media: dict[str, Any], endpoint: str, body: dict[str, Any]) -> None:
    assert zapi.build_request(message(media=media)) == (
        endpoint,
        {"phone": "5511987654321", **body},
    )


def test_zapi_text_and_refusals() -> None:
    assert zapi.build_request(message(text="Oi")) == (
        "send-text",
        {"phone": "5511987654321", "message": "Oi"},
    )
    assert isinstance(zapi.build_request(message(template={"name": "t", "language": "pt"})), str)
    no_extension = {"kind": "document", "url": "https://x.example/download"}
    assert isinstance(zapi.build_request(message(media=no_extension)), str)


def test_zapi_url() -> None:
    assert zapi.instance_url(None, "I1", "T1") == "https://api.z-api.io/instances/I1/token/T1"


# -- SendPulse (§9.5) -----------------------------------------------------------------------


def test_sendpulse_text_by_phone() -> None:
    assert sendpulse.build_request(message(text="Olá Maria!"), "66a1") == (
        "whatsapp/contacts/sendByPhone",
        {
            "bot_id": "66a1",
            "phone": "5511987654321",
            "message": {"type": "text", "text": {"body": "Olá Maria!"}},
        },
    )


def test_sendpulse_media_and_template() -> None:
    media = {"kind": "document", "url": "https://x.example/l.pdf", "caption": "Laudo"}
    request = sendpulse.build_request(message(media=media), "66a1")
    assert isinstance(request, tuple)
    path, body = request
    assert path == "whatsapp/contacts/sendByPhone"
    assert body["message"] == {
        "type": "document",
        "document": {"link": "https://x.example/l.pdf", "caption": "Laudo"},
    }
    template = {"name": "lembrete", "language": {"code": "pt_BR"}, "components": COMPONENTS}
    request = sendpulse.build_request(message(template=template), "66a1")
    assert isinstance(request, tuple)
    path, body = request
    assert path == "whatsapp/contacts/sendTemplateByPhone"
    assert body == {"bot_id": "66a1", "phone": "5511987654321", "template": template}


def test_sendpulse_has_no_video() -> None:
    video = {"kind": "video", "url": "https://x.example/v.mp4"}
    assert isinstance(sendpulse.build_request(message(media=video), "66a1"), str)

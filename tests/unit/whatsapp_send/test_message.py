"""`OutboundMessage.from_data`: what `POST /api/v1/messages` and `message.send` accept."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estafeta.connectors.whatsapp import OutboundMessage

TO = "+5511987654321"
TEMPLATE = {
    "name": "confirmacao_consulta",
    "language": {"code": "pt_BR"},
    "components": [{"type": "body", "parameters": [{"type": "text", "text": "Maria"}]}],
}


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        ({"to": TO, "text": "Olá!"}, "text"),
        ({"to": TO, "template": TEMPLATE}, "template"),
        ({"to": TO, "template": {"name": "t", "language": "pt_BR"}}, "template"),
        ({"to": TO, "template": {"content_sid": "HX0123"}}, "template"),
        ({"to": TO, "media": {"kind": "image", "url": "https://x.example/a.jpg"}}, "image"),
        ({"to": TO, "media": {"kind": "audio", "url": "https://x.example/a.ogg"}}, "audio"),
        (
            {
                "to": TO,
                "media": {"kind": "document", "url": "https://x.example/l", "filename": "l.pdf"},
            },
            "document",
        ),
        # the keys of a message.send event's data that are not the message are ignored
        ({"to": TO, "text": "oi", "source": "wa-sol", "message_id": "msg_1", "x": 1}, "text"),
    ],
)
def test_valid_messages(data: dict[str, Any], kind: str) -> None:
    message = OutboundMessage.from_data(data)
    assert message.kind == kind
    assert message.to == TO
    assert message.digits == "5511987654321"


def test_reference_and_source_are_kept() -> None:
    message = OutboundMessage.from_data(
        {"to": TO, "text": "oi", "source": "wa-sol", "message_id": "msg_01J"}
    )
    assert (message.reference, message.source) == ("msg_01J", "wa-sol")


def test_media_drops_absent_optional_keys() -> None:
    message = OutboundMessage.from_data(
        {"to": TO, "media": {"kind": "image", "url": "https://x.example/a.jpg", "caption": None}}
    )
    assert message.media == {"kind": "image", "url": "https://x.example/a.jpg"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"text": "oi"}, "to: must be an E.164"),
        ({"to": "5511987654321", "text": "oi"}, "to: must be an E.164"),
        ({"to": "+55 11 98765-4321", "text": "oi"}, "to: must be an E.164"),
        ({"to": TO}, "exactly one of text, template or media"),
        ({"to": TO, "text": "oi", "template": TEMPLATE}, "(got text, template)"),
        ({"to": TO, "text": "  "}, "text: must be a non-empty string"),
        ({"to": TO, "text": "x" * 4097}, "text: at most 4096"),
        ({"to": TO, "template": "t"}, "template: must be an object"),
        ({"to": TO, "template": {"language": "pt_BR"}}, "template.name"),
        ({"to": TO, "template": {"name": "t"}}, "template.language"),
        ({"to": TO, "template": {"name": "t", "language": "pt", "components": {}}}, "components"),
        ({"to": TO, "template": {"name": "t", "language": "pt", "foo": 1}}, "unknown key(s) foo"),
        ({"to": TO, "media": {"kind": "sticker", "url": "https://x/a"}}, "media.kind"),
        ({"to": TO, "media": {"kind": "image", "url": "ftp://x/a"}}, "media.url"),
        ({"to": TO, "media": {"kind": "image"}}, "media.url"),
        ({"to": TO, "media": {"kind": "audio", "url": "https://x/a", "caption": "c"}}, "audio"),
        ({"to": TO, "media": {"kind": "image", "url": "https://x/a", "filename": "a"}}, "filename"),
        ({"to": TO, "media": {"kind": "image", "url": "https://x/a", "size": 1}}, "unknown key"),
        ({"to": TO, "text": "oi", "message_id": 7}, "message_id: must be a non-empty string"),
    ],
)
def test_invalid_messages_name_the_field(data: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        OutboundMessage.from_data(data)
    assert reason in str(caught.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.dictionaries(
        st.sampled_from(["to", "text", "template", "media", "message_id", "source"]),
        json_values,
    )
)
def test_any_json_is_a_message_or_a_value_error(data: dict[str, Any]) -> None:
    with contextlib.suppress(ValueError):
        OutboundMessage.from_data(data)

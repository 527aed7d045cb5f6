"""What the hub asks a WhatsApp provider to send: one message to one customer.

`OutboundMessage.from_data` is the single place that decides whether a `message.send`
event's `data` (or the body of `POST /api/v1/messages`, DESIGN §3.3) is a message we can
send, so the API rejects at the door what the connector would otherwise dead-letter later.

The shape follows the Cloud API's (contracts §1.6): a text, a template
(`{"name", "language", "components"}`) or a media item
(`{"kind": image|audio|video|document, "url", "caption"?, "filename"?}`), exactly one of
them, to an E.164 number. Each provider client translates it into its own request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MEDIA_KINDS = frozenset({"image", "audio", "video", "document"})
#: The Cloud API's limit on a text body (SendPulse's is 1024 and Twilio's 1600: those
#: providers answer with their own documented error, which is what an operator should see).
MAX_TEXT = 4096
MAX_CAPTION = 1024
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_CONTENTS = ("text", "template", "media")
_MEDIA_KEYS = frozenset({"kind", "url", "caption", "filename"})
_TEMPLATE_KEYS = frozenset({"name", "language", "components", "content_sid", "variables"})


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One message to send; build it with `from_data`, which checks every field."""

    to: str  # E.164, "+5511987654321"
    text: str | None = None
    template: Mapping[str, Any] | None = None  # {"name", "language", "components"} (§1.6)
    media: Mapping[str, Any] | None = None  # {"kind", "url", "caption"?, "filename"?}
    # Our id of the message (`msg_…`): Cloud API echoes it in status webhooks as
    # `biz_opaque_callback_data` (contracts §1.5/§1.6), so a status can be matched to it.
    reference: str | None = None
    # The source (provider account) the message is to go out through, when the data says.
    source: str | None = None

    @property
    def kind(self) -> str:
        """`text`, `template`, or the media kind (`image`, `audio`, `video`, `document`)."""
        if self.text is not None:
            return "text"
        if self.template is not None:
            return "template"
        assert self.media is not None  # noqa: S101 - from_data guarantees one of the three
        return str(self.media["kind"])

    @property
    def digits(self) -> str:
        """The number without its `+` (Z-API and SendPulse want digits only)."""
        return self.to.removeprefix("+")

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> OutboundMessage:
        """The message `data` describes; ValueError naming the field and the reason if not.

        Keys other than `to`, `text`, `template`, `media`, `message_id` and `source` are
        ignored (a `message.send` event's data carries more).
        """
        if not isinstance(data, Mapping):
            raise ValueError("the message must be a JSON object")
        to = data.get("to")
        if not isinstance(to, str) or not _E164.fullmatch(to):
            raise ValueError(f"to: must be an E.164 number such as '+5511987654321', not {to!r}")
        given = [name for name in _CONTENTS if data.get(name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of text, template or media"
                + (f" (got {', '.join(given)})" if given else "")
            )
        reference = _optional_str(data, "message_id")
        source = _optional_str(data, "source")
        if given[0] == "text":
            return cls(to, text=_text(data["text"]), reference=reference, source=source)
        if given[0] == "template":
            template = _template(data["template"])
            return cls(to, template=template, reference=reference, source=source)
        return cls(to, media=_media(data["media"]), reference=reference, source=source)


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: must be a non-empty string")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("text: must be a non-empty string")
    if len(value) > MAX_TEXT:
        raise ValueError(f"text: at most {MAX_TEXT} characters, got {len(value)}")
    return value


def _template(value: object) -> dict[str, Any]:
    """`{name, language, components?}`; `language` may be "pt_BR" or `{"code": "pt_BR"}`.

    Twilio sends templates as Content API templates (contracts §2.4: `ContentSid` +
    `ContentVariables`); they may be given as `content_sid` and `variables` instead of a name.
    """
    if not isinstance(value, Mapping):
        raise ValueError("template: must be an object with name, language and components")
    unknown = sorted(set(value) - _TEMPLATE_KEYS)
    if unknown:
        raise ValueError(f"template: unknown key(s) {', '.join(unknown)}")
    template = dict(value)
    content_sid = template.get("content_sid")
    if content_sid is not None and not (isinstance(content_sid, str) and content_sid):
        raise ValueError("template.content_sid: must be a Twilio Content SID (HX…)")
    name = template.get("name")
    if content_sid is None and not (isinstance(name, str) and name.strip()):
        raise ValueError("template.name: must be a non-empty string")
    language = template.get("language")
    if isinstance(language, Mapping):
        language = language.get("code")
    if content_sid is None and not (isinstance(language, str) and language):
        raise ValueError("template.language: must be a code such as 'pt_BR' or {'code': 'pt_BR'}")
    components = template.get("components", [])
    if not isinstance(components, list) or not all(isinstance(c, Mapping) for c in components):
        raise ValueError("template.components: must be a list of objects (Cloud API shape)")
    variables = template.get("variables")
    if variables is not None and not isinstance(variables, Mapping):
        raise ValueError("template.variables: must be an object such as {'1': 'Maria'}")
    return template


def _media(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError("media: must be an object with kind and url")
    unknown = sorted(set(value) - _MEDIA_KEYS)
    if unknown:
        raise ValueError(f"media: unknown key(s) {', '.join(unknown)}")
    kind = value.get("kind")
    if kind not in MEDIA_KINDS:
        raise ValueError(f"media.kind: one of {', '.join(sorted(MEDIA_KINDS))}, not {kind!r}")
    url = value.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("media.url: must be an http(s) URL the provider can download")
    caption = value.get("caption")
    if caption is not None:
        if kind == "audio":
            raise ValueError("media.caption: an audio message cannot have a caption")
        if not isinstance(caption, str) or len(caption) > MAX_CAPTION:
            raise ValueError(f"media.caption: a string of at most {MAX_CAPTION} characters")
    filename = value.get("filename")
    if filename is not None:
        if kind != "document":
            raise ValueError("media.filename: only a document has a file name")
        if not isinstance(filename, str) or not filename.strip():
            raise ValueError("media.filename: must be a non-empty string")
    return {
        key: value[key]
        for key in ("kind", "url", "caption", "filename")
        if value.get(key) is not None
    }

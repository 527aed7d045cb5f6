"""The shared seam: InboundRequest, source_for, the JSON readers, and fixture coverage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estafeta.errors import HttpError
from estafeta.ingress.providers import (
    InboundRequest,
    SendPulseSource,
    TwilioSource,
    WhatsAppCloudSource,
    ZApiSource,
    source_for,
)
from estafeta.ingress.providers.base import (
    MAX_KEY_LENGTH,
    bounded_key,
    e164,
    load_json,
    milliseconds,
    number,
    phone_digits,
    seconds_to_ms,
)
from tests.unit.providers import test_sendpulse, test_twilio, test_whatsapp_cloud, test_zapi
from tests.unit.providers.support import FIXTURES, PROVIDER_DIRS, post, source


def test_build_derives_path_query_headers_and_media_type() -> None:
    request = InboundRequest.build(
        "post",
        "https://hub.example.com/in/src?token=a%2Bb&token=second&empty=",
        {"Content-Type": "Application/JSON; charset=utf-8", "X-Hub-Signature-256": "s"},
        b"{}",
    )
    assert request.method == "POST"
    assert request.path_qs == "/in/src?token=a%2Bb&token=second&empty="
    assert request.query == {"token": "a+b", "empty": ""}
    assert request.headers == {
        "content-type": "Application/JSON; charset=utf-8",
        "x-hub-signature-256": "s",
    }
    assert request.content_type == "application/json"
    bare = InboundRequest.build("GET", "https://hub.example.com")
    assert (bare.path_qs, bare.query, bare.content_type) == ("/", {}, "")


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"kind": "whatsapp_cloud", "app_secret": "s"}, WhatsAppCloudSource),
        ({"kind": "twilio", "auth_token": "t"}, TwilioSource),
        ({"kind": "zapi", "token": "t"}, ZApiSource),
        ({"kind": "sendpulse", "token": "t"}, SendPulseSource),
    ],
)
def test_source_for_picks_the_kind(keys: dict[str, str], expected: type) -> None:
    provider = source_for(source(**keys))
    assert isinstance(provider, expected)
    assert provider.kind == keys["kind"]


def test_source_for_refuses_generic() -> None:
    with pytest.raises(ValueError, match="not a provider kind"):
        source_for(source("generic", api_key="k"))


@pytest.mark.parametrize(
    ("value", "digits"),
    [
        ("5511987654321", "5511987654321"),
        ("whatsapp:+5511987654321", "5511987654321"),
        ("+55 (11) 98765-4321", "5511987654321"),
        (5511987654321, "5511987654321"),
        ("120363019502650977-group", None),
        ("81896604192873@lid", None),
        ("١٢٣", None),  # Arabic-Indic digits are not phone digits
        ("", None),
        (None, None),
        (True, None),
        ("1" * 21, None),
    ],
)
def test_phone_digits(value: object, digits: str | None) -> None:
    assert phone_digits(value) == digits
    assert e164(value) == (None if digits is None else f"+{digits}")


@given(st.text(alphabet="0123456789 +-().whatsapp:\u0661\u00b2x@", max_size=24))
def test_phone_digits_reads_every_text_by_one_rule(value: str) -> None:
    """The fast path for plain digits agrees with the rule: drop `whatsapp:`, spaces, one
    leading `+` and the separators; what is left must be 1–20 ASCII digits."""
    rest = value.removeprefix("whatsapp:").strip().removeprefix("+")
    for separator in " -().":
        rest = rest.replace(separator, "")
    expected = rest if 1 <= len(rest) <= 20 and rest.isascii() and rest.isdigit() else None
    assert phone_digits(value) == expected


@pytest.mark.parametrize(
    ("value", "ms"),
    [("1751371200", 1751371200000), (1751371200, 1751371200000), ("-1", None), (1.5, None)],
)
def test_seconds_to_ms(value: object, ms: int | None) -> None:
    assert seconds_to_ms(value) == ms


def test_timestamps_out_of_range_read_as_absent() -> None:
    assert seconds_to_ms(10**12) is None
    assert milliseconds(10**15) is None
    assert milliseconds(True) is None


@pytest.mark.parametrize(
    ("value", "parsed"),
    [(-23.5, -23.5), ("-46.6", -46.6), (3, 3.0), ("nan", None), ("inf", None), (False, None)],
)
def test_number(value: object, parsed: float | None) -> None:
    assert number(value) == parsed


def test_long_keys_are_hashed_to_fit() -> None:
    assert bounded_key("k" * MAX_KEY_LENGTH) == "k" * MAX_KEY_LENGTH
    long_key = bounded_key("k" * (MAX_KEY_LENGTH + 1))
    assert long_key.startswith("sha256:")
    assert len(long_key) <= MAX_KEY_LENGTH


def test_every_provider_fixture_has_a_table_row() -> None:
    covered = {f"whatsapp_cloud/{name}" for name, _ in test_whatsapp_cloud.CASES} | {
        f"twilio/{name}" for name, _ in test_twilio.CASES
    }
    covered |= {f"zapi/{name}" for name, _ in test_zapi.CASES}
    covered |= {f"sendpulse/{name}" for name, _ in test_sendpulse.CASES}
    # Vectors and the handshake have their own tests.
    covered |= {
        "whatsapp_cloud/signature_vector.json",
        "whatsapp_cloud/verify_handshake.txt",
        "twilio/signature_vector.json",
    }
    on_disk = {
        f"{provider}/{path.name}"
        for provider in PROVIDER_DIRS
        for path in (FIXTURES / provider).iterdir()
        if path.is_file()
    }
    assert on_disk == covered


# A lone surrogate escape sends the body through a second reading (the standard library's):
# its numbers must come out as orjson reads any other body's, and what orjson refuses
# (which destinations would get as null) must be refused here too.
LONE = b'"Oi \\ud83d"'


@pytest.mark.parametrize(
    ("number_text", "read"),
    [
        (b"-23.5618", -23.5618),
        (b"9007199254740993", 9007199254740993),  # exact within 64 bits
        (b"123456789012345678901", 1.2345678901234568e20),  # beyond: the nearest double
    ],
)
def test_a_body_read_again_for_a_lone_surrogate_reads_numbers_as_orjson(
    number_text: bytes, read: float
) -> None:
    body = b'{"text": %s, "n": %s}' % (LONE, number_text)
    document = load_json(post("https://hub.example/in/x", body))
    assert document == {"text": "Oi \ufffd", "n": read}
    assert isinstance(document, dict) and type(document["n"]) is type(read)


@pytest.mark.parametrize("number_text", [b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity"])
def test_a_body_read_again_for_a_lone_surrogate_refuses_what_orjson_refuses(
    number_text: bytes,
) -> None:
    body = b'{"text": %s, "n": %s}' % (LONE, number_text)
    with pytest.raises(HttpError) as refused:
        load_json(post("https://hub.example/in/x", body))
    assert (refused.value.status, refused.value.error) == (400, "invalid_json")

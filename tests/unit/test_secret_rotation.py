"""Rotating a secret (docs/operations.md, "Rotating a secret"): a key written as a list of
secrets is checked item by item, a request made with any of them is verified, a delivery
carries a signature per secret, and a key that also sends sends with the first."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from estafeta.config import SourceConfig, load_config_dict
from estafeta.config.models import DestinationConfig
from estafeta.connectors.http import sign_webhook
from estafeta.errors import ConfigError, HttpError
from estafeta.ingress.generic import GenericSource
from estafeta.ingress.providers import InboundRequest, source_for
from estafeta.ingress.providers.twilio import signature as twilio_signature
from tests.conftest import ROTATED_SECRET, SOURCE_SECRET, UNKNOWN_SECRET
from tests.unit.providers.support import FORM, JSON, fixture_bytes, post

OLD_WHSEC = SOURCE_SECRET
NEW_WHSEC = ROTATED_SECRET
OTHER_WHSEC = UNKNOWN_SECRET


def rotated(kind: str, **keys: Any) -> SourceConfig:
    return SourceConfig.model_validate({"id": "src", "tenant": "tenant", "kind": kind, **keys})


def issues(source: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    data = {
        "tenants": [{"id": "tenant"}],
        "sources": [{"id": "src", "tenant": "tenant", **source}],
    }
    try:
        load_config_dict(data, env or {})
    except ConfigError as exc:
        return [str(issue) for issue in exc.issues]
    return []


# -- configuration -----------------------------------------------------------------------------

ROTATABLE = [
    ("generic", "secret", [NEW_WHSEC, OLD_WHSEC]),
    ("generic", "api_key", ["key-new", "key-old"]),
    ("whatsapp_cloud", "app_secret", ["new", "old"]),
    ("whatsapp_cloud", "verify_token", ["new", "old"]),
    ("twilio", "auth_token", ["new", "old"]),
    ("zapi", "token", ["new", "old"]),
    ("sendpulse", "token", ["new", "old"]),
]
NEEDED = {"whatsapp_cloud": "app_secret", "twilio": "auth_token"}


@pytest.mark.parametrize(("kind", "key", "secrets"), ROTATABLE)
def test_every_inbound_secret_may_be_a_list_current_first(
    kind: str, key: str, secrets: list[str]
) -> None:
    keys: dict[str, Any] = {key: secrets}
    if NEEDED.get(kind, key) != key:
        keys[NEEDED[kind]] = "x"
    config = rotated(kind, **keys)
    assert config.secrets_of(key) == tuple(secrets)
    assert config.value_of(key) == secrets[0]
    assert rotated(kind, **{**keys, key: secrets[0]}).secrets_of(key) == (secrets[0],)
    assert secrets[0] not in repr(config) and secrets[1] not in repr(config)


def test_environment_references_in_a_list_are_resolved_and_located() -> None:
    env = {"WA_NEW": "new-secret", "WA_OLD": "old-secret"}
    source = {"kind": "whatsapp_cloud", "app_secret": ["${WA_NEW}", "${WA_OLD}"]}
    data = {"tenants": [{"id": "tenant"}], "sources": [{"id": "src", "tenant": "tenant", **source}]}
    config = load_config_dict(data, env)
    assert config.sources[0].secrets_of("app_secret") == ("new-secret", "old-secret")
    assert issues(source, {"WA_NEW": "new-secret"}) == [
        "sources[0].app_secret[1]: environment variable WA_OLD is not set"
    ]


BAD_LISTS = [
    (
        {"kind": "zapi", "token": []},
        "sources[0].token: must not be empty: write at least one secret",
    ),
    ({"kind": "zapi", "token": ["a", 7]}, "sources[0].token[1]: must be a string"),
    (
        {"kind": "zapi", "token": {"current": "a"}},
        "sources[0].token: must be a string or a list of strings (old and new, while rotating)",
    ),
    (
        {"kind": "zapi", "token": ["a", ""]},
        "sources[0].token[1]: must not be empty (an unset or empty environment variable?)",
    ),
    (
        {"kind": "twilio", "auth_token": ["c8a1f4e7", "b2d95a3e\n"]},
        "sources[0].auth_token[1]: must not start or end with whitespace (a secret file's "
        "newline?): no genuine request would match it",
    ),
    (
        {"kind": "whatsapp_cloud", "app_secret": ["same", "same"]},
        "sources[0].app_secret[1]: the same secret as item 0: list each secret once",
    ),
    (
        {"kind": "generic", "secret": [NEW_WHSEC, "not-a-whsec"]},
        "sources[0].secret[1]: must be a Standard Webhooks secret: 'whsec_' followed by base64",
    ),
    (
        {"kind": "generic", "api_key": ["k", "k"]},
        "sources[0].api_key[1]: the same secret as item 0: list each secret once",
    ),
    (  # a key of another kind is refused as such, list or not
        {"kind": "zapi", "token": "t", "app_secret": ["a", "b"]},
        "sources[0].app_secret: not a key of a zapi source (it takes token, instance_id, "
        "instance_token, client_token, api_base, send_rate_limit, send_max_attempts)",
    ),
]


@pytest.mark.parametrize(("source", "expected"), BAD_LISTS)
def test_a_bad_list_is_reported_where_it_is_wrong(source: dict[str, Any], expected: str) -> None:
    assert issues(source) == [expected]


def test_a_destination_secret_list_is_checked_item_by_item() -> None:
    base = {"id": "crm", "tenant": "tenant", "url": "http://127.0.0.1:9/"}
    destination = DestinationConfig.model_validate({**base, "secret": [NEW_WHSEC, OLD_WHSEC]})
    assert destination.secrets == (NEW_WHSEC, OLD_WHSEC)
    assert NEW_WHSEC not in repr(destination)
    assert DestinationConfig.model_validate({**base, "secret": OLD_WHSEC}).secrets == (OLD_WHSEC,)
    assert DestinationConfig.model_validate(base).secrets == ()
    data = {"tenants": [{"id": "tenant"}], "destinations": [{**base, "secret": [NEW_WHSEC, "x"]}]}
    with pytest.raises(ConfigError) as raised:
        load_config_dict(data, {})
    assert [str(i) for i in raised.value.issues] == [
        "destinations[0].secret[1]: must be a Standard Webhooks secret: 'whsec_' followed by base64"
    ]


# -- verifying: old and new accepted, a third refused ---------------------------------------


def test_generic_signature_with_either_secret() -> None:
    generic = GenericSource(rotated("generic", secret=[NEW_WHSEC, OLD_WHSEC]))
    body = b'{"type": "lead.created", "data": {}}'

    def signed_with(secret: str, stamp: int | None = None) -> InboundRequest:
        ts = int(time.time()) if stamp is None else stamp
        headers = {
            "webhook-id": "msg_1",
            "webhook-timestamp": str(ts),
            "webhook-signature": sign_webhook(secret, "msg_1", ts, body),
        }
        return post("https://hub/in/src", body, JSON, headers)

    generic.verify(signed_with(NEW_WHSEC))
    generic.verify(signed_with(OLD_WHSEC))
    with pytest.raises(HttpError) as refused:
        generic.verify(signed_with(OTHER_WHSEC))
    assert (refused.value.status, refused.value.detail) == (
        401,
        "webhook-signature does not match the body and the secret",
    )
    with pytest.raises(HttpError) as stale:  # a stale timestamp says so, whichever secret
        generic.verify(signed_with(OLD_WHSEC, int(time.time()) - 3600))
    assert stale.value.detail == "webhook-timestamp is older than the 5-minute tolerance"


def test_a_signed_webhook_is_accepted_only_within_five_minutes_of_its_timestamp() -> None:
    """The replay window docs/configuration.md promises (±5 minutes), on both sides: a
    request captured and sent again later, or stamped ahead, is refused however well signed."""
    generic = GenericSource(rotated("generic", secret=NEW_WHSEC))
    body = b'{"type": "lead.created", "data": {}}'

    def verify_stamped(offset_s: int) -> str | None:
        ts = int(time.time()) + offset_s
        headers = {
            "webhook-id": "msg_1",
            "webhook-timestamp": str(ts),
            "webhook-signature": sign_webhook(NEW_WHSEC, "msg_1", ts, body),
        }
        try:
            generic.verify(post("https://hub/in/src", body, JSON, headers))
        except HttpError as refused:
            return refused.detail
        return None

    assert verify_stamped(-240) is None and verify_stamped(240) is None
    assert verify_stamped(-360) == "webhook-timestamp is older than the 5-minute tolerance"
    assert verify_stamped(360) == "webhook-timestamp is more than 5 minutes in the future"


def test_generic_api_key_either_key() -> None:
    generic = GenericSource(rotated("generic", api_key=["key-new", "key-old"]))
    for key in ("key-new", "key-old"):
        generic.verify(post("https://hub/in/src", b"{}", JSON, {"authorization": f"Bearer {key}"}))
    with pytest.raises(HttpError) as refused:
        generic.verify(post("https://hub/in/src", b"{}", JSON, {"authorization": "Bearer key-3"}))
    assert (refused.value.status, refused.value.error) == (401, "invalid_api_key")


def test_whatsapp_cloud_signature_and_handshake_with_either() -> None:
    meta = source_for(
        rotated("whatsapp_cloud", app_secret=["new", "old"], verify_token=["vt-new", "vt-old"])
    )
    body = fixture_bytes("whatsapp_cloud/text.json")

    def signed_with(secret: str) -> InboundRequest:
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return post("https://hub/in/src", body, JSON, {"x-hub-signature-256": f"sha256={digest}"})

    meta.verify(signed_with("new"))
    meta.verify(signed_with("old"))
    with pytest.raises(HttpError) as refused:
        meta.verify(signed_with("third"))
    assert (refused.value.status, refused.value.error) == (401, "invalid_signature")

    def handshake(token: str) -> str:
        query = f"hub.mode=subscribe&hub.verify_token={token}&hub.challenge=42"
        return meta.handshake(InboundRequest.build("GET", f"https://hub/in/src?{query}"))

    assert handshake("vt-new") == handshake("vt-old") == "42"
    with pytest.raises(HttpError) as forbidden:
        handshake("vt-third")
    assert forbidden.value.status == 403


def test_twilio_signature_with_either_token_and_sends_with_the_first() -> None:
    config = rotated(
        "twilio", auth_token=["new", "old"], account_sid="AC1", **{"from": "whatsapp:+1555"}
    )
    twilio = source_for(config)
    url = "https://hub/in/src"
    params = {"MessageSid": ["SM1"], "Body": ["oi"]}
    body = b"MessageSid=SM1&Body=oi"

    def signed_with(token: str) -> InboundRequest:
        given = twilio_signature(token.encode(), url, params)
        return post(url, body, FORM, {"x-twilio-signature": given})

    twilio.verify(signed_with("new"))
    twilio.verify(signed_with("old"))
    with pytest.raises(HttpError) as refused:
        twilio.verify(signed_with("third"))
    assert refused.value.status == 401
    # Its sends authenticate with the first token (tests/integration/whatsapp_send).
    assert config.value_of("auth_token") == "new"


@pytest.mark.parametrize("kind", ["zapi", "sendpulse"])
def test_url_token_either(kind: str) -> None:
    provider = source_for(rotated(kind, token=["tok-new", "tok+old"]))
    provider.verify(post("https://hub/in/src?token=tok-new", b"{}"))
    provider.verify(post("https://hub/in/src?token=tok+old", b"{}"))  # `+` as written
    with pytest.raises(HttpError) as refused:
        provider.verify(post("https://hub/in/src?token=tok-third", b"{}"))
    assert (refused.value.status, refused.value.error) == (401, "invalid_token")


# -- signing ------------------------------------------------------------------------------------


def test_two_secrets_sign_twice_and_either_receiver_verifies() -> None:
    body = b'{"id": "evt_1"}'
    stamp = int(time.time())
    header = sign_webhook([NEW_WHSEC, OLD_WHSEC], "evt_1", stamp, body)
    first, second = header.split(" ")
    assert first == sign_webhook(NEW_WHSEC, "evt_1", stamp, body)  # current first
    assert second == sign_webhook(OLD_WHSEC, "evt_1", stamp, body)
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(stamp), "webhook-signature": header}
    for secret in (NEW_WHSEC, OLD_WHSEC):
        Webhook(secret).verify(body.decode(), headers)
    with pytest.raises(Exception, match="No matching signature found"):
        Webhook(OTHER_WHSEC).verify(body.decode(), headers)

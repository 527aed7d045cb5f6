"""The limits and validation the fakes enforce on their own, as the contracts document them.

Meta (contracts §1.8): 80 messages/s per number → 130429, and the pair rate limit of one
message per 6 s to a user with bursts of up to 45 → 131056; a text body over 4096
characters; a send to the business's own number (131021). Twilio: a Body over 1600
characters (21617); API key credentials (§2.4). SendPulse (§9.7): 10 requests per second →
429 `error_code` 2020202020; tokens expiring after `expires_in` (§9.6); the by-phone
message types and the template's language code (§9.5). Every limit is a per-instance
setting (None turns it off); the tests move the fakes' clock instead of sleeping.
"""

from __future__ import annotations

import base64
from typing import Any

import aiohttp

from estafeta.testing.fakes import FakeMeta, FakeSendPulse, FakeTwilio
from tests.integration.whatsapp_send.support import SP, TW, WA


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def text(to: str, body: str = "Olá!") -> dict[str, Any]:
    return {"messaging_product": "whatsapp", "to": to, "type": "text", "text": {"body": body}}


async def meta_send(
    session: aiohttp.ClientSession, meta: FakeMeta, payload: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    url = f"{meta.url}/v25.0/{WA['phone_number_id']}/messages"
    headers = {"Authorization": f"Bearer {WA['access_token']}"}
    async with session.post(url, json=payload, headers=headers) as reply:
        return reply.status, await reply.json()


def new_meta(**limits: Any) -> FakeMeta:
    return FakeMeta(
        access_token=WA["access_token"],
        phone_number_id=WA["phone_number_id"],
        app_secret=WA["app_secret"],
        **limits,
    )


async def test_meta_limits_default_to_the_documented_ones() -> None:
    meta = new_meta()
    assert meta.throughput.limit == 80
    assert (meta.pair_limit.interval_s, meta.pair_limit.burst) == (6.0, 45)
    assert meta.max_text == 4096


async def test_meta_answers_130429_over_the_throughput(session: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with new_meta(throughput_mps=3, pair_burst=None) as meta:
        meta.clock = clock
        for n in range(3):
            status, _ = await meta_send(session, meta, text(f"+55119876543{n:02d}"))
            assert status == 200
        status, answer = await meta_send(session, meta, text("+5511987654399"))
        assert status == 400
        assert answer["error"]["code"] == 130429
        assert answer["error"]["type"] == "OAuthException"
        assert "too many messages" in answer["error"]["error_data"]["details"]
        assert len(meta.sent) == 3  # the throttled send was not taken
        clock.now += 1.0  # the next second
        status, _ = await meta_send(session, meta, text("+5511987654399"))
        assert status == 200


async def test_meta_answers_131056_over_the_pair_rate(session: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with new_meta() as meta:
        meta.clock = clock
        maria, joao = "+5511987654321", "+5511912345678"
        for _ in range(45):  # the documented burst, all in the same instant
            status, _ = await meta_send(session, meta, text(maria))
            assert status == 200
        status, answer = await meta_send(session, meta, text(maria))
        assert status == 400
        assert answer["error"]["code"] == 131056
        assert "same phone number" in answer["error"]["error_data"]["details"]
        status, _ = await meta_send(session, meta, text(joao))  # another pair is free
        assert status == 200
        clock.now += 6.0  # one more message's worth of quota
        assert (await meta_send(session, meta, text(maria)))[0] == 200
        status, answer = await meta_send(session, meta, text(maria))
        assert (status, answer["error"]["code"]) == (400, 131056)
        assert len(meta.sent) == 47


async def test_meta_pair_rate_is_one_message_per_6_s(session: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with new_meta(pair_burst=1) as meta:
        meta.clock = clock
        assert (await meta_send(session, meta, text("+5511987654321")))[0] == 200
        clock.now += 5.9
        status, answer = await meta_send(session, meta, text("+5511987654321"))
        assert (status, answer["error"]["code"]) == (400, 131056)
        clock.now += 0.1
        assert (await meta_send(session, meta, text("+5511987654321")))[0] == 200


async def test_meta_limits_can_be_turned_off(session: aiohttp.ClientSession) -> None:
    async with new_meta(throughput_mps=None, pair_burst=None) as meta:
        for _ in range(50):
            status, _ = await meta_send(session, meta, text("+5511987654321"))
            assert status == 200


async def test_meta_refuses_a_text_over_4096_characters(session: aiohttp.ClientSession) -> None:
    async with new_meta() as meta:
        assert (await meta_send(session, meta, text("+5511987654321", "a" * 4096)))[0] == 200
        status, answer = await meta_send(session, meta, text("+5511912345678", "a" * 4097))
        assert (status, answer["error"]["code"]) == (400, 100)
        assert "4096" in answer["error"]["error_data"]["details"]


async def test_meta_refuses_sending_to_its_own_number(session: aiohttp.ClientSession) -> None:
    async with new_meta() as meta:
        status, answer = await meta_send(session, meta, text(f"+{meta.display_phone_number}"))
        assert (status, answer["error"]["code"]) == (400, 131021)
        assert meta.sent == []


async def twilio_send(
    session: aiohttp.ClientSession, twilio: FakeTwilio, form: dict[str, str], user: str, pw: str
) -> tuple[int, dict[str, Any]]:
    url = f"{twilio.url}/2010-04-01/Accounts/{TW['account_sid']}/Messages.json"
    auth = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
    async with session.post(url, data=form, headers={"Authorization": auth}) as reply:
        return reply.status, await reply.json()


async def test_twilio_refuses_a_body_over_1600_characters(
    session: aiohttp.ClientSession, twilio: FakeTwilio
) -> None:
    form = {"To": "whatsapp:+5511987654321", "From": TW["from"], "Body": "a" * 1600}
    creds = TW["account_sid"], TW["auth_token"]
    assert (await twilio_send(session, twilio, form, *creds))[0] == 201
    status, answer = await twilio_send(session, twilio, form | {"Body": "a" * 1601}, *creds)
    assert (status, answer["code"], answer["status"]) == (400, 21617, 400)
    assert answer["more_info"] == "https://www.twilio.com/docs/errors/21617"
    assert len(twilio.sent) == 1


async def test_twilio_takes_an_api_key(session: aiohttp.ClientSession) -> None:
    key, secret = "SK0123456789abcdef0123456789abcdef", "key-secret"
    async with FakeTwilio(
        account_sid=TW["account_sid"], auth_token=TW["auth_token"], api_keys={key: secret}
    ) as twilio:
        form = {"To": "whatsapp:+5511987654321", "From": TW["from"], "Body": "Olá"}
        assert (await twilio_send(session, twilio, form, key, secret))[0] == 201
        status, answer = await twilio_send(session, twilio, form, key, "wrong")
        assert (status, answer["code"]) == (401, 20003)


def new_sendpulse(**limits: Any) -> FakeSendPulse:
    return FakeSendPulse(
        client_id=SP["client_id"],
        client_secret=SP["client_secret"],
        bot_id=SP["bot_id"],
        **limits,
    )


async def sp_token(session: aiohttp.ClientSession, sendpulse: FakeSendPulse) -> int:
    """The status of a token request."""
    credentials = {"client_id": SP["client_id"], "client_secret": SP["client_secret"]}
    document = {"grant_type": "client_credentials"} | credentials
    async with session.post(f"{sendpulse.url}/oauth/access_token", json=document) as reply:
        return reply.status


async def sp_send(
    session: aiohttp.ClientSession,
    sendpulse: FakeSendPulse,
    token: str,
    body: dict[str, Any] | None = None,
    path: str = "sendByPhone",
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    message = {"type": "text", "text": {"body": "Olá"}}
    body = body or {"bot_id": SP["bot_id"], "phone": "5511987654321", "message": message}
    url = f"{sendpulse.url}/whatsapp/contacts/{path}"
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json(), r


async def get_token(session: aiohttp.ClientSession, sendpulse: FakeSendPulse) -> str:
    credentials = {"client_id": SP["client_id"], "client_secret": SP["client_secret"]}
    document = {"grant_type": "client_credentials"} | credentials
    async with session.post(f"{sendpulse.url}/oauth/access_token", json=document) as reply:
        assert reply.status == 200
        token: str = (await reply.json())["access_token"]
        return token


async def test_sendpulse_answers_429_over_10_requests_a_second(
    session: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    async with new_sendpulse() as sendpulse:
        sendpulse.clock = clock
        token = await get_token(session, sendpulse)  # the token request counts too
        for _ in range(9):
            assert (await sp_send(session, sendpulse, token))[0] == 200
        status, answer, reply = await sp_send(session, sendpulse, token)
        assert (status, answer) == (
            429,
            {"message": "More than 10 requests per second", "error_code": 2020202020},
        )
        assert "Retry-After" not in reply.headers
        assert await sp_token(session, sendpulse) == 429
        assert len(sendpulse.sent) == 9
        clock.now += 1.0
        assert (await sp_send(session, sendpulse, token))[0] == 200


async def test_sendpulse_rate_can_be_raised_or_turned_off(
    session: aiohttp.ClientSession,
) -> None:
    async with new_sendpulse(requests_per_second=None) as sendpulse:
        token = await get_token(session, sendpulse)
        for _ in range(15):
            assert (await sp_send(session, sendpulse, token))[0] == 200
    assert new_sendpulse().rate.limit == 10
    assert new_sendpulse(requests_per_second=50).rate.limit == 50


async def test_sendpulse_tokens_expire_after_expires_in(session: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with new_sendpulse(token_ttl_s=3600) as sendpulse:
        sendpulse.clock = clock
        token = await get_token(session, sendpulse)
        clock.now += 3599
        assert (await sp_send(session, sendpulse, token))[0] == 200
        clock.now += 1
        status, answer, _ = await sp_send(session, sendpulse, token)
        assert (status, answer) == (401, {"message": "Unauthorized!", "error_code": 401})


async def test_sendpulse_validates_by_phone_types_and_template_language(
    session: aiohttp.ClientSession,
) -> None:
    async with new_sendpulse() as sendpulse:
        token = await get_token(session, sendpulse)
        reaction = {"type": "reaction", "reaction": {"message_id": "x", "emoji": "👍"}}
        body = {"bot_id": SP["bot_id"], "phone": "5511987654321", "message": reaction}
        assert (await sp_send(session, sendpulse, token, body))[0] == 400
        by_id = {"contact_id": "66b2e3f4a5b6c7d8e9f00112", "message": reaction}
        assert (await sp_send(session, sendpulse, token, by_id, "send"))[0] == 200
        template = {"name": "confirmacao", "language": {}}
        body = {"bot_id": SP["bot_id"], "phone": "5511987654321", "template": template}
        assert (await sp_send(session, sendpulse, token, body, "sendTemplateByPhone"))[0] == 400
        body["template"] = {"name": "confirmacao", "language": {"code": "pt_BR"}}
        assert (await sp_send(session, sendpulse, token, body, "sendTemplateByPhone"))[0] == 200

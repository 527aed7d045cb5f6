"""Ingest and the API over HTTP (ASGI), against both engines: each bad input answers its
documented status with `{error, detail}` and stores nothing."""

from __future__ import annotations

import gzip
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import msgspec
import orjson
import pytest
from sqlalchemy import text

from estafeta.api.app import create_app
from estafeta.api.auth import hash_key
from estafeta.api.cursors import encode_cursor
from estafeta.config import Config, load_config_dict
from estafeta.hub import Hub
from estafeta.ingress.ratelimit import TenantRateLimiter
from estafeta.observability.metrics import REGISTRY
from estafeta.routing.filter import EVENT_FIELDS
from estafeta.store.records import NewDelivery, NewEvent
from estafeta.store.sqlstore import SqlStore
from tests.conftest import base_config, lease_any, signed
from tests.deep_json import nested, nested_text
from tests.events import new_event
from tests.integration.redis_support import SHARED_REDIS_URL
from tests.integration.test_messaging import WA_SOL, tenant_rows

ADMIN = {"authorization": "Bearer test-admin-key"}
SOL_KEY = "est_sol_key_for_tests_0000000000000000000"
OUTRA_KEY = "est_outra_key_for_tests_00000000000000000"


@dataclass
class Client:
    http: httpx.AsyncClient
    store: SqlStore
    hub: Hub

    async def stored(self) -> int:
        """How many deliveries exist: every accepted event here makes at least one."""
        return sum((await self.store.queue_stats(history=True)).by_state.values())


MESSAGE = orjson.dumps({"type": "message.received", "data": {"kind": "text", "text": "Olá"}})


async def make_client(store: SqlStore, config: Config) -> AsyncIterator[Client]:
    await store.create_api_key(
        tenant_id="clinica-sol", key_hash=hash_key(SOL_KEY), label="", actor="test", now_ms=1
    )
    await store.create_api_key(
        tenant_id="outra", key_hash=hash_key(OUTRA_KEY), label="", actor="test", now_ms=1
    )
    hub = Hub(config, store)
    app = create_app(hub)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        yield Client(http, store, hub)
    await hub.close()


@pytest.fixture
async def client(store: SqlStore, config: Config) -> AsyncIterator[Client]:
    async for made in make_client(store, config):
        yield made


async def test_a_signed_webhook_is_accepted_and_its_deliveries_stored(client: Client) -> None:
    r = await client.http.post("/in/crm-events", content=MESSAGE, headers=signed(MESSAGE))
    assert r.status_code == 202
    body = r.json()
    assert body["id"].startswith("evt_") and body["duplicate"] is False
    event = (await client.http.get(f"/api/v1/events/{body['id']}", headers=ADMIN)).json()
    assert event["type"] == "message.received"
    assert event["event"]["data"] == {"kind": "text", "text": "Olá"}
    assert event["event"]["tenant"] == "clinica-sol" and event["event"]["source"] == "crm-events"
    assert [d["destination"] for d in event["deliveries"]] == ["crm"]
    assert event["deliveries"][0]["state"] == "pending"


async def test_a_redelivered_webhook_answers_200_with_the_original_id(client: Client) -> None:
    first = await client.http.post("/in/crm-events", content=MESSAGE, headers=signed(MESSAGE))
    again = await client.http.post("/in/crm-events", content=MESSAGE, headers=signed(MESSAGE))
    assert (again.status_code, again.json()) == (200, {"id": first.json()["id"], "duplicate": True})
    assert await client.stored() == 1


async def test_a_body_without_type_becomes_data_of_the_sources_event_type(client: Client) -> None:
    body = orjson.dumps({"lead": {"name": "Maria"}})
    r = await client.http.post("/in/crm-events", content=body, headers=signed(body, "m2"))
    assert r.status_code == 202
    event = (await client.http.get(f"/api/v1/events/{r.json()['id']}", headers=ADMIN)).json()
    assert event["type"] == "crm.webhook" and event["event"]["data"] == {"lead": {"name": "Maria"}}


async def test_a_nul_in_a_webhooks_type_is_stored_and_delivered_as_one_type_on_both_engines(
    client: Client,
) -> None:
    """Webhooks take NUL, and where it becomes a stored name it is U+FFFD: PostgreSQL stored
    the type so while delivering U+0000 (and SQLite stored U+0000), so the type an operator
    saw and filtered on was not the one destinations got, and differed by engine."""
    body = orjson.dumps({"type": "lead.\u0000new", "data": {"note": "a\u0000b"}})
    r = await client.http.post("/in/crm-events", content=body, headers=signed(body, "nul-type"))
    assert r.status_code == 202, r.text
    event = (await client.http.get(f"/api/v1/events/{r.json()['id']}", headers=ADMIN)).json()
    assert event["type"] == event["event"]["type"] == "lead.\ufffdnew"
    assert event["event"]["data"] == {"note": "a\u0000b"}  # data keeps what was sent


async def test_long_numbers_within_64_bits_and_long_digit_strings_arrive_exactly(
    client: Client,
) -> None:
    # Both edges orjson keeps exact, and a run of digits in a string (which sends the body
    # through the exact check without refusing it).
    body = (
        b'{"type": "order.paid", "data": {"max": 18446744073709551615,'
        b' "min": -9223372036854775808, "ref": "123456789012345678901234"}}'
    )
    r = await client.http.post("/in/crm-events", content=body, headers=signed(body, "m-long"))
    assert r.status_code == 202, r.text
    event = (await client.http.get(f"/api/v1/events/{r.json()['id']}", headers=ADMIN)).json()
    assert event["event"]["data"] == {
        "max": 2**64 - 1,
        "min": -(2**63),
        "ref": "123456789012345678901234",
    }


async def test_data_nested_as_deep_as_it_can_be_stored_arrives_whole(client: Client) -> None:
    body = b'{"type": "x.y", "data": %s}' % nested_text(252)
    r = await client.http.post("/in/crm-events", content=body, headers=signed(body, "m-deep"))
    assert r.status_code == 202, r.text
    # Read back where it is written deepest: the event's answer wraps it twice.
    event = (await client.http.get(f"/api/v1/events/{r.json()['id']}", headers=ADMIN)).json()
    assert event["event"]["data"] == nested(252)


async def test_data_reaches_destinations_as_the_same_json_as_add_a_destination_says(
    client: Client,
) -> None:
    """docs/how-to/add-a-destination.md §4: read and written again, the same JSON but not
    the same bytes; on both engines alike, and what the workers send is what GET shows."""
    body = (
        b'{"type": "appointment.booked", "data": {"status": "ok", "z": 1, "a": 1, "a": 2,'
        b' "name": "Jo\\u00e3o \\u0000 \\ud83d\\ude00", "big": 18446744073709551615,'
        b' "e": 1E5, "long": 0.1000000000000000055, "tiny": 1e-400, "neg": -0.0}}'
    )
    r = await client.http.post("/in/crm-events", content=body, headers=signed(body, "m-same"))
    assert r.status_code == 202, r.text
    [delivery, _] = await lease_any(client.store, now_ms=int(time.time() * 1000) + 60_000)
    sent = delivery.payload
    assert sent.endswith(
        '"data":{"status":"ok","z":1,"a":2,"name":"João \\u0000 😀",'
        '"big":18446744073709551615,"e":100000.0,"long":0.1,"tiny":0.0,"neg":-0.0}}'.encode()
    ), sent
    event = (await client.http.get(f"/api/v1/events/{r.json()['id']}", headers=ADMIN)).json()
    assert event["event"] == orjson.loads(sent)


async def test_routing_filter_decides_the_fan_out(client: Client) -> None:
    for status, expected in (("confirmed", ["billing", "crm"]), ("draft", [])):
        body = orjson.dumps({"type": "appointment.booked", "data": {"status": status}})
        r = await client.http.post(
            "/in/crm-events", content=body, headers=signed(body, f"apt-{status}")
        )
        assert r.status_code == 202
        event = (await client.http.get(f"/api/v1/events/{r.json()['id']}", headers=ADMIN)).json()
        assert sorted(d["destination"] for d in event["deliveries"]) == expected


async def test_an_api_key_source_accepts_its_key_only(client: Client) -> None:
    good = {"content-type": "application/json", "authorization": "Bearer source-key-1"}
    assert (await client.http.post("/in/keyed", content=MESSAGE, headers=good)).status_code == 202
    bad = {**good, "authorization": "Bearer nope"}
    r = await client.http.post("/in/keyed", content=MESSAGE, headers=bad)
    assert (r.status_code, r.json()["error"]) == (401, "invalid_api_key")
    assert await client.stored() == 1


async def test_an_api_key_sources_refusals_name_the_bearer_scheme(client: Client) -> None:
    """The ingest endpoint's own 401s for an `api_key` source challenge as the API's do
    (RFC 9110 §11.6.1, RFC 6750 §3); a refused signature names no scheme: no key would help."""
    cases = [
        ({}, "missing_credentials", 'Bearer realm="estafeta"'),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key", 'Bearer realm="estafeta"'),
        (
            {"authorization": "Bearer nope"},
            "invalid_api_key",
            'Bearer realm="estafeta", error="invalid_token"',
        ),
    ]
    for headers, error, challenge in cases:
        sent = {"content-type": "application/json", **headers}
        r = await client.http.post("/in/keyed", content=MESSAGE, headers=sent)
        assert (r.status_code, r.json()["error"]) == (401, error), headers
        assert r.headers.get("www-authenticate") == challenge, headers
    # RFC 9110 §11.4: the spaces after the scheme are no part of the key (as in the API).
    spaced = {"content-type": "application/json", "authorization": "Bearer   source-key-1"}
    assert (await client.http.post("/in/keyed", content=MESSAGE, headers=spaced)).status_code == 202
    for headers in (_tampered(), _no_signature()):
        r = await client.http.post("/in/crm-events", content=MESSAGE, headers=headers)
        assert r.status_code == 401 and "www-authenticate" not in r.headers
    assert await client.stored() == 1


async def test_a_revoked_key_is_answered_exactly_as_an_unknown_key(client: Client) -> None:
    """`estafeta keys revoke`: the API refuses the key with the body an unknown key gets, so
    whoever holds it learns nothing about it (a fresh API process has no cached keys)."""
    [sol] = await client.store.list_api_keys("clinica-sol")
    assert await client.store.revoke_api_key(sol.id, actor="test", now_ms=2) is not None
    answers = []
    for key in (SOL_KEY, "est_never_issued_000000000000000000000000"):
        r = await client.http.post(
            "/api/v1/events",
            json={"type": "lead.created", "data": {}},
            headers={"authorization": f"Bearer {key}"},
        )
        answers.append((r.status_code, r.json()))
    assert answers[0] == answers[1]
    assert answers[0][0] == 401 and answers[0][1]["error"] == "invalid_api_key"
    assert await client.stored() == 0


async def test_every_refusal_of_credentials_names_the_bearer_scheme(client: Client) -> None:
    """A 401 must say how to authenticate (RFC 9110 §11.6.1, RFC 6750 §3): clients and
    proxies that follow the standard read `WWW-Authenticate`, not the JSON body."""
    cases = [
        ({}, "missing_credentials", 'Bearer realm="estafeta"'),
        ({"authorization": "Bearer"}, "invalid_credentials", 'Bearer realm="estafeta"'),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "invalid_credentials", 'Bearer realm="estafeta"'),
        (
            {"authorization": "Bearer est_never_issued_000000000000000000000000"},
            "invalid_api_key",
            'Bearer realm="estafeta", error="invalid_token"',
        ),
    ]
    for headers, error, challenge in cases:
        for method, path in [("GET", "/api/v1/dlq"), ("GET", "/health/detailed")]:
            r = await client.http.request(method, path, headers=headers)
            assert (r.status_code, r.json()["error"]) == (401, error), (headers, path)
            assert r.headers.get("www-authenticate") == challenge, (headers, path)
    # A known key lacking the right is a 403: no challenge, another key would not help it.
    r = await client.http.get("/health/detailed", headers={"authorization": f"Bearer {SOL_KEY}"})
    assert r.status_code == 403 and "www-authenticate" not in r.headers


async def test_a_key_after_several_spaces_is_the_key(client: Client) -> None:
    # RFC 9110 §11.4: credentials are `auth-scheme 1*SP token68`; the spaces are no part of
    # the key, which was refused as unknown.
    for key in (SOL_KEY, "test-admin-key"):
        r = await client.http.get("/api/v1/dlq", headers={"authorization": f"Bearer   {key}"})
        assert r.status_code == 200, key


async def test_a_key_of_a_tenant_removed_from_the_configuration_is_refused(
    store: SqlStore, database_url: str
) -> None:
    """A business that left is taken out of the configuration; the store keeps its rows and
    its keys (nothing is deleted), but its key no longer publishes or reads anything."""
    data = base_config(database_url)
    for section in ("sources", "destinations", "routes"):
        data[section] = [entry for entry in data[section] if entry.get("tenant") != "outra"]
    data["tenants"] = [t for t in data["tenants"] if t["id"] != "outra"]
    async for client in make_client(store, load_config_dict(data)):
        outra = {"authorization": f"Bearer {OUTRA_KEY}"}
        published = await client.http.post(
            "/api/v1/events", json={"type": "lead.created", "data": {}}, headers=outra
        )
        assert (published.status_code, published.json()["error"]) == (401, "invalid_api_key")
        read = await client.http.get("/api/v1/conversations", headers=outra)
        assert (read.status_code, read.json()["error"]) == (401, "invalid_api_key")
        assert await client.stored() == 0
        sol = {"authorization": f"Bearer {SOL_KEY}"}
        kept = await client.http.post(
            "/api/v1/events", json={"type": "lead.created", "data": {}}, headers=sol
        )
        assert kept.status_code == 202


def _expired() -> dict[str, str]:
    return signed(MESSAGE, ts=int(time.time()) - 3600)


def _signed_message() -> dict[str, str]:
    return signed(MESSAGE)


def _signed_empty() -> dict[str, str]:
    return signed(b"{}")


def _tampered() -> dict[str, str]:
    return signed(MESSAGE.replace(b"Ol", b"Xx"))


def _no_signature() -> dict[str, str]:
    return {"content-type": "application/json"}


def _garbage_signature() -> dict[str, str]:
    return {**signed(MESSAGE), "webhook-signature": "nonsense"}


def _keyed() -> dict[str, str]:
    return {"content-type": "application/json", "authorization": "Bearer source-key-1"}


def _wrong_type() -> dict[str, str]:
    return {**signed(MESSAGE), "content-type": "text/plain"}


# Headers are made when the test runs, not when it is collected: a signature stamped at
# collection is past the 5-minute tolerance by the time a long suite reaches the test.
@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "error", "detail_part"),
    [
        ("/in/nope", MESSAGE, _signed_message, 404, "unknown_source", "no source named 'nope'"),
        ("/in/crm-events", MESSAGE, _tampered, 401, "invalid_signature", "does not match"),
        ("/in/crm-events", MESSAGE, _expired, 401, "invalid_signature", "older than"),
        ("/in/crm-events", MESSAGE, _no_signature, 401, "missing_signature", "webhook-id"),
        ("/in/crm-events", MESSAGE, _garbage_signature, 401, "invalid_signature", "malformed"),
        ("/in/crm-events", MESSAGE, _wrong_type, 415, "unsupported_media_type", "text/plain"),
        (
            "/in/crm-events",
            b"{not json",
            lambda: signed(b"{not json"),
            400,
            "invalid_json",
            "not valid",
        ),
        (  # parsed as infinity, it would reach the destinations as null
            "/in/crm-events",
            b'{"type": "lead.new", "data": {"n": 1e400}}',
            lambda: signed(b'{"type": "lead.new", "data": {"n": 1e400}}'),
            400,
            "invalid_json",
            "not valid",
        ),
        (  # read as the nearest double, it would reach the destinations rounded
            "/in/crm-events",
            b'{"type": "order.paid", "data": {"lines": [{"id": 123456789012345678901}]}}',
            lambda: signed(
                b'{"type": "order.paid", "data": {"lines": [{"id": 123456789012345678901}]}}'
            ),
            400,
            "invalid_body",
            "body.data.lines.0.id: an integer beyond 64 bits",
        ),
        (  # orjson writes no deeper: it failed after parsing, a 500 the sender retried
            "/in/crm-events",
            b'{"type": "x.y", "data": %s}' % nested_text(253),
            lambda: signed(b'{"type": "x.y", "data": %s}' % nested_text(253)),
            400,
            "invalid_body",
            "body.data: arrays and objects nested more than 252 deep",
        ),
        (  # the whole body as the source's event_type's data
            "/in/crm-events",
            nested_text(253),
            lambda: signed(nested_text(253)),
            400,
            "invalid_body",
            "body: arrays and objects nested more than 252 deep",
        ),
        (
            "/in/crm-events",
            b"[1, 2]",
            lambda: signed(b"[1, 2]"),
            400,
            "invalid_body",
            "JSON object",
        ),
        ("/in/crm-events", b"\xff\xfe", _signed_empty, 400, "invalid_body", "UTF-8"),
        (  # with an API key it was `invalid_json`, "surrogates not allowed" (orjson's words)
            "/in/keyed",
            '{"type": "lead.new", "data": {"city": "Paraná"}}'.encode("latin-1"),
            _keyed,
            400,
            "invalid_body",
            "the body is not UTF-8 at byte 44",
        ),
        ("/in/crm-events", b"x" * 1_048_577, _signed_empty, 413, "body_too_large", "limit"),
        # `keyed` has no event_type: a body that names no type has nowhere to go.
        ("/in/keyed", b'{"lead": {}}', _keyed, 400, "invalid_body", '"type" (a string)'),
        ("/in/keyed", b'{"type": "", "data": {}}', _keyed, 400, "invalid_type", "1 to 200"),
        (  # taken as no key: a client's retries were stored twice, where the API refuses it
            "/in/keyed",
            MESSAGE,
            lambda: {**_keyed(), "idempotency-key": ""},
            400,
            "invalid_idempotency_key",
            "the Idempotency-Key header is empty",
        ),
        (
            "/in/keyed",
            orjson.dumps({"type": "x" * 201, "data": {}}),
            _keyed,
            400,
            "invalid_type",
            "1 to 200",
        ),
        (  # read as it came, it was refused as "the body is not UTF-8 at byte 1"
            "/in/keyed",
            gzip.compress(MESSAGE),
            lambda: {**_keyed(), "content-encoding": "gzip"},
            415,
            "unsupported_media_type",
            "Content-Encoding 'gzip' is not accepted: send the body uncompressed",
        ),
    ],
    ids=[
        "unknown-source",
        "tampered",
        "expired",
        "unsigned",
        "garbage-signature",
        "content-type",
        "invalid-json",
        "number-beyond-a-double",
        "integer-beyond-64-bits",
        "nested-too-deep",
        "body-nested-too-deep",
        "not-an-object",
        "not-utf8",
        "not-utf8-with-an-api-key",
        "too-large",
        "no-type-nor-event-type",
        "empty-type",
        "empty-idempotency-key",
        "type-too-long",
        "compressed",
    ],
)
async def test_bad_ingest_is_refused_with_a_clear_error_and_stores_nothing(
    client: Client,
    path: str,
    body: bytes,
    headers: Callable[[], dict[str, str]],
    status: int,
    error: str,
    detail_part: str,
) -> None:
    source = path.removeprefix("/in/")
    counted = {"source": "" if source == "nope" else source, "error": error}
    before = REGISTRY.get_sample_value("estafeta_ingest_refused_total", counted) or 0
    r = await client.http.post(path, content=body, headers=headers())
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    assert detail_part in r.json()["detail"]
    assert await client.stored() == 0
    # Counted for the operator: a provider whose every webhook is refused is seen.
    assert REGISTRY.get_sample_value("estafeta_ingest_refused_total", counted) == before + 1


async def test_over_the_tenants_rate_limit_answers_429_with_retry_after(
    store: SqlStore, database_url: str
) -> None:
    data = base_config(database_url)
    data["tenants"][0]["ingress_rate_limit"] = "2/minute"
    async for client in make_client(store, load_config_dict(data)):
        answers = [
            await client.http.post(
                "/in/crm-events", content=MESSAGE, headers=signed(MESSAGE, f"m{i}")
            )
            for i in range(3)
        ]
        assert [a.status_code for a in answers] == [202, 202, 429]
        assert int(answers[2].headers["retry-after"]) >= 1
        assert answers[2].json()["error"] == "rate_limited"
        assert await client.stored() == 2


class FakeClock:
    """Wall time in seconds, as the rate limiter reads it, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("limiter", ["memory", "redis"])
async def test_every_write_door_draws_from_one_tenant_budget_and_a_429_changes_nothing(
    store: SqlStore, database_url: str, limiter: str, request: pytest.FixtureRequest
) -> None:
    # configuration.md: `ingress_rate_limit` counts every request that makes a tenant's
    # events: its webhooks on /in/, POST /api/v1/events, POST /api/v1/messages and
    # conversation escalations together. Escalations were not counted: a tenant's key
    # could send whoever takes over escalation after escalation, each one deliveries,
    # without limit.
    data = base_config(database_url)
    data["tenants"][0]["ingress_rate_limit"] = "4/minute"
    data["sources"].append(WA_SOL)  # a number that sends through the fake Meta
    data["routes"].append(
        {
            "id": "escalations",
            "tenant": "clinica-sol",
            "events": ["conversation.escalated"],
            "destinations": ["billing"],
        }
    )
    if limiter == "redis":
        prefix: str = request.getfixturevalue("shared_prefix")
        data["redis"] = {"url": SHARED_REDIS_URL, "key_prefix": prefix}
    config = load_config_dict(data)
    sol = {"authorization": f"Bearer {SOL_KEY}"}
    async for client in make_client(store, config):
        hub = client.hub
        clock = FakeClock(1_000_020.0)  # the start of a minute: no earlier window weighs
        await hub.rate_limiter.aclose()
        hub.rate_limiter = TenantRateLimiter(
            config, clock=clock, redis=hub.redis, key_prefix=config.redis.key_prefix
        )
        for n in (1, 2):  # a conversation to escalate in each round
            await hub.accept(
                tenant_id="clinica-sol",
                source_id="wa-sol",
                event_type="message.received",
                data={"conversation_id": f"551190000000{n}", "kind": "text", "text": "Oi"},
                idempotency_key=f"wamid.{n}",
            )

        async def each_way(http: httpx.AsyncClient, n: int) -> list[httpx.Response]:
            """A webhook, a publish, a send and an escalation of clinica-sol's, each with
            an idempotency key of round `n`."""
            return [
                await http.post(
                    "/in/crm-events", content=MESSAGE, headers=signed(MESSAGE, f"m{n}")
                ),
                await http.post(
                    "/api/v1/events", json={"type": "lead.new", "idempotency_key": f"e{n}"},
                    headers=sol,
                ),
                await http.post(
                    "/api/v1/messages",
                    json={"source": "wa-sol", "to": "+5511987654321", "text": f"Olá {n}"},
                    headers={**sol, "idempotency-key": f"s{n}"},
                ),
                await http.post(
                    f"/api/v1/conversations/551190000000{n}/escalate",
                    json={"reason": "asked for a nurse"},
                    headers={**sol, "idempotency-key": f"x{n}"},
                ),
            ]  # fmt: skip

        assert [r.status_code for r in await each_way(client.http, 1)] == [202] * 4
        before = await tenant_rows(store, "clinica-sol")
        over = await each_way(client.http, 2)
        assert [(r.status_code, r.json().get("error")) for r in over] == [(429, "rate_limited")] * 4
        assert all(int(r.headers["retry-after"]) >= 1 for r in over)
        # Refused: no event, no delivery, no message, no escalation, no key taken.
        assert await tenant_rows(store, "clinica-sol") == before
        conversation = await client.http.get("/api/v1/conversations/5511900000002", headers=sol)
        assert conversation.json()["status"] == "open"
        # Another tenant's budget is its own.
        outra = {"authorization": f"Bearer {OUTRA_KEY}"}
        r = await client.http.post("/api/v1/events", json={"type": "lead.new"}, headers=outra)
        assert r.status_code == 202
        # Once the budget refills, the refused requests' keys are still free: each is done
        # now, as a first time.
        clock.now += 120
        again = await each_way(client.http, 2)
        assert [(r.status_code, r.json()["duplicate"]) for r in again] == [(202, False)] * 4


async def test_publishing_with_a_tenant_key_and_idempotency(client: Client) -> None:
    auth = {"authorization": f"Bearer {SOL_KEY}"}
    event = {
        "type": "appointment.booked",
        "data": {"status": "confirmed"},
        "idempotency_key": "apt-1",
        "priority": 0,
    }
    first = await client.http.post("/api/v1/events", json=event, headers=auth)
    assert first.status_code == 202
    again = await client.http.post("/api/v1/events", json=event, headers=auth)
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    view = (await client.http.get(f"/api/v1/events/{first.json()['id']}", headers=auth)).json()
    assert {d["priority"] for d in view["deliveries"]} == {0}
    assert view["source"] == "api"


@pytest.mark.parametrize(
    ("headers", "body", "status", "error"),
    [
        ({}, {"type": "x"}, 401, "missing_credentials"),
        ({"authorization": "Bearer wrong"}, {"type": "x"}, 401, "invalid_api_key"),
        ({"authorization": "Basic abc"}, {"type": "x"}, 401, "invalid_credentials"),
        (ADMIN, {"type": "x"}, 403, "tenant_key_required"),
        ({"authorization": f"Bearer {SOL_KEY}"}, {"data": {}}, 400, "invalid_request"),
        (
            {"authorization": f"Bearer {SOL_KEY}"},
            {"type": "x", "priority": 9},
            400,
            "invalid_request",
        ),
        (
            {"authorization": f"Bearer {SOL_KEY}"},
            {"type": "x", "surprise": 1},
            400,
            "invalid_request",
        ),
    ],
    ids=[
        "no-key",
        "wrong-key",
        "wrong-scheme",
        "admin-cannot-publish",
        "no-type",
        "bad-priority",
        "unknown-field",
    ],
)
async def test_bad_publishing_is_refused_and_stores_nothing(
    client: Client, headers: dict[str, str], body: dict[str, object], status: int, error: str
) -> None:
    r = await client.http.post("/api/v1/events", json=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (status, error), r.text
    assert await client.stored() == 0


async def test_publishing_needs_json(client: Client) -> None:
    r = await client.http.post(
        "/api/v1/events",
        content=b"type=x",
        headers={"authorization": f"Bearer {SOL_KEY}", "content-type": "text/plain"},
    )
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")


@pytest.mark.parametrize("coding", ["gzip", "utf-8"])
async def test_a_content_encoding_over_a_body_as_it_came_changes_nothing(
    client: Client, coding: str
) -> None:
    """Only a body refused as unreadable is answered for its Content-Encoding: a sender
    whose header is wrong (its body is not compressed, or it names a charset) is read as it
    always was."""
    headers = {**_keyed(), "content-encoding": coding}
    r = await client.http.post("/in/keyed", content=MESSAGE, headers=headers)
    assert r.status_code == 202, r.text
    auth = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    r = await client.http.post(
        "/api/v1/events", content=MESSAGE, headers={**auth, "content-encoding": coding}
    )
    assert r.status_code == 202, r.text
    assert await client.stored() == 2


async def test_a_content_encoding_naming_no_compression_leaves_a_bad_bodys_refusal_as_it_was(
    client: Client,
) -> None:
    # Only a compression explains a body that cannot be read: `Content-Encoding: utf-8`
    # over a body that is no JSON is the sender's bad JSON, not a 415.
    body = b"{not json"
    headers = {**signed(body), "content-encoding": "utf-8"}
    r = await client.http.post("/in/crm-events", content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_json"), r.text
    assert "accept-encoding" not in r.headers
    assert await client.stored() == 0


async def test_a_chunked_body_over_the_limit_is_refused_without_a_content_length(
    client: Client,
) -> None:
    # With no Content-Length to refuse at once, the limit is counted as the body arrives.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 65_536  # 20 x 64 KiB: past the 1 MiB limit at the 17th

    headers = signed(MESSAGE)
    r = await client.http.post("/in/crm-events", content=chunks(), headers=headers)
    assert "content-length" not in r.request.headers
    assert (r.status_code, r.json()["error"]) == (413, "body_too_large"), r.text
    assert await client.stored() == 0


async def test_a_content_length_that_is_no_number_is_a_400_under_any_asgi_server(
    client: Client,
) -> None:
    # estafeta's own server refuses it as HTTP that is not valid; under another ASGI server
    # it reaches the application, which must not read it as "no body".
    r = await client.http.post(
        "/in/crm-events", content=MESSAGE, headers={**signed(MESSAGE), "content-length": "x1"}
    )
    assert (r.status_code, r.json()) == (
        400,
        {"error": "invalid_request", "detail": "Content-Length is not a number"},
    )
    assert await client.stored() == 0


async def test_publishing_a_compressed_body_is_refused_saying_so(client: Client) -> None:
    body = gzip.compress(orjson.dumps({"type": "message.received", "data": {}}))
    compressed = {"content-type": "application/json", "content-encoding": "gzip"}
    r = await client.http.post("/api/v1/events", content=body, headers=compressed)
    assert (r.status_code, r.json()["error"]) == (401, "missing_credentials")  # the key first
    auth = {"authorization": f"Bearer {SOL_KEY}", **compressed}
    r = await client.http.post("/api/v1/events", content=body, headers=auth)
    # Read as it came, it was refused as "the request's body is not UTF-8 JSON".
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")
    assert r.json()["detail"] == (
        "Content-Encoding 'gzip' is not accepted: send the body uncompressed"
    )
    assert r.headers["accept-encoding"] == "identity"
    assert await client.stored() == 0


async def test_a_tenant_cannot_see_or_replay_another_tenants_events(client: Client) -> None:
    mine = await client.http.post(
        "/api/v1/events",
        json={"type": "message.received", "data": {}},
        headers={"authorization": f"Bearer {SOL_KEY}"},
    )
    outra = {"authorization": f"Bearer {OUTRA_KEY}"}
    r = await client.http.get(f"/api/v1/events/{mine.json()['id']}", headers=outra)
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    r = await client.http.get("/api/v1/dlq", params={"tenant": "clinica-sol"}, headers=outra)
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    r = await client.http.post(
        "/api/v1/dlq/replay", json={"tenant": "clinica-sol", "all": True}, headers=outra
    )
    assert r.status_code == 403
    ok = await client.http.get(f"/api/v1/events/{mine.json()['id']}", headers=ADMIN)
    assert ok.status_code == 200


async def test_replay_needs_a_selection(client: Client) -> None:
    r = await client.http.post("/api/v1/dlq/replay", json={}, headers=ADMIN)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    r = await client.http.post("/api/v1/dlq/replay", json={"since": "yesterday"}, headers=ADMIN)
    assert (r.status_code, r.json()["detail"]) == (400, "since: not an ISO 8601 time")


async def _dead_of_each_tenant(store: SqlStore) -> None:
    """One dead delivery for each tenant: clinica-sol's to crm, outra's to outra-sink."""
    await store.insert_events(
        [
            new_event(
                "evt_sol",
                NewDelivery(id="dlv_sol", destination_id="crm", priority=1, max_attempts=3),
            ),
            msgspec.structs.replace(
                new_event(
                    "evt_outra",
                    NewDelivery(
                        id="dlv_outra", destination_id="outra-sink", priority=1, max_attempts=3
                    ),
                ),
                tenant_id="outra",
                source_id="outra-in",
            ),
        ]
    )
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE deliveries SET state = 'dead'"))


async def _dead_to_crm(store: SqlStore, count: int) -> list[str]:
    """`count` events of clinica-sol, each with a dead delivery to crm; their ids."""
    ids = [f"dlv_{n:026d}" for n in range(count)]
    await store.insert_events(
        [
            new_event(
                f"evt_{n:026d}", NewDelivery(id=i, destination_id="crm", priority=1, max_attempts=3)
            )
            for n, i in enumerate(ids)
        ]
    )
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE deliveries SET state = 'dead'"))
    return ids


async def _states(store: SqlStore) -> dict[str, str]:
    async with store.engine.connect() as conn:
        return dict((await conn.execute(text("SELECT id, state FROM deliveries"))).all())


async def test_naming_a_tenant_selects_its_dead_deliveries(client: Client) -> None:
    # As `estafeta dlq replay --tenant` does: naming the tenant is a selection of its own.
    await _dead_of_each_tenant(client.store)
    r = await client.http.post("/api/v1/dlq/replay", json={"tenant": "outra"}, headers=ADMIN)
    assert (r.status_code, r.json()) == (
        200,
        {"replayed": ["dlv_outra"], "count": 1, "more": False},
    )
    assert await _states(client.store) == {"dlv_sol": "dead", "dlv_outra": "pending"}
    # A tenant's key naming its own tenant means all of its own, and no other's.
    sol = {"authorization": f"Bearer {SOL_KEY}"}
    r = await client.http.post("/api/v1/dlq/discard", json={"tenant": "clinica-sol"}, headers=sol)
    assert (r.status_code, r.json()) == (200, {"discarded": ["dlv_sol"], "count": 1, "more": False})
    assert await _states(client.store) == {"dlv_sol": "discarded", "dlv_outra": "pending"}


async def test_a_dlq_selection_naming_an_unknown_tenant_or_destination_is_404(
    client: Client,
) -> None:
    # A typo would otherwise answer "nothing dead" (or replay nothing) without a word.
    await _dead_of_each_tenant(client.store)
    sol = {"authorization": f"Bearer {SOL_KEY}"}
    cases = [
        (ADMIN, {"tenant": "clinica-soll"}, "no tenant 'clinica-soll'"),
        (ADMIN, {"destination": "crn"}, "no destination 'crn'"),
        (
            ADMIN,
            {"tenant": "clinica-sol", "destination": "outra-sink"},
            "no destination 'outra-sink'",
        ),
        # A tenant's key knows only its own destinations: another's is unknown to it.
        (sol, {"destination": "outra-sink"}, "no destination 'outra-sink'"),
    ]
    for headers, selection, detail in cases:
        listed = await client.http.get("/api/v1/dlq", params=selection, headers=headers)
        assert (listed.status_code, listed.json()) == (
            404,
            {"error": "not_found", "detail": detail},
        )
        for move in ("replay", "discard"):
            r = await client.http.post(f"/api/v1/dlq/{move}", json=selection, headers=headers)
            assert (r.status_code, r.json()["detail"]) == (404, detail)
    assert await _states(client.store) == {"dlv_sol": "dead", "dlv_outra": "dead"}
    # A provider source's sends are a destination too (`send:<source>`), and known.
    r = await client.http.get("/api/v1/dlq", params={"destination": "send:crm-events"}, headers=sol)
    assert (r.status_code, r.json()["count"]) == (200, 0)


async def test_a_tenant_selects_its_dead_deliveries_to_a_destination_id_now_anothers(
    client: Client,
) -> None:
    # outra's `crm` removed, clinica-sol's `crm` configured later: outra's deliveries still
    # waiting for it are dead-lettered (`no destination 'crm' is configured for tenant
    # 'outra'`). Before: its own DLQ, listed whole, showed them, but `?destination=crm` was
    # 404 "no destination 'crm'" for it, so they could be neither found nor discarded by it.
    await client.store.insert_events(
        [
            msgspec.structs.replace(
                new_event(
                    "evt_outra",
                    NewDelivery(id="dlv_outra", destination_id="crm", priority=1, max_attempts=3),
                ),
                tenant_id="outra",
                source_id="outra-in",
            )
        ]
    )
    async with client.store.engine.begin() as conn:
        await conn.execute(text("UPDATE deliveries SET state = 'dead'"))
    outra = {"authorization": f"Bearer {OUTRA_KEY}"}
    for headers, selection in [
        (outra, {"destination": "crm"}),
        (ADMIN, {"tenant": "outra", "destination": "crm"}),
    ]:
        listed = await client.http.get("/api/v1/dlq", params=selection, headers=headers)
        assert (listed.status_code, listed.json().get("count")) == (200, 1), listed.json()
    r = await client.http.post("/api/v1/dlq/discard", json={"destination": "crm"}, headers=outra)
    assert (r.status_code, r.json()) == (
        200,
        {"discarded": ["dlv_outra"], "count": 1, "more": False},
    )
    # A destination id none of the tenant's deliveries names is still unknown to it.
    r = await client.http.get("/api/v1/dlq", params={"destination": "billing"}, headers=outra)
    assert (r.status_code, r.json()["detail"]) == (404, "no destination 'billing'")


async def test_the_dead_letter_queue_is_listed_page_by_page(client: Client) -> None:
    # Beyond the largest `limit` a DLQ could not be read whole; `next` pages through it in
    # the order of death, ties included, each dead delivery exactly once.
    def dead(n: int) -> NewEvent:
        delivery = NewDelivery(id=f"dlv_{n:026d}", destination_id="crm", priority=1, max_attempts=3)
        return new_event(f"evt_{n:026d}", delivery)

    await client.store.insert_events([dead(n) for n in range(7)])
    # Three died in the same millisecond (and two in another): the id breaks the tie.
    died_at = {0: 1000, 1: 1000, 2: 1000, 3: 1001, 4: 1002, 5: 999, 6: 999}
    async with client.store.engine.begin() as conn:
        for n, at in died_at.items():
            await conn.execute(
                text("UPDATE deliveries SET state = 'dead', updated_at = :at WHERE id = :id"),
                {"at": at, "id": f"dlv_{n:026d}"},
            )
    expected = [f"dlv_{n:026d}" for n in (5, 6, 0, 1, 2, 3, 4)]
    sol = {"authorization": f"Bearer {SOL_KEY}"}
    for headers in (ADMIN, sol):
        seen: list[str] = []
        params: dict[str, str | int] = {"limit": 3}
        while True:
            r = await client.http.get("/api/v1/dlq", params=params, headers=headers)
            assert r.status_code == 200, r.text
            body = r.json()
            seen += [d["id"] for d in body["deliveries"]]
            assert body["count"] == len(body["deliveries"]) <= 3
            if body["next"] is None:
                break
            params = {"limit": 3, "cursor": body["next"]}
        assert seen == expected
    outra = {"authorization": f"Bearer {OUTRA_KEY}"}
    r = await client.http.get("/api/v1/dlq", headers=outra)
    assert r.json() == {"deliveries": [], "count": 0, "next": None}
    # Another kind of page's `next` is not a position in this one.
    for cursor in ("nonsense", encode_cursor("conversations", 999, "clinica-sol", "5511")):
        r = await client.http.get("/api/v1/dlq", params={"cursor": cursor}, headers=ADMIN)
        assert (r.status_code, r.json()["detail"]) == (
            400,
            "query.cursor: not a `next` this API gave",
        )


async def test_the_fields_route_paths_may_start_with_are_the_events_own(client: Client) -> None:
    # The configuration refuses filter and ordering-key paths outside EVENT_FIELDS.
    r = await client.http.post("/in/crm-events", content=MESSAGE, headers=signed(MESSAGE))
    event = (await client.http.get(f"/api/v1/events/{r.json()['id']}", headers=ADMIN)).json()
    assert set(event["event"]) == set(EVENT_FIELDS)


async def test_a_replay_by_ids_takes_every_id_it_names(client: Client) -> None:
    # `limit`'s default (1000) cut a replay of 1,200 named ids to 1,000 without a word.
    ids = await _dead_to_crm(client.store, 1200)
    r = await client.http.post("/api/v1/dlq/replay", json={"ids": ids}, headers=ADMIN)
    assert (r.status_code, r.json()["count"]) == (200, 1200)
    assert (await client.store.queue_stats(history=True)).by_state == {"pending": 1200}


async def test_a_move_its_limit_cut_short_says_that_more_are_dead(client: Client) -> None:
    # `all: true` (1,000 by default) answered `count` 1000 alike when it had replayed every
    # dead delivery and when more were left dead: nothing told a caller to call again.
    await _dead_to_crm(client.store, 3)
    r = await client.http.post("/api/v1/dlq/replay", json={"all": True, "limit": 1}, headers=ADMIN)
    assert (r.status_code, r.json()["count"], r.json()["more"]) == (200, 1, True)
    r = await client.http.post("/api/v1/dlq/discard", json={"all": True, "limit": 1}, headers=ADMIN)
    assert (r.status_code, r.json()["count"], r.json()["more"]) == (200, 1, True)
    # A limit that takes exactly what is left leaves nothing more.
    r = await client.http.post("/api/v1/dlq/replay", json={"all": True, "limit": 1}, headers=ADMIN)
    assert (r.status_code, r.json()["count"], r.json()["more"]) == (200, 1, False)
    assert sorted((await _states(client.store)).values()) == ["discarded", "pending", "pending"]


async def test_health_and_detailed_health(client: Client) -> None:
    assert (await client.http.get("/health")).json()["status"] == "ok"
    assert (await client.http.get("/health/detailed")).status_code == 401
    detailed = (await client.http.get("/health/detailed", headers=ADMIN)).json()
    assert detailed["status"] == "ok" and detailed["checks"]["store"]["status"] == "ok"


async def test_openapi_documents_the_api(client: Client) -> None:
    paths = (await client.http.get("/openapi.json")).json()["paths"]
    assert {
        "/api/v1/events",
        "/api/v1/events/{event_id}",
        "/api/v1/dlq",
        "/api/v1/dlq/replay",
    } <= set(paths)


async def test_openapi_says_which_operations_take_a_bearer_key(client: Client) -> None:
    """Without a security scheme in the document, the /docs page has no "Authorize" and no
    field for the key: every operation tried there was a 401."""
    document = (await client.http.get("/openapi.json")).json()
    schemes = document["components"]["securitySchemes"]
    [(name, scheme)] = schemes.items()
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    keyed = {
        (method, path): operation.get("security")
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if path.startswith("/api/v1/") or path == "/health/detailed"
    }
    assert len(keyed) >= 12
    assert all(security == [{name: []}] for security in keyed.values()), keyed
    assert "security" not in document["paths"]["/health"]["get"]


async def test_unknown_paths_and_methods_answer_in_the_error_format(client: Client) -> None:
    r = await client.http.get("/api/v1/nothing-here", headers=ADMIN)
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    r = await client.http.delete("/api/v1/events", headers=ADMIN)
    assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")
    # A trailing slash, or an id that is a slash, is no path of the API either: it was a 307
    # with no body to the path without it (a conversation "/" answered by the list, a POST
    # sent again by a client that follows redirects).
    for method, path in [
        ("GET", "/api/v1/dlq/"),
        ("GET", "/api/v1/conversations/"),
        ("GET", "/api/v1/conversations/%2F"),
        ("POST", "/api/v1/dlq/replay/"),
    ]:
        r = await client.http.request(method, path, headers=ADMIN)
        assert (r.status_code, r.json()) == (
            404,
            {"error": "not_found", "detail": "no such path"},
        ), path


async def test_every_path_that_takes_get_answers_head_with_the_same_head(client: Client) -> None:
    # RFC 9110 §9.1: a server supports HEAD wherever it supports GET. Only /health and
    # /openapi.json did; HEAD of every other read (an API path, /docs, /metrics) was a 405.
    published = await client.http.post(
        "/api/v1/events", json={"type": "lead.new"}, headers={"authorization": f"Bearer {SOL_KEY}"}
    )
    for path, headers in [
        ("/health", {}),
        ("/health/detailed", ADMIN),
        ("/metrics", {}),
        ("/docs", {}),
        ("/openapi.json", {}),
        (f"/api/v1/events/{published.json()['id']}", ADMIN),
        ("/api/v1/events/evt_none", ADMIN),  # a 404 too: the GET's status, no body
        ("/api/v1/events/evt_none", {}),  # and a 401 with its challenge
        ("/api/v1/dlq?limit=5", ADMIN),
        ("/api/v1/dlq?limit=0", ADMIN),
        ("/api/v1/conversations", ADMIN),
        ("/api/v1/messages/msg_none", ADMIN),
    ]:
        got = await client.http.get(path, headers=headers)
        head = await client.http.head(path, headers=headers)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert head.headers.get("www-authenticate") == got.headers.get("www-authenticate")
        if path != "/metrics":  # its counters move between the two
            assert head.headers["content-length"] == str(len(got.content)), path
    # A path that does not take GET does not take HEAD either.
    r = await client.http.head("/api/v1/events", headers=ADMIN)
    assert (r.status_code, r.headers["allow"], r.content) == (405, "POST", b"")


async def test_a_wrong_method_is_answered_with_every_method_the_path_takes(client: Client) -> None:
    # `DELETE /health` answered `Allow: HEAD`, as if GET were not taken there.
    for path in ("/health", "/api/v1/dlq", "/api/v1/events/evt_x", "/metrics", "/docs"):
        r = await client.http.delete(path, headers=ADMIN)
        assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD"), path
    r = await client.http.get("/api/v1/dlq/replay", headers=ADMIN)
    assert (r.status_code, r.headers["allow"]) == (405, "POST")


async def test_a_request_without_a_usable_key_is_a_401_whatever_else_it_holds(
    client: Client,
) -> None:
    # A client without a usable key learnt about its body, content type or query first
    # (400, 415): only once they were put right did it hear that its key was the problem.
    json = {"content-type": "application/json"}
    requests: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        ("POST", "/api/v1/events", b'{"type": "lead', json),  # no JSON
        ("POST", "/api/v1/events", b'{"type": "lead.new"}', {"content-type": "text/plain"}),
        ("POST", "/api/v1/events", b'{"type": "lead\\u0000"}', json),  # a NUL
        ("POST", "/api/v1/events", b'{"type": "lead\xff"}', json),  # not UTF-8
        ("POST", "/api/v1/events", b'{"type": "lead", "data": ' + b"[" * 5000, json),
        ("POST", "/api/v1/dlq/replay", b"{", json),
        ("POST", "/api/v1/conversations/5511/escalate", b"reason", {}),
        ("GET", "/api/v1/dlq?event_type=lead%00", None, {}),
        ("GET", "/api/v1/dlq?limit=0", None, {}),
    ]
    for credentials, error in [
        ({}, "missing_credentials"),
        ({"authorization": "Basic c29sOnNvbA=="}, "invalid_credentials"),
        ({"authorization": "Bearer est_unknown_key_0000000000000000000"}, "invalid_api_key"),
    ]:
        for method, url, body, headers in requests:
            sent = {**headers, **credentials}
            r = await client.http.request(method, url, content=body, headers=sent)
            assert (r.status_code, r.json()["error"]) == (401, error), (url, body, r.text)
            assert r.headers["www-authenticate"].startswith('Bearer realm="estafeta"')
    # With a key, each is refused for what it is, as before.
    for method, url, body, headers in requests:
        sent = {**headers, "authorization": f"Bearer {SOL_KEY}"}
        r = await client.http.request(method, url, content=body, headers=sent)
        assert r.status_code in (400, 415), (url, r.text)
    assert await client.stored() == 0


def api_errors() -> dict[tuple[str, str], float]:
    """`estafeta_api_errors_total` as it stands, by (status, error)."""
    return {
        (sample.labels["status"], sample.labels["error"]): sample.value
        for metric in REGISTRY.collect()
        if metric.name == "estafeta_api_errors"
        for sample in metric.samples
        if sample.name == "estafeta_api_errors_total"
    }


async def test_every_error_the_api_answers_is_counted_by_status_and_code(client: Client) -> None:
    """An operator sees a revoked key still in use, or a client sending what the API refuses,
    in `/metrics`: each error answered once, whichever layer refused it, and nothing else."""
    sol = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    before = api_errors()
    requests: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        ("GET", "/api/v1/events/evt_x", None, {}),  # refused by the key check
        ("GET", "/api/v1/events/evt_x", None, {"authorization": "Bearer est_revoked"}),
        ("GET", "/api/v1/events/evt_x", None, {"authorization": "Bearer est_revoked"}),
        ("POST", "/api/v1/events", b'{"data": {}}', sol),  # by validation
        ("GET", "/api/v1/nothing-here", None, ADMIN),  # by routing
        ("DELETE", "/api/v1/events", None, ADMIN),
        ("POST", "/api/v1/events", b"x" * 1_100_000, sol),  # before the API reads it
        ("GET", "/api/v1/dlq?event_type=lead%00", None, sol),
        ("POST", "/api/v1/events", b'{"type": "lead.new"}', sol),  # accepted: not counted
        ("GET", "/api/v1/dlq", None, sol),
    ]
    for method, url, body, headers in requests:
        await client.http.request(method, url, content=body, headers=headers)
    after = api_errors()
    counted = {key: after[key] - before.get(key, 0) for key in after}
    assert {key: n for key, n in counted.items() if n} == {
        ("401", "missing_credentials"): 1,
        ("401", "invalid_api_key"): 2,
        ("400", "invalid_request"): 1,
        ("404", "not_found"): 1,
        ("405", "method_not_allowed"): 1,
        ("413", "body_too_large"): 1,
        ("400", "invalid_text"): 1,
    }


async def test_the_api_has_the_same_body_limit_as_ingest(client: Client) -> None:
    big = {"type": "x", "data": {"blob": "x" * 1_100_000}}
    r = await client.http.post(
        "/api/v1/events", json=big, headers={"authorization": f"Bearer {SOL_KEY}"}
    )
    assert (r.status_code, r.json()["error"]) == (413, "body_too_large")
    assert await client.stored() == 0


@pytest.mark.parametrize(
    ("method", "url", "body", "where"),
    [
        ("POST", "/api/v1/events", b'{"type": "lead.new\\u0000", "data": {}}', "body"),
        ("POST", "/api/v1/events", b'{"type": "lead.new", "data": {"n": "\\\\\\u0000"}}', "body"),
        ("GET", "/api/v1/conversations/5511%00", None, "path"),
        ("GET", "/api/v1/dlq?event_type=lead%00", None, "query"),
    ],
)
async def test_the_api_refuses_nul_characters_the_same_on_both_engines(
    client: Client, method: str, url: str, body: bytes | None, where: str
) -> None:
    """PostgreSQL cannot store U+0000 and no API field needs it: refused with 400 wherever it
    is, instead of a 500 on one engine and a stored value on the other."""
    headers = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    r = await client.http.request(method, url, content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_text")
    assert where in r.json()["detail"]
    assert await client.stored() == 0


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/api/v1/events", b'{"type": "lead.new", "data": {"note": "\\ud800"}}'),
        ("/api/v1/events", b'{"type": "lead.new", "data": {"\\udc00": 1}}'),
        ("/api/v1/dlq/replay", b'{"destination": "\\ud800"}'),
        ("/api/v1/dlq/discard", b'{"ids": ["\\ud800"]}'),
    ],
)
async def test_the_api_refuses_a_lone_surrogate_escape_as_it_refuses_nul(
    client: Client, url: str, body: bytes
) -> None:
    """JSON allows `\\ud800` alone; read into a str that is no UTF-8, neither orjson nor
    PostgreSQL could write it: a 500 on both engines."""
    headers = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    r = await client.http.post(url, content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_text"), r.text
    assert "surrogate" in r.json()["detail"]
    assert await client.stored() == 0
    pair = b'{"type": "lead.new", "data": {"note": "\\ud83d\\ude00"}}'  # an emoji, escaped
    r = await client.http.post("/api/v1/events", content=pair, headers=headers)
    assert r.status_code == 202, r.text


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        # UTF-16 and UTF-32 (with a byte order mark, or without, whose ASCII has NUL bytes):
        # the parser reads them, but the NUL and surrogate checks look for UTF-8 escapes.
        ('{"type": "lead\\u0000new"}'.encode("utf-16"), "not UTF-8 at byte 0"),
        ('{"type": "lead\\u0000new"}'.encode("utf-32"), "not UTF-8 at byte 0"),
        ('{"type": "a", "data": {"n": "\\ud800"}}'.encode("utf-16-le"), "a NUL byte at byte 1"),
        # Latin-1: was `http_400`, "There was an error parsing the body", naming nothing.
        (
            '{"type": "lead.new", "data": {"city": "Paraná"}}'.encode("latin-1"),
            "not UTF-8 at byte 44",
        ),
        # Raw NUL, in a body that is otherwise UTF-8.
        (b'{"type": "lead.new", "data": {"n": "a\x00"}}', "a NUL byte at byte 37"),
    ],
)
async def test_a_body_that_is_not_utf8_is_refused_naming_the_byte(
    client: Client, body: bytes, detail: str
) -> None:
    """JSON travels as UTF-8 (RFC 8259): any other encoding is refused with where it stops
    being UTF-8, not read past the NUL and surrogate checks (a NUL stored on SQLite, U+FFFD
    on PostgreSQL, a lone surrogate a 500) nor answered in a format of the parser's own."""
    headers = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    r = await client.http.post("/api/v1/events", content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_text"), r.text
    assert detail in r.json()["detail"]
    assert await client.stored() == 0


async def test_a_byte_order_mark_hides_no_lone_surrogate(client: Client) -> None:
    """A UTF-8 body may start with a byte order mark (RFC 8259 lets a parser ignore it, and
    the API's does); the surrogate check did not, and the event was a 500."""
    headers = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    bom = b"\xef\xbb\xbf"
    body = bom + b'{"type": "lead.new", "data": {"note": "\\ud800"}}'
    r = await client.http.post("/api/v1/events", content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_text"), r.text
    assert "surrogate" in r.json()["detail"]
    assert await client.stored() == 0
    r = await client.http.post("/api/v1/events", content=bom + MESSAGE, headers=headers)
    assert r.status_code == 202, r.text


async def test_a_webhook_after_a_byte_order_mark_is_taken_as_the_api_takes_it(
    client: Client,
) -> None:
    """A UTF-8 byte order mark before a webhook's JSON (as .NET and PowerShell clients may
    write) was `400 invalid_json`, "BOM is not supported", where the API skips it: the
    webhook is taken, verified over the bytes as sent, and its data delivered unchanged."""
    body = b"\xef\xbb\xbf" + b'{"type": "appointment.booked", "data": {"status": "ok"}}'
    r = await client.http.post("/in/crm-events", content=body, headers=signed(body, "m-bom"))
    assert r.status_code == 202, r.text
    keyed = {"authorization": "Bearer source-key-1", "content-type": "application/json"}
    r2 = await client.http.post("/in/keyed", content=body, headers=keyed)
    assert r2.status_code == 202, r2.text
    for accepted in (r, r2):
        event_id = accepted.json()["id"]
        event = (await client.http.get(f"/api/v1/events/{event_id}", headers=ADMIN)).json()
        assert event["type"] == "appointment.booked"
        assert event["event"]["data"] == {"status": "ok"}
    leased = await lease_any(client.store, now_ms=int(time.time() * 1000) + 60_000)
    assert len(leased) == 4  # crm and billing, for each
    for delivery in leased:
        assert not delivery.payload.startswith(b"\xef\xbb\xbf")
        assert orjson.loads(delivery.payload)["data"] == {"status": "ok"}


async def test_a_byte_that_is_not_utf8_after_a_byte_order_mark_is_counted_from_the_first_sent(
    client: Client,
) -> None:
    """Signed or sent with the source's key, a webhook's byte that is not UTF-8 is named
    by its offset in the body as sent, the byte order mark counted, as the providers' are."""
    body = b"\xef\xbb\xbf" + '{"type": "lead.new", "data": {"city": "Paraná"}}'.encode("latin-1")
    for url, headers in (("/in/crm-events", signed(body, "m-bom-latin1")), ("/in/keyed", _keyed())):
        r = await client.http.post(url, content=body, headers=headers)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_body"), r.text
        assert r.json()["detail"] == "the body is not UTF-8 at byte 47", url


async def test_an_event_whose_route_key_is_longer_than_an_index_row_is_accepted(
    store: SqlStore, database_url: str
) -> None:
    """A route's ordering key takes the event's value whole: over ~2.7 KB PostgreSQL's
    index refused the delivery, and every such event (and each retry) was a 500."""
    data = base_config(database_url)
    data["routes"][0]["ordering_key"] = "data.conversation_id"
    async for client in make_client(store, load_config_dict(data)):
        value = "".join(f"{n:x}" for n in range(2_000))  # ~6 KB, not compressible to a row
        body = {"type": "message.received", "data": {"conversation_id": value}}
        headers = {"authorization": f"Bearer {SOL_KEY}"}
        r = await client.http.post("/api/v1/events", json=body, headers=headers)
        assert r.status_code == 202, r.text
        assert await client.stored() == 1


async def test_text_that_only_looks_like_a_nul_escape_is_accepted(client: Client) -> None:
    body = b'{"type": "lead.new", "data": {"note": "type \\\\u0000 to escape"}}'
    headers = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    r = await client.http.post("/api/v1/events", content=body, headers=headers)
    assert r.status_code == 202, r.text
    event = (await client.http.get(f"/api/v1/events/{r.json()['id']}", headers=ADMIN)).json()
    assert event["event"]["data"]["note"] == "type \\u0000 to escape"


@pytest.mark.parametrize(
    ("url", "body", "where"),
    [
        ("/api/v1/events", {"type": "lead.new", "priority": True}, "priority"),
        ("/api/v1/events", {"type": "lead.new", "priority": "1"}, "priority"),
        ("/api/v1/events", {"type": "lead.new", "priority": 1.0}, "priority"),
        ("/api/v1/dlq/discard", {"all": "yes"}, "all"),
        ("/api/v1/dlq/replay", {"all": 1}, "all"),
    ],
)
async def test_a_value_of_another_json_type_is_refused_not_converted(
    client: Client, url: str, body: dict[str, object], where: str
) -> None:
    """`true` is no priority and `"yes"` no `all: true`, as in the configuration: they were
    read as 1 and True, and a typo in a client meant every dead delivery replayed."""
    headers = {"authorization": f"Bearer {SOL_KEY}"}
    r = await client.http.post(url, json=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
    assert where in r.json()["detail"]
    assert await client.stored() == 0


async def test_an_empty_idempotency_key_header_is_refused(client: Client) -> None:
    headers = {"authorization": f"Bearer {SOL_KEY}", "idempotency-key": ""}
    r = await client.http.post("/api/v1/events", json={"type": "lead.new"}, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    assert "idempotency-key" in r.json()["detail"]
    assert await client.stored() == 0


async def test_an_idempotency_keys_limit_is_counted_in_the_headers_bytes(client: Client) -> None:
    # A header is bytes (read as latin-1, one character per byte, and stored so): 200
    # characters of UTF-8 are 400 bytes, refused as "over 255 characters" it did not have.
    headers = {k.encode(): v.encode() for k, v in _keyed().items()}
    headers[b"idempotency-key"] = ("é" * 200).encode()
    r = await client.http.post("/in/keyed", content=MESSAGE, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_idempotency_key"), r.text
    assert r.json()["detail"] == "the idempotency key is over 255 bytes"
    headers[b"idempotency-key"] = ("é" * 127 + "e").encode()  # 255 bytes: the most it takes
    first = await client.http.post("/in/keyed", content=MESSAGE, headers=headers)
    again = await client.http.post("/in/keyed", content=MESSAGE, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200), first.text
    assert await client.stored() == 1


async def test_an_empty_ordering_key_is_refused(client: Client) -> None:
    # "" was one real key shared by every such event: all of them sent one at a time to each
    # destination, overriding the routes' keys, where an empty idempotency key is refused.
    headers = {"authorization": f"Bearer {SOL_KEY}"}
    body = {"type": "lead.new", "ordering_key": ""}
    r = await client.http.post("/api/v1/events", json=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
    assert "ordering_key" in r.json()["detail"]
    assert await client.stored() == 0


async def test_data_that_cannot_be_stored_as_json_is_refused_with_the_reason(
    client: Client,
) -> None:
    body = b'{"type": "lead.new", "data": {"n": 123456789012345678901234567890}}'
    headers = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    r = await client.http.post("/api/v1/events", content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    assert r.json()["detail"] == (
        "body.data: cannot be stored as JSON: at n, an integer beyond 64 bits would reach"
        " destinations rounded; send it as a string"
    )
    assert await client.stored() == 0


async def test_data_nested_deeper_than_it_can_be_stored_is_refused(client: Client) -> None:
    # Nested 254 deep, orjson writes `data` alone but not the event around it: validated
    # alone, it passed and the request failed with a 500; at 253 the event was stored, and
    # reading it (GET /api/v1/events/{id}, two levels more) failed with a 500.
    headers = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    for depth in (254, 253):
        body = b'{"type": "lead.new", "data": %s}' % nested_text(depth)
        r = await client.http.post("/api/v1/events", content=body, headers=headers)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
        assert r.json()["detail"] == (
            "body.data: cannot be stored as JSON: arrays and objects nested more than 252 deep"
        )
    assert await client.stored() == 0
    body = b'{"type": "lead.new", "data": %s}' % nested_text(252)
    r = await client.http.post("/api/v1/events", content=body, headers=headers)
    assert r.status_code == 202, r.text
    event = await client.http.get(f"/api/v1/events/{r.json()['id']}", headers=ADMIN)
    assert event.status_code == 200, event.text


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        # Deeper than Python's parser reads (its recursion limit) and an integer of more
        # digits than it converts (4300): both were `http_400`, "There was an error parsing
        # the body", a code the API does not document, naming nothing.
        (b"[" * 5000 + b"]" * 5000, "body: arrays and objects nested more than 252 deep"),
        (b"9" * 5000, "body: an integer beyond 64 bits"),
        (b"-" + b"9" * 5000, "body: an integer beyond 64 bits"),
    ],
)
async def test_data_past_what_the_api_can_parse_is_refused_as_invalid_request(
    client: Client, value: bytes, detail: str
) -> None:
    headers = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    body = b'{"type": "lead.new", "data": {"n": %s}}' % value
    r = await client.http.post("/api/v1/events", content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
    assert r.json()["detail"].startswith(detail), r.text
    assert await client.stored() == 0


@pytest.mark.parametrize("number", ["1e400", "-1e400", "[2e308]", "NaN", "-Infinity"])
async def test_a_number_beyond_a_double_is_refused_not_delivered_as_null(
    client: Client, number: str
) -> None:
    # Before: parsed as infinity (or NaN, which Python's parser also takes, as Infinity),
    # then written by orjson as `null`: accepted, and the destinations received `"n": null`
    # for what the sender wrote.
    body = b'{"type": "lead.new", "data": {"n": %s}}' % number.encode()
    headers = {"authorization": f"Bearer {SOL_KEY}", "content-type": "application/json"}
    r = await client.http.post("/api/v1/events", content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
    assert "body.data" in r.json()["detail"] and "no JSON form" in r.json()["detail"]
    assert await client.stored() == 0


async def test_dlq_times_honour_their_offsets(client: Client) -> None:
    # A `since`/`until` in another zone selects what its UTC equivalent selects.
    def dead(n: int) -> NewEvent:
        delivery = NewDelivery(id=f"dlv_{n}", destination_id="crm", priority=1, max_attempts=3)
        return new_event(f"evt_{n}", delivery)

    await client.store.insert_events([dead(n) for n in range(3)])
    # 2026-11-22T02:59:59.999Z, 03:00:00.000Z and 04:00:00.000Z
    died_at = {0: 1_795_316_399_999, 1: 1_795_316_400_000, 2: 1_795_320_000_000}
    async with client.store.engine.begin() as conn:
        for n, at in died_at.items():
            await conn.execute(
                text("UPDATE deliveries SET state = 'dead', updated_at = :at WHERE id = :id"),
                {"at": at, "id": f"dlv_{n}"},
            )
    for since, until in [
        ("2026-11-22T03:00:00Z", "2026-11-22T04:00:00Z"),
        ("2026-11-22T00:00:00-03:00", "2026-11-22T01:00:00.000-03:00"),
        ("2026-11-22T05:30:00+02:30", "2026-11-22T04:00:00.000000+00:00"),
        ("2026-11-22T03:00:00", "2026-11-22T04:00"),  # no offset: UTC, as documented
    ]:
        r = await client.http.get(
            "/api/v1/dlq", params={"since": since, "until": until}, headers=ADMIN
        )
        assert [d["id"] for d in r.json()["deliveries"]] == ["dlv_1"], (since, until)


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "",
        "0000-01-01T00:00:00Z",
        "10000-01-01T00:00:00Z",
        "2026-11-22T00:00:00+24:00",
        "2026-13-01T00:00:00Z",
        "2026-11-22T23:59:60Z",
        "２０２６-11-22T00:00:00Z",
        "2026-11-22T00:00:00ZZ",
        "2026-11-22T00:00:00 03:00",  # a `+` the query string turned into a space
    ],
)
async def test_a_dlq_time_that_is_no_time_is_a_400_naming_it(client: Client, value: str) -> None:
    # Out-of-range fields, a leap second, non-ASCII digits: each a 400, never a 500.
    for name in ("since", "until"):
        r = await client.http.get("/api/v1/dlq", params={name: value}, headers=ADMIN)
        assert (r.status_code, r.json()["detail"]) == (400, f"{name}: not an ISO 8601 time")
        if value:
            r = await client.http.post("/api/v1/dlq/replay", json={name: value}, headers=ADMIN)
            assert (r.status_code, r.json()["detail"]) == (400, f"{name}: not an ISO 8601 time")


async def test_a_dlq_window_that_ends_before_it_begins_is_a_400(client: Client) -> None:
    # Most likely the two swapped: an answer of nothing would read as an empty queue (the
    # CLI refuses the same window as a usage error).
    window = {"since": "2026-11-22T04:00:00Z", "until": "2026-11-22T03:00:00Z"}
    expected = (400, "until: 2026-11-22T03:00:00Z is not after since 2026-11-22T04:00:00Z")
    for same in (window, {**window, "until": window["since"]}):
        r = await client.http.get("/api/v1/dlq", params=same, headers=ADMIN)
        assert (r.status_code, r.json()["detail"])[0] == 400, same
        for action in ("replay", "discard"):
            r = await client.http.post(f"/api/v1/dlq/{action}", json=same, headers=ADMIN)
            assert r.status_code == 400, (action, same)
    r = await client.http.get("/api/v1/dlq", params=window, headers=ADMIN)
    assert (r.status_code, r.json()["detail"]) == expected


async def test_a_dlq_time_that_is_not_utf8_is_a_400_naming_it(client: Client) -> None:
    for name in ("since", "until"):
        r = await client.http.get(f"/api/v1/dlq?{name}=%ff%fe", headers=ADMIN)
        assert (r.status_code, r.json()["detail"]) == (400, f"{name}: not an ISO 8601 time")


def _publish_edge(**change: object) -> dict[str, object]:
    """A valid publish with `change` applied (`...` takes the field out)."""
    body: dict[str, object] = {
        "type": "appointment.booked",
        "data": {"status": "confirmed"},
        **change,
    }
    return {k: v for k, v in body.items() if v is not ...}


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (_publish_edge(type=...), 400, "body.type: Field required"),
        (_publish_edge(type=None), 400, "body.type: "),
        (_publish_edge(type=1), 400, "body.type: "),
        (_publish_edge(type=""), 400, "body.type: "),
        (_publish_edge(type="a"), 202, None),
        (_publish_edge(type="appointment." + "a" * 188), 202, None),  # 200
        (_publish_edge(type="appointment." + "a" * 189), 400, "body.type: "),  # 201
        (_publish_edge(data=...), 202, None),  # `{}`
        (_publish_edge(data=None), 400, "body.data: "),
        (_publish_edge(data=[]), 400, "body.data: "),
        (_publish_edge(idempotency_key=""), 400, "body.idempotency_key: "),
        (_publish_edge(idempotency_key="k"), 202, None),
        (_publish_edge(idempotency_key="k" * 255), 202, None),
        (_publish_edge(idempotency_key="k" * 256), 400, "body.idempotency_key: "),
        (_publish_edge(idempotency_key=7), 400, "body.idempotency_key: "),
        (_publish_edge(priority=-1), 400, "body.priority: "),
        (_publish_edge(priority=0), 202, None),
        (_publish_edge(priority=4), 202, None),
        (_publish_edge(priority=5), 400, "body.priority: "),
        (_publish_edge(priority=None), 202, None),  # the routes'
        (_publish_edge(ordering_key=""), 400, "body.ordering_key: "),
        (_publish_edge(ordering_key="o"), 202, None),
        (_publish_edge(ordering_key="o" * 255), 202, None),
        (_publish_edge(ordering_key="o" * 256), 400, "body.ordering_key: "),
        (_publish_edge(ordering_key=3), 400, "body.ordering_key: "),
        (_publish_edge(surprise=1), 400, "body.surprise: "),
    ],
)
async def test_each_field_of_a_publish_is_taken_to_its_documented_edge_and_no_further(
    client: Client, body: dict[str, object], status: int, detail: str | None
) -> None:
    """docs/http-api.md's table of `POST /api/v1/events`, each bound from both sides: a
    refusal names the field (`body.<field>: …`) and stores nothing; an event taken has the
    defaults the table gives (`data` `{}`, the routes' priority)."""
    auth = {"authorization": f"Bearer {SOL_KEY}"}
    r = await client.http.post("/api/v1/events", json=body, headers=auth)
    assert r.status_code == status, r.text
    if detail is not None:
        assert r.json()["error"] == "invalid_request"
        assert r.json()["detail"].startswith(detail), r.json()
        assert await client.stored() == 0
        return
    event = (await client.http.get(f"/api/v1/events/{r.json()['id']}", headers=auth)).json()
    assert event["event"]["data"] == body.get("data", {})
    if body["type"] == "appointment.booked" and body.get("data"):
        priorities = {d["priority"] for d in event["deliveries"]}
        assert priorities == {2 if body.get("priority") is None else body["priority"]}


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "detail"),
    [
        ("GET", "/api/v1/dlq?limit=0", None, 400, "query.limit: "),
        ("GET", "/api/v1/dlq?limit=1", None, 200, None),
        ("GET", "/api/v1/dlq?limit=10000", None, 200, None),
        ("GET", "/api/v1/dlq?limit=10001", None, 400, "query.limit: "),
        ("GET", "/api/v1/dlq?limit=ten", None, 400, "query.limit: "),
        ("GET", "/api/v1/dlq?cursor=", None, 400, "query.cursor: "),
        ("GET", "/api/v1/dlq?since=", None, 400, "since: "),
        ("GET", "/api/v1/dlq?until=2026-13-01", None, 400, "until: "),
        ("GET", "/api/v1/dlq?destination=crm&event_type=x&since=2026-11-22", None, 200, None),
        ("GET", "/api/v1/dlq?destnation=crm", None, 200, None),  # not taken: ignored
        ("POST", "/api/v1/dlq/replay", {"ids": ["dlv_x"] * 10_000}, 200, None),
        ("POST", "/api/v1/dlq/replay", {"ids": ["dlv_x"] * 10_001}, 400, "body.ids: "),
        ("POST", "/api/v1/dlq/replay", {"ids": None}, 400, "body.ids: "),
        ("POST", "/api/v1/dlq/replay", {"ids": [1]}, 400, "body.ids.0: "),
        ("POST", "/api/v1/dlq/replay", {"destination": 1}, 400, "body.destination: "),
        ("POST", "/api/v1/dlq/replay", {"all": None}, 400, "body.all: "),
        ("POST", "/api/v1/dlq/replay", {"all": False}, 400, "name ids"),
        ("POST", "/api/v1/dlq/replay", {"all": True, "limit": 0}, 400, "body.limit: "),
        ("POST", "/api/v1/dlq/replay", {"all": True, "limit": 1}, 200, None),
        ("POST", "/api/v1/dlq/discard", {"all": True, "limit": 10_000}, 200, None),
        ("POST", "/api/v1/dlq/discard", {"all": True, "limit": 10_001}, 400, "body.limit: "),
        ("POST", "/api/v1/dlq/discard", {"all": True, "limit": "5"}, 400, "body.limit: "),
        ("POST", "/api/v1/dlq/discard", {"all": True, "limit": None}, 200, None),
        ("POST", "/api/v1/dlq/discard", {"since": ""}, 400, "name ids"),
        ("POST", "/api/v1/dlq/discard", {"all": True, "since": ""}, 400, "since: "),
        ("POST", "/api/v1/dlq/discard", {"all": True, "surprise": 1}, 400, "body.surprise: "),
    ],
)
async def test_each_dlq_parameter_is_taken_to_its_documented_edge_and_no_further(
    client: Client,
    method: str,
    url: str,
    body: dict[str, object] | None,
    status: int,
    detail: str | None,
) -> None:
    """docs/http-api.md's parameters of the DLQ's list and its moves, each bound from both
    sides, with a tenant's key: a refusal is `400 invalid_request` naming the parameter, and
    moves nothing."""
    await _dead_of_each_tenant(client.store)
    before = await _states(client.store)
    auth = {"authorization": f"Bearer {SOL_KEY}"}
    r = await client.http.request(method, url, json=body, headers=auth)
    assert r.status_code == status, r.text
    if detail is not None:
        assert (r.json()["error"], r.json()["detail"][: len(detail)]) == (
            "invalid_request",
            detail,
        ), r.json()
        assert await _states(client.store) == before


async def test_the_dlqs_defaults_are_a_page_of_100_and_a_move_of_1000(client: Client) -> None:
    # docs/http-api.md: `limit` defaults to 100 for the list and, for a move that names no
    # ids, to 1000 (`more` then says that others are left).
    await _dead_to_crm(client.store, 1001)
    page = (await client.http.get("/api/v1/dlq", headers=ADMIN)).json()
    assert (page["count"], page["next"] is not None) == (100, True)
    r = await client.http.post("/api/v1/dlq/replay", json={"all": True}, headers=ADMIN)
    assert (r.status_code, r.json()["count"], r.json()["more"]) == (200, 1000, True)

"""Each provider's answers → Outcome, table-driven over the documented bodies.

Bodies are the contracts' examples (§1.6/§1.7 Cloud API, §2.4 Twilio, §3.1/§3.5 Z-API,
§9.5–§9.7 SendPulse), verbatim where the contracts quote one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from estafeta.connectors.whatsapp import cloud, sendpulse, twilio, zapi
from estafeta.connectors.whatsapp.base import Reply
from estafeta.delivery.backoff import BackoffPolicy
from estafeta.delivery.breakers import counts_against
from estafeta.delivery.decision import Transition, decide, describe_failure
from estafeta.delivery.outcome import EXCERPT_LIMIT, Outcome, OutcomeKind
from estafeta.delivery.state import DeliveryState

SUCCESS, RETRY, PERMANENT = OutcomeKind.SUCCESS, OutcomeKind.RETRYABLE, OutcomeKind.PERMANENT
WAMID = "wamid.HBgLMTY0NjcwNDM1OTUVAgARGBI1RjQyNUE3NEYxMzAzMzQ5MkEA"


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    body: Any  # a JSON document, or bytes as sent
    kind: OutcomeKind
    error_class: str | None = None
    head: str | None = None  # the excerpt's first line
    external_id: str | None = None
    external_alt_id: str | None = None  # a second id its status webhooks may name instead
    retry_after_s: float | None = None  # sent as Retry-After
    expect_retry_after: float | None = None


def reply(case: Case) -> Reply:
    body = case.body if isinstance(case.body, bytes) else orjson.dumps(case.body)
    return Reply(case.status, body, case.retry_after_s, 12.5)


def graph(code: int, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": "OAuthException", "code": code, **extra}}


CLOUD = [
    Case(
        "accepted",
        200,
        {
            "messaging_product": "whatsapp",
            "contacts": [{"input": "+16505551234", "wa_id": "16505551234"}],
            "messages": [{"id": WAMID, "message_status": "accepted"}],
        },
        SUCCESS,
        external_id=WAMID,
    ),
    # A 2xx without the WAMID is not Meta's answer (§1.6): a proxy's page, a wrong api_base.
    # Taken for a success, the message was `sent` for good, no status ever matched it.
    Case(
        "accepted without an id",
        200,
        {"messaging_product": "whatsapp"},
        RETRY,
        "whatsapp_cloud_no_message_id",
        "no_message_id 200 without messages[0].id: not the Cloud API's answer",
    ),
    Case(
        "a proxy's page on 200",
        200,
        b"<html><body>Welcome</body></html>",
        RETRY,
        "whatsapp_cloud_no_message_id",
    ),
    Case("an empty 200", 200, b"", RETRY, "whatsapp_cloud_no_message_id"),
    Case(
        "pair rate limit (§1.7 example, HTTP 400)",
        400,
        graph(
            131056,
            "(#131056) (Business Account, Consumer Account) pair rate limit hit",
            error_data={"messaging_product": "whatsapp", "details": "Message failed to send …"},
            error_subcode=2494055,
            fbtrace_id="Az8or2yhqkZfEZ-_4Qn_Bam",
        ),
        RETRY,
        "whatsapp_cloud_131056",
        "131056 (Business Account, Consumer Account) pair rate limit hit",
    ),
    Case(
        "throughput 130429 on 400",
        400,
        graph(130429, "(#130429) Rate limit hit"),
        RETRY,
        "whatsapp_cloud_130429",
        "130429 Rate limit hit",
    ),
    Case(
        "throughput 130429 on 429 with Retry-After",
        429,
        graph(130429, "(#130429) Rate limit hit"),
        RETRY,
        "whatsapp_cloud_130429",
        retry_after_s=30.0,
        expect_retry_after=30.0,
    ),
    Case("app rate limit 4 on 429", 429, graph(4, "(#4) Application request limit reached"), RETRY),
    Case("app rate limit 4 on 400", 400, graph(4, "(#4) Application request limit reached"), RETRY),
    Case("WABA rate limit 80007", 400, graph(80007, "(#80007) Rate limit issues"), RETRY),
    # Graph's rate-limit codes (graph-api/overview/rate-limiting): 17 user, 613 custom level.
    Case("user rate limit 17", 400, graph(17, "(#17) User request limit reached"), RETRY),
    Case(
        "custom rate limit 613",
        400,
        graph(613, "(#613) Calls to this api have exceeded the rate limit."),
        RETRY,
        "whatsapp_cloud_613",
        "613 Calls to this api have exceeded the rate limit.",
    ),
    Case(
        "outside the 24 h window",
        400,
        graph(131047, "(#131047) Re-engagement message"),
        PERMANENT,
        "whatsapp_cloud_131047",
        "131047 Re-engagement message",
        retry_after_s=5.0,  # a permanent failure keeps no Retry-After
    ),
    Case(
        "token expired",
        401,
        graph(190, "Error validating access token: Session has expired.", error_subcode=463),
        PERMANENT,
        "whatsapp_cloud_190",
        "190 Error validating access token: Session has expired.",
    ),
    Case(
        "template missing",
        404,
        graph(132001, "(#132001) Template name does not exist in the translation"),
        PERMANENT,
        "whatsapp_cloud_132001",
        "132001 Template name does not exist in the translation",
    ),
    Case("template paused", 400, graph(132015, "(#132015) Template is paused"), PERMANENT),
    Case("undeliverable", 400, graph(131026, "(#131026) Message undeliverable"), PERMANENT),
    Case("param missing", 400, graph(131008, "(#131008) Required parameter is missing"), PERMANENT),
    Case("invalid parameter", 400, graph(100, "(#100) Invalid parameter"), PERMANENT),
    Case("permission", 403, graph(10, "(#10) Permission denied"), PERMANENT),
    Case(
        "spam limit 131048 (no retry)", 400, graph(131048, "(#131048) Spam rate limit"), PERMANENT
    ),
    # §1.7: "no, fix quality", and Meta says to branch on the code, never on the status.
    Case(
        "spam limit 131048 on 429 (no retry)",
        429,
        graph(131048, "(#131048) Spam rate limit hit"),
        PERMANENT,
        "whatsapp_cloud_131048",
        "131048 Spam rate limit hit",
        retry_after_s=60.0,  # a permanent failure keeps no Retry-After
    ),
    Case(
        "pair rate limit 131056 on 429",
        429,
        graph(131056, "(#131056) (Business Account, Consumer Account) pair rate limit hit"),
        RETRY,
        "whatsapp_cloud_131056",
    ),
    # §1.7: build on `code`, never on the status. A refusal §1.7 says not to retry stays
    # permanent on a 5xx (Meta's table answers 131045 with HTTP 500): retried, it spent the
    # delivery's attempts for hours and counted against the number's circuit, holding back
    # every other patient's message.
    Case(
        "undeliverable 131026 on 500 (no retry)",
        500,
        graph(131026, "(#131026) Message undeliverable"),
        PERMANENT,
        "whatsapp_cloud_131026",
        "131026 Message undeliverable",
    ),
    Case(
        "certificate 131045 on 500",
        500,
        graph(131045, "(#131045) Incorrect certificate"),
        PERMANENT,
    ),
    Case("token 190 on 503", 503, graph(190, "Error validating access token"), PERMANENT),
    Case("template 132012 on 500", 500, graph(132012, "(#132012) Parameter format"), PERMANENT),
    # A Graph error under a 2xx names what went wrong: read as that error, not as a page
    # that is not Meta's (whatsapp_cloud_no_message_id, retried, a failure of the number).
    Case(
        "a refusal under 200",
        200,
        graph(131047, "(#131047) Re-engagement message"),
        PERMANENT,
        "whatsapp_cloud_131047",
        "131047 Re-engagement message",
    ),
    Case(
        "a throttling error under 200",
        200,
        graph(130429, "(#130429) Rate limit hit"),
        RETRY,
        "whatsapp_cloud_130429",
    ),
    Case("an unknown error under 200", 200, graph(999, "(#999) ?"), RETRY, "whatsapp_cloud_999"),
    Case("unknown 131000", 500, graph(131000, "(#131000) Something went wrong"), RETRY),
    Case("service unavailable", 503, graph(131016, "(#131016) Service unavailable"), RETRY),
    Case("maintenance on 400", 400, graph(131057, "(#131057) Account in maintenance"), RETRY),
    Case("unknown code on 429", 429, graph(999, "(#999) ?"), RETRY, "whatsapp_cloud_999"),
    Case("unknown code on 500", 500, graph(999999, "(#999999) ?"), RETRY, "whatsapp_cloud_999999"),
    Case(
        "proxy page",
        502,
        b"<html>Bad Gateway</html>",
        RETRY,
        "whatsapp_cloud_http_502",
        "502 Bad Gateway",
    ),
    Case("not JSON 404", 404, b"nope", PERMANENT, "whatsapp_cloud_http_404", "404 Not Found"),
    # The error's words come from `message`, else `title`, else `error_user_title`: the
    # operator reads them in the DLQ's `last_error`.
    Case(
        "an error titled only for users",
        400,
        {"error": {"code": 131026, "error_user_title": "Message Undeliverable"}},
        PERMANENT,
        "whatsapp_cloud_131026",
        "131026 Message Undeliverable",
    ),
    Case(
        "an error with a blank message and a title",
        400,
        {"error": {"code": 131026, "message": " ", "title": "Message undeliverable"}},
        PERMANENT,
        "whatsapp_cloud_131026",
        "131026 Message undeliverable",
    ),
    Case(
        "an error with a code alone",
        400,
        {"error": {"code": 131026}},
        PERMANENT,
        "whatsapp_cloud_131026",
        "131026",
    ),
    # A code that is no number names no Graph error: the HTTP status decides.
    Case(
        "a code that is a string",
        400,
        {"error": {"code": "131026", "message": "(#131026) Message undeliverable"}},
        PERMANENT,
        "whatsapp_cloud_http_400",
        "400 Message undeliverable",
    ),
    Case(
        "a code that is a boolean, on 503",
        503,
        {"error": {"code": True, "message": "oops"}},
        RETRY,
        "whatsapp_cloud_http_503",
        "503 oops",
    ),
]

TWILIO = [
    Case(
        "created",
        201,
        {"sid": "SM0123456789abcdef0123456789abcdef", "status": "queued", "error_code": None},
        SUCCESS,
        external_id="SM0123456789abcdef0123456789abcdef",
    ),
    Case(
        "invalid To (§2.4 example)",
        400,
        {
            "code": 21211,
            "message": "The 'To' number 5551234567 is not a valid phone number.",
            "more_info": "https://www.twilio.com/docs/errors/21211",
            "status": 400,
        },
        PERMANENT,
        "twilio_21211",
        "21211 The 'To' number 5551234567 is not a valid phone number.",
    ),
    Case(
        "authentication",
        401,
        {"code": 20003, "message": "Authenticate", "status": 401},
        PERMANENT,
        "twilio_20003",
        "20003 Authenticate",
    ),
    Case(
        "too many requests",
        429,
        {"code": 20429, "message": "Too Many Requests", "status": 429},
        RETRY,
        "twilio_20429",
        "20429 Too Many Requests",
        retry_after_s=3.0,
        expect_retry_after=3.0,
    ),
    Case("bare 429", 429, b"", RETRY, "twilio_http_429", "429 Too Many Requests"),
    Case("created without a sid", 201, {"status": "queued"}, RETRY, "twilio_no_message_id"),
    # Twilio's error body under a 2xx names the refusal: read as that error, by its code.
    Case(
        "an error under 200",
        200,
        {"code": 21211, "message": "The 'To' number is not a valid phone number.", "status": 400},
        PERMANENT,
        "twilio_21211",
        "21211 The 'To' number is not a valid phone number.",
    ),
    Case(
        "a rate limit under 200", 200, {"code": 20429, "message": "Too Many"}, RETRY, "twilio_20429"
    ),
    Case("a proxy's page on 200", 200, b"<html/>", RETRY, "twilio_no_message_id"),
    Case(
        "outside the window",
        400,
        {"code": 63016, "message": "Failed to send freeform message …", "status": 400},
        PERMANENT,
        "twilio_63016",
        "63016 Failed to send freeform message …",
    ),
    Case(
        "channel rate limit", 400, {"code": 63018, "message": "Rate limit"}, RETRY, "twilio_63018"
    ),
    Case(
        "daily limit 63038 (no retry before the window resets)",
        400,
        {"code": 63038, "message": "Account exceeded the daily messages limit", "status": 400},
        PERMANENT,
        "twilio_63038",
        "63038 Account exceeded the daily messages limit",
    ),
    Case("daily limit 63038 on 429", 429, {"code": 63038, "message": "Daily"}, PERMANENT),
    Case("server error", 500, {"code": 20500, "message": "Internal Server Error"}, RETRY),
    Case("proxy page", 503, b"<html/>", RETRY, "twilio_http_503", "503 Service Unavailable"),
    Case("not found", 404, {"code": 20404, "message": "Not found"}, PERMANENT, "twilio_20404"),
]

ZAPI = [
    Case(
        "sent (§3.5 example)",
        200,
        {
            "zaapId": "3999984263738042930CD6ECDE9VDWSA",
            "messageId": "D241XXXX732339502B68",
            "id": "D241XXXX732339502B68",
        },
        SUCCESS,
        external_id="D241XXXX732339502B68",
        # A DeliveryCallback may name the message by its zaapId alone (§3.4).
        external_alt_id="3999984263738042930CD6ECDE9VDWSA",
    ),
    Case("only a zaapId", 200, {"zaapId": "3999"}, SUCCESS, external_id="3999"),
    Case(
        "no Client-Token (§3.1)",
        400,
        {"error": "null not allowed"},
        PERMANENT,
        "zapi_http_400",
        "400 null not allowed",
    ),
    Case("wrong method", 405, b"", PERMANENT, "zapi_http_405", "405 Method Not Allowed"),
    Case("no Content-Type", 415, b"", PERMANENT, "zapi_http_415", "415 Unsupported Media Type"),
    Case("throttled", 429, {"error": "Too Many Requests"}, RETRY, "zapi_http_429"),
    Case("server error", 500, {"error": "boom"}, RETRY, "zapi_http_500", "500 boom"),
    Case("a 200 that says error", 200, {"error": "Instance not connected"}, PERMANENT),
    Case("a 200 without an id", 200, {"value": True}, RETRY, "zapi_no_message_id"),
    Case("an empty 200", 200, b"", RETRY, "zapi_no_message_id"),
]

SENDPULSE = [
    Case(
        "sent",
        200,
        {"success": True, "data": {"id": "66b2e4389f1a2b3c4d5e6f81", "status": 1}},
        SUCCESS,
        external_id="66b2e4389f1a2b3c4d5e6f81",
    ),
    Case(
        "success false in a 200 (§9.7)",
        200,
        {"success": False, "data": {"error": "contact is not active"}},
        PERMANENT,
        "sendpulse_unsuccessful",
    ),
    Case(
        "unauthorized",
        401,
        {"message": "Unauthorized!", "error_code": 401},
        PERMANENT,
        "sendpulse_401",
        "401 Unauthorized!",
    ),
    Case(
        "more than 10 requests per second",
        429,
        {"message": "More than 10 requests per second", "error_code": 2020202020},
        RETRY,
        "sendpulse_2020202020",
        "2020202020 More than 10 requests per second",
    ),
    Case(
        "success false with the rate-limit code in a 200",
        200,
        {"success": False, "message": "More than 10 requests per second", "error_code": 2020202020},
        RETRY,
        "sendpulse_2020202020",
        "2020202020 More than 10 requests per second",
    ),
    Case(
        "success false on 429",
        429,
        {"success": False, "data": {"error": "Too many requests"}},
        RETRY,
        "sendpulse_http_429",
    ),
    Case("server error", 500, b"", RETRY, "sendpulse_http_500"),
    Case("a proxy's page on 200", 200, b"<html/>", RETRY, "sendpulse_no_message_id"),
    Case("a 200 that is no answer of SendPulse's", 200, {}, RETRY, "sendpulse_no_message_id"),
    # SendPulse sends no status webhooks (§9.10 item 5): its word `success` is enough.
    Case("success without data", 200, {"success": True}, SUCCESS),
    Case("not found", 404, {"message": "Bot not found", "error_code": 404}, PERMANENT),
]


def check(case: Case, outcome_of: Callable[[Reply], Outcome]) -> None:
    outcome = outcome_of(reply(case))
    assert outcome.kind is case.kind
    assert outcome.status_code == case.status
    assert outcome.duration_ms == 12.5
    assert len(outcome.response_excerpt) <= EXCERPT_LIMIT
    assert outcome.retry_after_s == case.expect_retry_after
    if case.kind is SUCCESS:
        assert outcome.external_id == case.external_id
        assert outcome.external_alt_id == case.external_alt_id
        assert outcome.error_class is None
        return
    assert outcome.external_id is None
    if case.error_class is not None:
        assert outcome.error_class == case.error_class
    if case.head is not None:
        assert outcome.response_excerpt.splitlines()[0] == case.head


@pytest.mark.parametrize("case", CLOUD, ids=lambda case: case.name)
def test_cloud(case: Case) -> None:
    check(case, cloud.outcome_of)


@pytest.mark.parametrize("case", TWILIO, ids=lambda case: case.name)
def test_twilio(case: Case) -> None:
    check(case, twilio.outcome_of)


@pytest.mark.parametrize("case", ZAPI, ids=lambda case: case.name)
def test_zapi(case: Case) -> None:
    check(case, zapi.outcome_of)


@pytest.mark.parametrize("case", SENDPULSE, ids=lambda case: case.name)
def test_sendpulse(case: Case) -> None:
    check(case, sendpulse.outcome_of)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, {"access_token": "tok", "token_type": "Bearer", "expires_in": 3600}, ("tok", 3600)),
        (200, {"access_token": "tok", "token_type": "Bearer", "expires_in": 7200}, ("tok", 7200)),
        (200, {"access_token": "tok"}, ("tok", 3600)),
    ],
)
def test_sendpulse_token(status: int, body: dict[str, Any], expected: tuple[str, float]) -> None:
    assert sendpulse.token_of(Reply(status, orjson.dumps(body))) == expected


@pytest.mark.parametrize(
    ("status", "body", "kind", "error_class", "head"),
    [
        (
            401,
            {
                "error": "invalid_client",
                "error_description": "Client authentication failed",
                "message": "Client authentication failed",
            },
            PERMANENT,
            "sendpulse_invalid_client",
            "invalid_client Client authentication failed",
        ),
        (503, b"", RETRY, "sendpulse_http_503", "503 Service Unavailable"),
        # The 10 requests a second count token requests too (§9.7); the code is a slow-down
        # on any status, as on a send.
        (
            400,
            {"message": "More than 10 requests per second", "error_code": 2020202020},
            RETRY,
            "sendpulse_2020202020",
            "2020202020 More than 10 requests per second",
        ),
        (200, {"token_type": "Bearer"}, RETRY, "sendpulse_token", "token no access_token"),
    ],
)
def test_sendpulse_token_failures(
    status: int, body: Any, kind: OutcomeKind, error_class: str, head: str
) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    outcome = sendpulse.token_of(Reply(status, raw))
    assert isinstance(outcome, Outcome)
    assert (outcome.kind, outcome.error_class) == (kind, error_class)
    assert outcome.throttled is (error_class == "sendpulse_2020202020")
    assert outcome.response_excerpt.splitlines()[0] == head


def test_the_excerpt_is_bounded_and_one_line_headed() -> None:
    huge = graph(131047, "(#131047) Re-engagement\nmessage " + "x" * 5000)
    outcome = cloud.outcome_of(Reply(400, orjson.dumps(huge)))
    assert len(outcome.response_excerpt) == EXCERPT_LIMIT
    assert outcome.response_excerpt.startswith("131047 Re-engagement message xxx")


def first_decision(outcome: Outcome, *, base_s: float) -> Transition:
    """The worker's decision after a first attempt with `outcome` (8 allowed, no jitter,
    a 1 s floor after a 429 or a slow-down)."""
    return decide(
        attempts_before=0,
        max_attempts=8,
        outcome=outcome,
        now_ms=0,
        policy=BackoffPolicy(base_s=base_s, factor=2, max_s=60, jitter=0),
        rand=0.5,
        retry_after_floor_s=1.0,
    )


def test_a_permanent_provider_error_goes_to_the_dlq_with_its_class() -> None:
    """The worker's decision: straight to DEAD, `last_error` naming the provider's code."""
    outcome = cloud.outcome_of(Reply(400, orjson.dumps(graph(131047, "(#131047) Re-engagement"))))
    transition = first_decision(outcome, base_s=1)
    assert transition.to_state is DeliveryState.DEAD
    assert transition.last_error == describe_failure(outcome)
    assert transition.last_error is not None
    assert transition.last_error.startswith("whatsapp_cloud_131047")


@pytest.mark.parametrize("status", [400, 429])
def test_the_spam_rate_limit_is_not_retried_whatever_the_status(status: int) -> None:
    """Meta's 131048 restricts the number for its quality (§1.7: "no, fix quality"); Meta
    files it with the throttling errors, whose HTTP status is unsettled (§8 item 1). On a
    429 it was retried as a slow-down: each queued message was sent `max_attempts` times
    into a restriction that only better quality lifts. Dead-lettered at the first attempt,
    and no failure of the provider (circuits) either way."""
    body = orjson.dumps(graph(131048, "(#131048) Spam rate limit hit"))
    outcome = cloud.outcome_of(Reply(status, body, 30.0))
    assert (outcome.kind, outcome.throttled, outcome.retry_after_s) == (PERMANENT, False, None)
    assert counts_against(outcome) is None
    assert first_decision(outcome, base_s=1).to_state is DeliveryState.DEAD


def test_a_spent_daily_limit_goes_to_the_dlq_at_once_and_leaves_the_circuit_alone() -> None:
    """Twilio's 63038: the account's rolling 24 h message limit is spent (Twilio: wait for
    the next day or ask for a higher limit). The retries, minutes apart, could only repeat
    it and spend the delivery's attempts; it is dead-lettered at once, to be replayed once
    the limit allows, and says nothing about the health of the provider."""
    body = {"code": 63038, "message": "Account exceeded the daily messages limit"}
    outcome = twilio.outcome_of(Reply(400, orjson.dumps(body)))
    assert not outcome.throttled
    assert counts_against(outcome) is None
    transition = first_decision(outcome, base_s=1)
    assert (transition.to_state, transition.attempts) == (DeliveryState.DEAD, 1)
    assert transition.last_error == "twilio_63038: 63038 Account exceeded the daily messages limit"


THROTTLED = [
    ("cloud pair rate limit 131056", cloud.outcome_of, 400, graph(131056, "(#131056) pair")),
    ("cloud throughput 130429", cloud.outcome_of, 400, graph(130429, "(#130429) Rate limit")),
    ("cloud pair rate limit on 429", cloud.outcome_of, 429, graph(131056, "(#131056) pair")),
    ("cloud throughput on 429", cloud.outcome_of, 429, graph(130429, "(#130429) Rate limit")),
    ("cloud app limit 4", cloud.outcome_of, 400, graph(4, "(#4) Application request limit")),
    ("cloud WABA limit 80007", cloud.outcome_of, 400, graph(80007, "(#80007) Rate limit")),
    ("cloud custom limit 613", cloud.outcome_of, 400, graph(613, "(#613) Calls to this api")),
    ("twilio channel limit 63018", twilio.outcome_of, 400, {"code": 63018, "message": "Rate"}),
    (
        "sendpulse 10 rps",
        sendpulse.outcome_of,
        400,
        {"message": "More than 10 requests per second", "error_code": 2020202020},
    ),
    (
        "sendpulse 10 rps in an unsuccessful 200",
        sendpulse.outcome_of,
        200,
        {"success": False, "message": "More than 10 requests per second", "error_code": 2020202020},
    ),
]


@pytest.mark.parametrize(
    ("outcome_of", "status", "body"),
    [case[1:] for case in THROTTLED],
    ids=[case[0] for case in THROTTLED],
)
def test_a_providers_rate_limit_code_is_a_slow_down_not_a_failure_of_the_provider(
    outcome_of: Callable[[Reply], Outcome], status: int, body: Any
) -> None:
    """A throttling code on a non-429 status (Meta answers 400, contracts §1.7) asks us to
    slow down as a 429 does: it must not count against the circuit (docs/guarantees.md:
    a failure is a 5xx, 3xx, 408/409/425, timeout or connection error; five 131056 to one
    busy customer would otherwise stop every send of the number), and gets the 429 floor."""
    outcome = outcome_of(Reply(status, orjson.dumps(body)))
    assert outcome.kind is RETRY
    assert outcome.throttled
    assert counts_against(outcome) is None
    assert first_decision(outcome, base_s=0.1).next_attempt_at == 1_000  # the floor, 1 s


def test_an_ordinary_provider_failure_is_not_a_slow_down() -> None:
    outcome = cloud.outcome_of(Reply(503, orjson.dumps(graph(131016, "(#131016) down"))))
    assert not outcome.throttled
    assert counts_against(outcome) is False
    assert cloud.outcome_of(Reply(429, b"")).throttled


NOT_THE_PROVIDERS = [
    ("cloud", cloud.outcome_of, 200, b"<html><body>Welcome to the proxy</body></html>"),
    ("twilio", twilio.outcome_of, 201, b""),
    ("zapi", zapi.outcome_of, 200, b"OK"),
    ("sendpulse", sendpulse.outcome_of, 200, b"<html/>"),
]


@pytest.mark.parametrize(
    ("outcome_of", "status", "body"),
    [case[1:] for case in NOT_THE_PROVIDERS],
    ids=[case[0] for case in NOT_THE_PROVIDERS],
)
def test_a_2xx_that_is_not_the_providers_answer_is_retried_not_taken_for_sent(
    outcome_of: Callable[[Reply], Outcome], status: int, body: bytes
) -> None:
    """A proxy, a captive portal or a wrong `api_base` answering 200 did not send the
    message: taken for a success, the message stayed `sent` with no provider id, no status
    ever reached it and nobody was told. Retried, and a failure of the destination, so a
    proxy answering every send so opens the circuit and the messages wait."""
    outcome = outcome_of(Reply(status, body))
    assert (outcome.kind, outcome.external_id) == (RETRY, None)
    assert outcome.error_class is not None and outcome.error_class.endswith("_no_message_id")
    assert counts_against(outcome) is False
    assert first_decision(outcome, base_s=1).to_state is DeliveryState.PENDING

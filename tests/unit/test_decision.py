"""The pure rules of DESIGN.md §2: what a delivery becomes after an attempt."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estafeta.clock import iso_from_ms
from estafeta.config import BackoffConfig
from estafeta.config.models import MAX_DURATION_S
from estafeta.delivery.backoff import BackoffPolicy
from estafeta.delivery.decision import (
    Transition,
    classify_status,
    decide,
    describe_failure,
    parse_retry_after,
)
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.delivery.state import DeliveryState

NOW = 1_751_371_200_000  # 2025-07-01T12:00:00Z
POLICY = BackoffPolicy()  # 1 s, 2 s, 4 s … capped at 3600 s, ±20 %


def ok() -> Outcome:
    return Outcome(OutcomeKind.SUCCESS, 12.0, status_code=200)


def http(status: int, retry_after_s: float | None = None) -> Outcome:
    return Outcome(classify_status(status), 12.0, status, f"http_{status}", retry_after_s, "body")


def failure(error_class: str, kind: OutcomeKind = OutcomeKind.RETRYABLE) -> Outcome:
    return Outcome(kind, 200.0, error_class=error_class, response_excerpt="detail\nmore")


E500 = "http_500: Internal Server Error"
E503 = "http_503: Service Unavailable"
E429 = "http_429: Too Many Requests"
CAP_MS = 3_600_000  # POLICY.max_s


def pending(attempts: int, delay_ms: int, error: str) -> Transition:
    return Transition(DeliveryState.PENDING, attempts, NOW + delay_ms, error)


def dead(attempts: int, error: str) -> Transition:
    return Transition(DeliveryState.DEAD, attempts, None, error)


def succeeded(attempts: int) -> Transition:
    return Transition(DeliveryState.SUCCEEDED, attempts, None, None)


PERMANENT = failure("invalid_destination", OutcomeKind.PERMANENT)
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("attempts_before", "max_attempts", "outcome", "floor", "expected"),
    [
        # success, whatever the history
        (0, 8, ok(), 0.0, succeeded(1)),
        (7, 8, ok(), 0.0, succeeded(8)),
        # retryable: the backoff of the attempt just made (rand 0.5: no jitter)
        (0, 8, http(503), 0.0, pending(1, 1000, E503)),
        (2, 8, http(500), 0.0, pending(3, 4000, E500)),
        (5, 8, http(502), 0.0, pending(6, 32_000, "http_502: Bad Gateway")),
        (20, 99, http(500), 0.0, pending(21, CAP_MS, E500)),
        (0, 8, http(301), 0.0, pending(1, 1000, "http_301: Moved Permanently")),
        (0, 8, http(599), 0.0, pending(1, 1000, "http_599")),  # not in the registry
        # out of attempts
        (7, 8, http(503), 0.0, dead(8, E503)),
        (0, 1, http(503), 0.0, dead(1, E503)),
        (9, 8, http(503), 0.0, dead(10, E503)),
        # permanent: dead at once, attempts left or not
        (0, 8, http(404), 0.0, dead(1, "http_404: Not Found")),
        (0, 8, http(410), 0.0, dead(1, "http_410: Gone")),
        (0, 8, PERMANENT, 0.0, dead(1, "invalid_destination: detail")),
        # Retry-After honoured instead of the backoff, clamped to [0, max_s]
        (0, 8, http(503, 7.0), 0.0, pending(1, 7000, E503)),
        (4, 8, http(503, 0.5), 0.0, pending(5, 500, E503)),
        (0, 8, http(503, 1e9), 0.0, pending(1, CAP_MS, E503)),
        (0, 8, http(503, INF), 0.0, pending(1, CAP_MS, E503)),
        (0, 8, http(503, NAN), 0.0, pending(1, 1000, E503)),  # nonsense: the backoff
        # no wait asked ("0", a past date): the backoff, not at once (before: 0 ms)
        (0, 8, http(503, 0.0), 0.0, pending(1, 1000, E503)),
        (5, 8, http(503, 0.0), 0.0, pending(6, 32_000, E503)),
        (0, 8, http(503, -5.0), 0.0, pending(1, 1000, E503)),
        (0, 8, http(429, 0.0), 30.0, pending(1, 30_000, E429)),
        # a floor after timeouts and 429s, and only after those
        (0, 8, failure("timeout"), 30.0, pending(1, 30_000, "timeout: detail")),
        (7, 99, failure("timeout"), 30.0, pending(8, 128_000, "timeout: detail")),
        (0, 8, http(429), 30.0, pending(1, 30_000, E429)),
        (0, 8, http(429, 7.0), 30.0, pending(1, 30_000, E429)),
        (0, 8, http(429, 90.0), 30.0, pending(1, 90_000, E429)),
        (0, 8, http(503), 30.0, pending(1, 1000, E503)),
        (0, 8, failure("connection_refused"), 30.0, pending(1, 1000, "connection_refused: detail")),
        (0, 8, failure("timeout"), 1e6, pending(1, CAP_MS, "timeout: detail")),  # max_s wins
        # a 429 with no attempts left is still dead
        (7, 8, http(429, 7.0), 30.0, dead(8, E429)),
        # this process had no descriptor to connect with: never the last attempt
        (7, 8, failure("local_resources"), 0.0, pending(8, 128_000, "local_resources: detail")),
        (0, 1, failure("local_resources"), 0.0, pending(1, 1000, "local_resources: detail")),
        (20, 8, failure("local_resources"), 0.0, pending(21, CAP_MS, "local_resources: detail")),
    ],
)
def test_decide_table(
    attempts_before: int, max_attempts: int, outcome: Outcome, floor: float, expected: Transition
) -> None:
    got = decide(
        attempts_before=attempts_before,
        max_attempts=max_attempts,
        outcome=outcome,
        now_ms=NOW,
        policy=POLICY,
        rand=0.5,
        retry_after_floor_s=floor,
    )
    assert got == expected


def test_decide_applies_jitter_from_rand() -> None:
    def due(rand: float) -> int | None:
        t = decide(
            attempts_before=2,
            max_attempts=8,
            outcome=http(500),
            now_ms=NOW,
            policy=POLICY,
            rand=rand,
        )
        return t.next_attempt_at

    assert due(0.0) == NOW + 3200
    assert due(0.5) == NOW + 4000
    assert due(0.999) == NOW + 4798


@pytest.mark.parametrize(("attempts_before", "max_attempts"), [(-1, 8), (0, 0)])
def test_decide_rejects_impossible_counts(attempts_before: int, max_attempts: int) -> None:
    with pytest.raises(ValueError):
        decide(
            attempts_before=attempts_before,
            max_attempts=max_attempts,
            outcome=ok(),
            now_ms=NOW,
            policy=POLICY,
            rand=0.5,
        )


@given(
    attempts_before=st.integers(min_value=0, max_value=1000),
    max_attempts=st.integers(min_value=1, max_value=1000),
    status=st.integers(min_value=100, max_value=599),
    retry_after=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
    floor=st.floats(min_value=0, max_value=1e5),
)
def test_a_retry_is_always_due_within_max_s(
    attempts_before: int,
    max_attempts: int,
    status: int,
    retry_after: float | None,
    rand: float,
    floor: float,
) -> None:
    t = decide(
        attempts_before=attempts_before,
        max_attempts=max_attempts,
        outcome=http(status, retry_after),
        now_ms=NOW,
        policy=POLICY,
        rand=rand,
        retry_after_floor_s=floor,
    )
    assert t.attempts == attempts_before + 1
    assert (t.next_attempt_at is not None) == (t.to_state is DeliveryState.PENDING)
    if t.next_attempt_at is not None:
        assert NOW <= t.next_attempt_at <= NOW + POLICY.max_s * 1000
    assert (t.last_error is None) == (t.to_state is DeliveryState.SUCCEEDED)


def test_describe_failure_without_detail() -> None:
    assert describe_failure(Outcome(OutcomeKind.RETRYABLE, 1.0, error_class="timeout")) == "timeout"
    assert describe_failure(Outcome(OutcomeKind.RETRYABLE, 1.0)) == "retryable_failure"


def test_describe_failure_keeps_at_most_200_characters_of_detail() -> None:
    # docs/state_machine.md: `last_error` holds at most 200 characters of detail.
    long = Outcome(
        OutcomeKind.RETRYABLE, 1.0, error_class="connection_error", response_excerpt="x" * 500
    )
    assert describe_failure(long) == "connection_error: " + "x" * 200


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, OutcomeKind.SUCCESS),
        (201, OutcomeKind.SUCCESS),
        (202, OutcomeKind.SUCCESS),
        (204, OutcomeKind.SUCCESS),
        (299, OutcomeKind.SUCCESS),
        (300, OutcomeKind.RETRYABLE),  # the first status past the 2xx range
        (301, OutcomeKind.RETRYABLE),  # redirects are not followed: a failure, retried
        (302, OutcomeKind.RETRYABLE),
        (307, OutcomeKind.RETRYABLE),
        (308, OutcomeKind.RETRYABLE),
        (400, OutcomeKind.PERMANENT),
        (401, OutcomeKind.PERMANENT),
        (403, OutcomeKind.PERMANENT),
        (404, OutcomeKind.PERMANENT),
        (405, OutcomeKind.PERMANENT),
        (408, OutcomeKind.RETRYABLE),
        (409, OutcomeKind.RETRYABLE),
        (410, OutcomeKind.PERMANENT),
        (413, OutcomeKind.PERMANENT),
        (422, OutcomeKind.PERMANENT),
        (425, OutcomeKind.RETRYABLE),
        (429, OutcomeKind.RETRYABLE),
        (499, OutcomeKind.PERMANENT),
        (500, OutcomeKind.RETRYABLE),
        (502, OutcomeKind.RETRYABLE),
        (503, OutcomeKind.RETRYABLE),
        (504, OutcomeKind.RETRYABLE),
        (599, OutcomeKind.RETRYABLE),
        (100, OutcomeKind.RETRYABLE),  # not a final answer: unknown, so retried
        (600, OutcomeKind.RETRYABLE),
    ],
)
def test_classify_status(status: int, kind: OutcomeKind) -> None:
    assert classify_status(status) is kind


def _http_date(seconds_after_now: int) -> str:
    return format_datetime(
        datetime.fromtimestamp(NOW / 1000 + seconds_after_now, tz=UTC), usegmt=True
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        # RFC 9110: delay-seconds = 1*DIGIT, ASCII digits; else the backoff (before: a sign,
        # a fraction and "٣" were read, "-3" as "now")
        ("1.5", None),
        ("-3", None),
        ("+3", None),
        ("\u0663", None),  # ٣, Arabic-Indic 3: int() and float() read it as 3
        ("\uff11\uff12", None),  # １２, fullwidth digits
        ("1\u0663", None),
        ("Tue, \u0660\u0661 Jul 2025 12:00:30 GMT", None),  # a date's too (before: 30.0)
        (_http_date(90), 90.0),
        (_http_date(-90), 0.0),
        # the three forms a recipient must accept (RFC 9110 §5.6.7)
        ("Tue, 01 Jul 2025 12:00:30 GMT", 30.0),  # IMF-fixdate
        ("Tuesday, 01-Jul-25 12:00:30 GMT", 30.0),  # obsolete RFC 850
        ("Tue Jul  1 12:00:30 2025", 30.0),  # obsolete asctime
        ("Tue, 01 Jul 2025 12:00:30 -0000", 30.0),  # "no zone known": read as UTC
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("1_000", None),
        ("1e3", None),
        ("7 seconds", None),
        ("9" * 400, float("inf")),  # absurdly long: decide() clamps it to max_s
        ("Tue, 99 Jul 2025 12:00:30 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    got = parse_retry_after(value, NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_a_retry_after_date_with_no_known_zone_is_utc_whatever_the_hosts_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "-0000" gives a naive datetime: read in the host's zone, it would be hours off.
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after("Tue, 01 Jul 2025 12:00:30 -0000", NOW) == pytest.approx(30.0)
    finally:
        monkeypatch.undo()
        time.tzset()


@given(st.text(max_size=40))
def test_parse_retry_after_never_raises(value: str) -> None:
    got = parse_retry_after(value, NOW)
    assert got is None or got >= 0


def test_retry_after_beats_a_short_backoff_cap_but_not_the_hour_ceiling() -> None:
    short = BackoffPolicy(base_s=0.05, factor=2, max_s=0.2, jitter=0)
    told = decide(
        attempts_before=0,
        max_attempts=5,
        outcome=http(429, 7.0),
        now_ms=NOW,
        policy=short,
        rand=0.5,
    )
    assert told.next_attempt_at == NOW + 7000
    absurd = decide(
        attempts_before=0,
        max_attempts=5,
        outcome=http(503, 1e9),
        now_ms=NOW,
        policy=short,
        rand=0.5,
    )
    assert absurd.next_attempt_at == NOW + 3_600_000
    untold = decide(
        attempts_before=3, max_attempts=5, outcome=http(503), now_ms=NOW, policy=short, rand=0.5
    )
    assert untold.next_attempt_at == NOW + 200


@pytest.mark.parametrize("retry_after", [None, 99_999_999_999.0, INF])
def test_the_longest_backoff_a_config_takes_gives_a_due_time_the_api_can_show(
    retry_after: float | None,
) -> None:
    # max_s = 1e308 used to load; the first retry then failed on round(inf) in decide().
    longest = BackoffConfig(base_s=MAX_DURATION_S, factor=1e308, max_s=MAX_DURATION_S)
    policy = BackoffPolicy(base_s=longest.base_s, factor=longest.factor, max_s=longest.max_s)
    t = decide(
        attempts_before=98,
        max_attempts=100,
        outcome=http(503, retry_after),
        now_ms=NOW,
        policy=policy,
        rand=0.999,
    )
    assert t.next_attempt_at == NOW + MAX_DURATION_S * 1000
    assert iso_from_ms(t.next_attempt_at) == "2025-07-31T12:00:00.000Z"  # as /deliveries shows it


@given(
    attempts_before=st.integers(0, 50),
    max_attempts=st.integers(1, 50),
    kind=st.sampled_from(list(OutcomeKind)),
    status=st.sampled_from([None, 200, 404, 429, 503]),
    rand=st.floats(0, 0.999),
)
def test_decide_only_takes_edges_of_the_state_machine(
    attempts_before: int, max_attempts: int, kind: OutcomeKind, status: int | None, rand: float
) -> None:
    from estafeta.delivery.state import ALLOWED_TRANSITIONS

    outcome = Outcome(kind, 1.0, status_code=status)
    t = decide(
        attempts_before=attempts_before,
        max_attempts=max_attempts,
        outcome=outcome,
        now_ms=NOW,
        policy=POLICY,
        rand=rand,
    )
    assert (DeliveryState.IN_FLIGHT, t.to_state) in ALLOWED_TRANSITIONS

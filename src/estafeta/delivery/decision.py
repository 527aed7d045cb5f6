"""Decide what a delivery becomes after an attempt: a pure function, applied later by the store.

Oban and River split "what should happen" from "make it happen": `decide` looks only at its
arguments and returns a `Transition`; the store applies it with a guarded update
(`… WHERE id = ? AND state = 'in_flight' AND lease_token = ?`) so a late result never
overwrites a delivery that was rescued and re-leased meanwhile. Keeping the decision pure
makes every rule of DESIGN.md §2 a row in a table-driven test.

Also here, because they are the rules the decision rests on: which HTTP statuses are worth
retrying (`classify_status`) and how to read a `Retry-After` header (`parse_retry_after`).
"""

from __future__ import annotations

import re
from datetime import UTC
from email.utils import parsedate_to_datetime
from http import HTTPStatus

from estafeta.delivery.backoff import BackoffPolicy, backoff_delay_s
from estafeta.delivery.outcome import LOCAL_RESOURCES, Outcome, OutcomeKind
from estafeta.delivery.state import DeliveryState
from estafeta.record import Record

# Statuses that mean "not now" rather than "never": request timeout, conflict, too early and
# too many requests. Every other 4xx says the request itself is wrong and retrying it the
# same way cannot help.
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})

RETRY_AFTER_CEILING_S = 3600.0  # the longest Retry-After honoured (unless max_s is longer)
_LAST_ERROR_DETAIL_LIMIT = 200  # characters of detail kept in `last_error`
# RFC 9110 §10.2.3: delay-seconds = 1*DIGIT. Not int() or float(), nor `\d`: they take "٣"
# (Arabic-Indic 3), "nan", "1_0", "1e9", "-5".
_DELTA_SECONDS = re.compile(r"[0-9]+")


class Transition(Record, frozen=True):
    """What the store should write for the delivery once the attempt is recorded."""

    to_state: DeliveryState  # SUCCEEDED, PENDING (retry) or DEAD
    attempts: int  # attempts made, this one included
    next_attempt_at: int | None  # Unix ms when PENDING, else None
    last_error: str | None  # e.g. "http_503: Service Unavailable"; None on success


def decide(
    *,
    attempts_before: int,
    max_attempts: int,
    outcome: Outcome,
    now_ms: int,
    policy: BackoffPolicy,
    rand: float,
    retry_after_floor_s: float = 0.0,
) -> Transition:
    """The transition for a delivery that had `attempts_before` attempts and just got `outcome`.

    * success → SUCCEEDED;
    * permanent failure → DEAD at once (retrying a 404 only repeats it);
    * retryable failure with no attempts left → DEAD (the dead-letter queue), unless this
      process could not even open a connection (`LOCAL_RESOURCES`): the destination was
      never reached, so it is retried with backoff however many attempts it took (a flood
      of client connections on the sending host dead-lettered deliveries to a sound one);
    * otherwise → PENDING, due after the destination's `Retry-After` when it asked for a
      wait (clamped to max(max_s, RETRY_AFTER_CEILING_S): the destination's word beats our
      own backoff cap, but a hostile or broken header cannot park a delivery for a
      year), else after the backoff delay: a `Retry-After` of 0 or a past date asks for
      none, and retrying at once would spend every attempt within milliseconds against a
      destination that is failing. After a timeout or a 429 (or a provider's
      rate-limit code, `Outcome.throttled`) the delay is at least
      `retry_after_floor_s`: a destination that is slow or throttling needs room to recover,
      not a prompt second hit (svix does the same).
    """
    if attempts_before < 0:
        raise ValueError(f"attempts_before cannot be negative, not {attempts_before}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
    attempts = attempts_before + 1
    if outcome.kind is OutcomeKind.SUCCESS:
        return Transition(DeliveryState.SUCCEEDED, attempts, None, None)

    last_error = describe_failure(outcome)
    spent = attempts >= max_attempts and outcome.error_class != LOCAL_RESOURCES
    if outcome.kind is OutcomeKind.PERMANENT or spent:
        return Transition(DeliveryState.DEAD, attempts, None, last_error)

    told = outcome.retry_after_s
    # A wait the destination asked for; 0, a past date or NaN (NaN > 0 is False) asks none.
    delay_s = told if told is not None and told > 0 else backoff_delay_s(policy, attempts, rand)
    if outcome.error_class == "timeout" or outcome.slow_down:
        delay_s = max(delay_s, retry_after_floor_s)
    ceiling = policy.max_s
    if told is not None:
        ceiling = max(policy.max_s, RETRY_AFTER_CEILING_S)
    delay_s = min(ceiling, max(0.0, delay_s))
    return Transition(DeliveryState.PENDING, attempts, now_ms + round(delay_s * 1000), last_error)


def describe_failure(outcome: Outcome) -> str:
    """A one-line reason for an operator: `http_503: Service Unavailable`, `timeout`, …

    Plain HTTP failures (`http_…`) get the status's standard phrase (the body is in the
    attempt's excerpt); a connector that names the failure itself (a provider's
    `whatsapp_cloud_131047`) and every other failure get the first line of its detail,
    where connectors put the provider's code and title.
    """
    error_class = outcome.error_class or f"{outcome.kind}_failure"
    detail = ""
    named_by_connector = not error_class.startswith("http_") and outcome.response_excerpt.strip()
    if outcome.status_code is not None and not named_by_connector:
        try:
            detail = HTTPStatus(outcome.status_code).phrase
        except ValueError:  # a status outside the standard registry, e.g. 599
            detail = ""
    elif outcome.response_excerpt.strip():
        detail = outcome.response_excerpt.strip().splitlines()[0]
    detail = detail[:_LAST_ERROR_DETAIL_LIMIT]
    return f"{error_class}: {detail}" if detail else error_class


def classify_status(status: int) -> OutcomeKind:
    """Whether an HTTP answer is a success, worth retrying, or a permanent failure.

    2xx succeeds. 408/409/425/429 and 5xx are retried. 3xx is a failure that is retried:
    redirects are not followed (Standard Webhooks §6.2; following them would also let a
    destination bounce our signed request to a host it was never configured for). 410 Gone
    and every other 4xx are permanent. Anything else (1xx, non-standard codes) is retried,
    because an unknown answer is not proof that retrying is futile and `max_attempts`
    still bounds it.
    """
    if 200 <= status <= 299:
        return OutcomeKind.SUCCESS
    if 400 <= status <= 499 and status not in _RETRYABLE_4XX:
        return OutcomeKind.PERMANENT
    return OutcomeKind.RETRYABLE


def parse_retry_after(value: str | None, now_ms: int) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP-date.

    A date before `now_ms` means "now", i.e. 0. A missing or unreadable header (a sign, a
    fraction, digits other than ASCII ones: not RFC 9110's `1*DIGIT`) gives None, so the
    caller falls back to its backoff instead of trusting garbage.
    """
    if value is None:
        return None
    text = value.strip()
    # Both forms are ASCII; the date parser's int() would read other digits as well.
    if not text or not text.isascii():
        return None
    if _DELTA_SECONDS.fullmatch(text):
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000" zone: RFC 5322 says UTC with no known local zone
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now_ms / 1000)

"""The circuit breaker's transitions, one table row each, and its invariants under hypothesis."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estafeta.delivery.circuit import (
    Admission,
    Circuit,
    CircuitPolicy,
    CircuitState,
    admit,
    blocked_until,
    give_back,
    record,
)

CLOSED, OPEN, HALF = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
# 3 consecutive failures open it; open for 10 s; a silent probe is forgotten after 20 s.
P = CircuitPolicy(failures=3, reset_s=10, probe_timeout_s=20)
# Ratio mode: ≥ 50 % failures over ≥ 4 requests in a 60 s window (the run of 100 never comes).
R = CircuitPolicy(failures=100, failure_ratio=0.5, window_s=60, min_requests=4)
R2 = CircuitPolicy(failures=2, failure_ratio=0.5, window_s=60, min_requests=4)
C = Circuit  # short, for the tables: C(state, consecutive, window start, requests, failures)

OPENED = Circuit(OPEN, consecutive_failures=3, opened_at=1_000)
PROBING = Circuit(HALF, consecutive_failures=3, opened_at=1_000, probe_started_at=11_000)


@pytest.mark.parametrize(
    ("circuit", "now", "admission", "after"),
    [
        (Circuit(), 1_000, Admission.ALLOW, Circuit()),
        (Circuit(consecutive_failures=2), 1_000, Admission.ALLOW, Circuit(consecutive_failures=2)),
        (OPENED, 1_000, Admission.REJECT, OPENED),
        (OPENED, 10_999, Admission.REJECT, OPENED),  # 1 ms before reset_s has passed
        (OPENED, 11_000, Admission.PROBE, PROBING),  # reset_s passed: this caller probes
        (
            OPENED,
            99_000,
            Admission.PROBE,
            Circuit(HALF, 3, opened_at=1_000, probe_started_at=99_000),
        ),
        (PROBING, 11_000, Admission.REJECT, PROBING),  # the probe is out: nobody else
        (PROBING, 30_999, Admission.REJECT, PROBING),
        (  # the probe was silent for probe_timeout_s: forget it, probe again
            PROBING,
            31_000,
            Admission.PROBE,
            Circuit(HALF, 3, opened_at=1_000, probe_started_at=31_000),
        ),
        # States no writer makes (a hand-edited store): the breaker recovers by probing.
        (
            Circuit(OPEN),
            5_000,
            Admission.PROBE,
            Circuit(HALF, opened_at=5_000, probe_started_at=5_000),
        ),
        (
            Circuit(HALF, opened_at=1),
            5_000,
            Admission.PROBE,
            Circuit(HALF, opened_at=1, probe_started_at=5_000),
        ),
    ],
)
def test_admit_table(circuit: Circuit, now: int, admission: Admission, after: Circuit) -> None:
    assert admit(circuit, P, now) == (admission, after)


@pytest.mark.parametrize(
    ("policy", "circuit", "success", "now", "started", "after"),
    [
        # closed, consecutive mode: a healthy circuit stays exactly Circuit()
        (P, C(), True, 5_000, None, C()),
        (P, C(consecutive_failures=2), True, 5_000, None, C()),
        (P, C(), False, 5_000, None, C(consecutive_failures=1)),
        (P, C(consecutive_failures=2), False, 5_000, None, C(OPEN, 3, opened_at=5_000)),
        # half-open: the probe's result decides
        (P, PROBING, True, 12_000, None, C()),
        (P, PROBING, True, 12_000, 11_000, C()),
        (P, PROBING, False, 12_000, None, C(OPEN, 4, opened_at=12_000)),
        (P, PROBING, False, 12_000, 11_000, C(OPEN, 4, opened_at=12_000)),
        # … but a send that began before the probe is late: counters only
        (P, PROBING, True, 12_000, 10_999, C(HALF, 0, opened_at=1_000, probe_started_at=11_000)),
        (P, PROBING, False, 12_000, 500, C(HALF, 4, opened_at=1_000, probe_started_at=11_000)),
        # open: every result is late (nothing is admitted while open)
        (P, OPENED, False, 2_000, None, C(OPEN, 4, opened_at=1_000)),
        (P, OPENED, True, 2_000, None, C(OPEN, 0, opened_at=1_000)),
        # ratio mode: the first result starts a window
        (R, C(), False, 1_000, None, C(CLOSED, 1, 1_000, 1, 1)),
        (R, C(), True, 1_000, None, C(CLOSED, 0, 1_000, 1, 0)),
        # 2 failures of 4 requests: 50 % ≥ 50 % with enough requests → open
        (
            R,
            C(CLOSED, 0, 1_000, 3, 1),
            False,
            2_000,
            None,
            C(OPEN, 1, 1_000, 4, 2, opened_at=2_000),
        ),
        # 3 of 3 failed, but fewer than min_requests: stays closed
        (R, C(CLOSED, 2, 1_000, 2, 2), False, 2_000, None, C(CLOSED, 3, 1_000, 3, 3)),
        # a success never opens, even when the ratio is met
        (R, C(CLOSED, 0, 1_000, 3, 2), True, 2_000, None, C(CLOSED, 0, 1_000, 4, 2)),
        # the window is over: a new one starts with this result alone
        (R, C(CLOSED, 3, 1_000, 3, 3), False, 61_000, None, C(CLOSED, 4, 61_000, 1, 1)),
        (
            R,
            C(CLOSED, 3, 1_000, 3, 3),
            False,
            60_999,
            None,
            C(OPEN, 4, 1_000, 4, 4, opened_at=60_999),
        ),
        # a window stamped far in the future (a wrong clock) restarts too
        (R, C(CLOSED, 0, 900_000, 3, 3), False, 1_000, None, C(CLOSED, 1, 1_000, 1, 1)),
        # ratio mode still opens on a run of `failures`
        (
            R2,
            C(CLOSED, 1, 1_000, 1, 1),
            False,
            2_000,
            None,
            C(OPEN, 2, 1_000, 2, 2, opened_at=2_000),
        ),
        # closing resets the window as well
        (
            R,
            C(HALF, 4, 1_000, 9, 7, opened_at=1_000, probe_started_at=2_000),
            True,
            3_000,
            None,
            C(),
        ),
    ],
)
def test_record_table(
    policy: CircuitPolicy,
    circuit: Circuit,
    success: bool,
    now: int,
    started: int | None,
    after: Circuit,
) -> None:
    assert record(circuit, policy, success=success, now_ms=now, started_at_ms=started) == after


@pytest.mark.parametrize(
    ("circuit", "started", "after"),
    [
        # the probe said nothing (a 429, a permanent 4xx, nothing sent): open as before it,
        # so reset_s has passed and the next admit probes at once
        (PROBING, None, OPENED),
        (PROBING, 11_000, OPENED),
        (PROBING, 12_000, OPENED),
        (PROBING, 10_999, PROBING),  # began before the probe: not its answer
        (OPENED, None, OPENED),  # nothing is out
        (Circuit(consecutive_failures=2), 5_000, Circuit(consecutive_failures=2)),
    ],
)
def test_give_back_table(circuit: Circuit, started: int | None, after: Circuit) -> None:
    assert give_back(circuit, started_at_ms=started) == after


def test_a_probe_given_back_lets_the_next_delivery_probe_at_once() -> None:
    admission, c = admit(OPENED, P, 11_000)
    assert admission is Admission.PROBE
    c = give_back(c, started_at_ms=11_000)  # answered 429 at 11_050
    assert blocked_until(c, P, 11_060) is None  # not the 20 s probe timeout
    assert admit(c, P, 11_060) == (Admission.PROBE, replace(PROBING, probe_started_at=11_060))


@pytest.mark.parametrize(
    ("circuit", "now", "expected"),
    [
        (Circuit(), 1_000, None),
        (Circuit(consecutive_failures=2), 1_000, None),
        (OPENED, 1_000, 11_000),
        (OPENED, 10_999, 11_000),
        (OPENED, 11_000, None),  # a probe may go now
        (PROBING, 12_000, 31_000),  # until the probe would be forgotten
        (PROBING, 31_000, None),
        (Circuit(OPEN), 1_000, None),  # unreadable state: let a probe find out
    ],
)
def test_blocked_until_table(circuit: Circuit, now: int, expected: int | None) -> None:
    assert blocked_until(circuit, P, now) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failures": 0},
        {"reset_s": -1.0},
        {"reset_s": float("nan")},
        {"window_s": 0.0},
        {"window_s": float("inf")},
        {"probe_timeout_s": 0.0},
        {"failure_ratio": 0.0},
        {"failure_ratio": 1.5},
        {"min_requests": 0},
    ],
)
def test_policy_rejects_values_that_break_the_breaker(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CircuitPolicy(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"failures": 1}, {"reset_s": 0.0}, {"failure_ratio": 1.0}, {"min_requests": 1}],
)
def test_policy_takes_the_edges_of_each_range(kwargs: dict[str, Any]) -> None:
    # What the configuration accepts must build: the edge values included.
    CircuitPolicy(**kwargs)


def test_serialisation_round_trips_and_tolerates_missing_keys() -> None:
    for circuit in (Circuit(), OPENED, PROBING, Circuit(CLOSED, 1, 5, 6, 2)):
        assert Circuit.from_dict(circuit.to_dict()) == circuit
    assert Circuit.from_dict({}) == Circuit()
    assert Circuit.from_dict({"state": "open", "opened_at": 7}) == Circuit(OPEN, opened_at=7)
    with pytest.raises(ValueError):
        Circuit.from_dict({"state": "ajar"})


def test_a_destination_that_recovers() -> None:
    """The whole story with the functions used as a worker uses them."""
    c, now = Circuit(), 0
    for _ in range(3):
        assert admit(c, P, now)[0] is Admission.ALLOW
        c = record(c, P, success=False, now_ms=now)
        now += 100
    assert c.state is OPEN and blocked_until(c, P, now) == 200 + 10_000
    assert admit(c, P, now)[0] is Admission.REJECT
    now = 10_200
    admission, c = admit(c, P, now)
    assert admission is Admission.PROBE and admit(c, P, now + 1)[0] is Admission.REJECT
    c = record(c, P, success=True, now_ms=now + 50, started_at_ms=now)
    assert c == Circuit() and admit(c, P, now + 60)[0] is Admission.ALLOW


# -- invariants under random use -----------------------------------------------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(["admit", "record", "give_back"]),
        st.integers(min_value=0, max_value=25_000),  # ms since the previous operation
        st.booleans(),  # success, for record
        st.one_of(st.none(), st.integers(min_value=0, max_value=40_000)),  # started this long ago
    ),
    max_size=80,
)


def assert_valid(c: Circuit, policy: CircuitPolicy) -> None:
    assert c.consecutive_failures >= 0
    assert 0 <= c.window_failures <= c.window_requests
    if policy.failure_ratio is None:
        assert (c.window_started_at, c.window_requests, c.window_failures) == (0, 0, 0)
    if c.state is CLOSED:
        assert c.opened_at is None and c.probe_started_at is None
    elif c.state is OPEN:
        assert c.opened_at is not None and c.probe_started_at is None
    else:
        assert c.opened_at is not None and c.probe_started_at is not None


@settings(max_examples=400, deadline=None)
@given(policy=st.sampled_from([P, R, R2, CircuitPolicy(reset_s=0)]), ops=operations)
def test_random_use_never_makes_an_invalid_state(
    policy: CircuitPolicy, ops: list[tuple[str, int, bool, int | None]]
) -> None:
    c, now = Circuit(), 1_700_000_000_000
    live_probe: int | None = None  # when the probe now out was admitted
    probe_timeout_ms = round(policy.probe_timeout_s * 1000)
    for op, step, success, ago in ops:
        now += step
        if op == "admit":
            admission, after = admit(c, policy, now)
            assert (admission is Admission.REJECT) == (blocked_until(c, policy, now) is not None)
            assert (admission is Admission.ALLOW) == (c.state is CLOSED)
            if admission is Admission.PROBE:
                # never two live probes: a new one only once the previous one is forgotten
                assert live_probe is None or now - live_probe >= probe_timeout_ms
                live_probe = now
                assert after.state is HALF and blocked_until(after, policy, now) is not None
            else:
                assert after == c
            if c.state is OPEN and admission is Admission.REJECT:
                assert c.opened_at is not None and now < c.opened_at + policy.reset_s * 1000
            c = after
        elif op == "record":
            started = None if ago is None else now - ago
            c = record(c, policy, success=success, now_ms=now, started_at_ms=started)
        else:
            c = give_back(c, started_at_ms=None if ago is None else now - ago)
        if c.state is not HALF:
            live_probe = None
        assert_valid(c, policy)

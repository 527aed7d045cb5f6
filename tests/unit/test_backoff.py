"""The backoff schedule: exponential, capped, jittered, and safe for absurd attempt counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estafeta.delivery.backoff import BackoffPolicy, backoff_delay_s

DEFAULT = BackoffPolicy()
NO_JITTER = BackoffPolicy(jitter=0.0)


@pytest.mark.parametrize(
    ("policy", "attempt", "rand", "expected"),
    [
        (DEFAULT, 1, 0.5, 1.0),  # rand 0.5: no jitter
        (DEFAULT, 2, 0.5, 2.0),
        (DEFAULT, 3, 0.5, 4.0),
        (DEFAULT, 11, 0.5, 1024.0),
        (DEFAULT, 13, 0.5, 3600.0),  # 4096 capped
        (DEFAULT, 1, 0.0, 0.8),  # -20 %
        (DEFAULT, 3, 0.0, 3.2),
        (DEFAULT, 3, 1.0, 4.8),  # the +20 % limit
        (DEFAULT, 13, 0.0, 2880.0),  # at the cap jitter still shortens …
        (DEFAULT, 13, 0.99, 3600.0),  # … but never lengthens past max_s
        (BackoffPolicy(base_s=5, factor=3, max_s=600, jitter=0), 3, 0.3, 45.0),
        (BackoffPolicy(base_s=5, factor=1, max_s=600, jitter=0), 9, 0.3, 5.0),  # constant
        (BackoffPolicy(base_s=0, factor=2, max_s=600, jitter=0.5), 10_000, 0.9, 0.0),
        (BackoffPolicy(base_s=10, max_s=5, jitter=0), 1, 0.5, 5.0),  # base above the cap
        (BackoffPolicy(max_s=0), 4, 0.9, 0.0),
        (DEFAULT, 10_000, 0.5, 3600.0),  # 2.0**9999 overflows a float
        (NO_JITTER, 10**9, 0.0, 3600.0),
    ],
)
def test_delay_table(policy: BackoffPolicy, attempt: int, rand: float, expected: float) -> None:
    assert backoff_delay_s(policy, attempt, rand) == pytest.approx(expected)


@pytest.mark.parametrize(("attempt", "rand"), [(0, 0.5), (-1, 0.5), (1, -0.1), (1, 1.5)])
def test_rejects_arguments_outside_their_domain(attempt: int, rand: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay_s(DEFAULT, attempt, rand)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_s": -1.0},
        {"factor": 0.5},
        {"factor": float("inf")},
        {"max_s": -1.0},
        {"max_s": float("nan")},
        {"jitter": 1.5},
        {"jitter": -0.1},
    ],
)
def test_policy_rejects_values_that_break_the_schedule(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)


policies = st.builds(
    BackoffPolicy,
    base_s=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    factor=st.floats(min_value=1, max_value=1e3, allow_nan=False),
    max_s=st.floats(min_value=0, max_value=1e7, allow_nan=False),
    jitter=st.floats(min_value=0, max_value=1),
)
attempts = st.integers(min_value=1, max_value=100_000)
rands = st.floats(min_value=0, max_value=1, exclude_max=True)


@given(policy=policies, attempt=attempts, rand=rands)
def test_delay_is_always_within_zero_and_max(
    policy: BackoffPolicy, attempt: int, rand: float
) -> None:
    assert 0.0 <= backoff_delay_s(policy, attempt, rand) <= policy.max_s


@given(
    policy=st.builds(
        BackoffPolicy,
        base_s=st.floats(min_value=0, max_value=1e6, allow_nan=False),
        factor=st.floats(min_value=1, max_value=1e3, allow_nan=False),
        max_s=st.floats(min_value=0, max_value=1e7, allow_nan=False),
        jitter=st.just(0.0),
    ),
    attempt=attempts,
    rand=rands,
)
def test_without_jitter_the_delay_never_shrinks(
    policy: BackoffPolicy, attempt: int, rand: float
) -> None:
    assert backoff_delay_s(policy, attempt, rand) <= backoff_delay_s(policy, attempt + 1, rand)


@given(policy=policies, attempt=attempts, rand=rands)
def test_jitter_stays_within_its_band(policy: BackoffPolicy, attempt: int, rand: float) -> None:
    centre = backoff_delay_s(policy, attempt, 0.5)
    jittered = backoff_delay_s(policy, attempt, rand)
    assert centre * (1 - policy.jitter) - 1e-9 <= jittered <= centre * (1 + policy.jitter) + 1e-9

"""The inbound sliding window counter: what a tenant sending bursts would see."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estafeta.config import load_config_dict
from estafeta.ingress.ratelimit import SlidingWindowCounter, TenantRateLimiter


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def counter(limit: int, period_s: float, clock: FakeClock) -> SlidingWindowCounter:
    return SlidingWindowCounter(limit, period_s, clock=clock)


def test_a_fresh_window_admits_the_limit_then_refuses() -> None:
    clock = FakeClock(1000.0)
    limiter = counter(3, 10, clock)
    assert [limiter.hit() for _ in range(3)] == [None, None, None]
    wait = limiter.hit()
    assert wait is not None and wait > 0


def test_the_previous_window_counts_by_how_much_of_it_is_still_covered() -> None:
    clock = FakeClock(1005.0)  # half-way through the window [1000, 1010)
    limiter = counter(10, 10, clock)
    assert all(limiter.hit() is None for _ in range(10))
    clock.now = 1010.0  # the next window starts: the previous still weighs all 10
    assert limiter.hit() is not None
    clock.now = 1015.0  # half of it has slid out: room for 5
    assert [limiter.hit() is None for _ in range(6)] == [True] * 5 + [False]


def test_the_wait_is_when_the_window_has_room_again() -> None:
    clock = FakeClock(1000.0)
    limiter = counter(4, 10, clock)
    for _ in range(4):
        limiter.hit()
    wait = limiter.hit()
    assert wait is not None
    # All four are in the current window: room comes once they weigh 3 or less as the
    # previous window, a quarter of the way into the next one.
    assert wait == pytest.approx(10 + 2.5)
    clock.now += wait - 0.01
    assert limiter.hit() is not None
    clock.now += 0.02
    assert limiter.hit() is None


def test_a_long_silence_forgets_everything() -> None:
    clock = FakeClock(1000.0)
    limiter = counter(2, 1, clock)
    limiter.hit()
    limiter.hit()
    clock.now += 60
    assert [limiter.hit() for _ in range(2)] == [None, None]


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        SlidingWindowCounter(0, 1)
    with pytest.raises(ValueError, match="positive"):
        SlidingWindowCounter(1, 0)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 20),
    period_s=st.sampled_from([1.0, 2.0, 10.0, 60.0]),
    steps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=60),
)
def test_every_wait_is_exactly_long_enough(limit: int, period_s: float, steps: list[float]) -> None:
    """Asking again after the wait succeeds; asking a little earlier does not. And no fixed
    window ever counts more than the limit."""
    clock = FakeClock(1_000_000.0)
    limiter = counter(limit, period_s, clock)
    admitted: list[float] = []  # the history that shaped the limiter's state

    def asked_again_at(moment: float) -> float | None:
        """What a limiter with the same history answers at `moment`."""
        replay_clock = FakeClock()
        replay = counter(limit, period_s, replay_clock)
        for at in admitted:
            replay_clock.now = at
            assert replay.hit() is None
        replay_clock.now = moment
        return replay.hit()

    for dt in steps:
        clock.now += dt
        wait = limiter.hit()
        if wait is None:
            admitted.append(clock.now)
            window = int(clock.now // period_s)
            assert sum(1 for at in admitted if int(at // period_s) == window) <= limit
            continue
        assert wait > 0
        assert asked_again_at(clock.now + wait + 1e-6) is None, f"refused {wait:.6f} s later"
        if wait > 2e-3:
            early = asked_again_at(clock.now + wait - 1e-3)
            assert early is not None, f"admitted before the {wait:.6f} s wait"


def test_tenants_get_their_own_limit_and_whole_second_retry_after() -> None:
    config = load_config_dict(
        {
            "tenants": [
                {"id": "acme", "name": "Acme", "ingress_rate_limit": "2/minute"},
                {"id": "sol", "name": "Sol"},
            ]
        }
    )
    clock = FakeClock(1_000_040.0)  # 20 s into a minute (60 × 16,667 = 1,000,020)
    limiter = TenantRateLimiter(config, clock=clock)
    assert [limiter.retry_after("acme") for _ in range(2)] == [None, None]
    # Both requests weigh fully until the next minute starts, then 1 of 2 must slide out.
    assert limiter.retry_after("acme") == 40 + 30
    assert all(limiter.retry_after("sol") is None for _ in range(100))  # 100/minute default
    assert limiter.retry_after("sol") is not None
    assert limiter.retry_after("nobody") is None


def test_a_wait_under_a_second_is_answered_as_one_second() -> None:
    config = load_config_dict(
        {"tenants": [{"id": "acme", "name": "Acme", "ingress_rate_limit": "2/second"}]}
    )
    clock = FakeClock(1_000_000.9)  # 0.1 s before the next second
    limiter = TenantRateLimiter(config, clock=clock)
    assert [limiter.retry_after("acme") for _ in range(2)] == [None, None]
    # 0.1 s left, then half of this second must slide out: 0.6 s, said as 1 (Retry-After
    # is in whole seconds, and 0 would ask for an immediate retry).
    assert limiter.retry_after("acme") == 1


# -- shared between processes (the Redis round trips are in tests/integration) ----------------


def test_what_other_processes_counted_takes_room_in_the_window() -> None:
    clock = FakeClock(1_000_020.0)  # the start of a minute (60 × 16,667)
    limiter = SlidingWindowCounter(10, 60, clock=clock, shared=True)
    assert all(limiter.hit() is None for _ in range(3))
    window = limiter.window()
    assert limiter.to_share() == {window: 3}
    limiter.shared({window: 3})
    # Redis holds 9 for the window: this process's 3 and 6 from others.
    limiter.learn({window: 9, window - 1: 0})
    assert [limiter.hit() is None for _ in range(2)] == [True, False]


def test_counts_this_process_shared_are_not_counted_again_as_others() -> None:
    clock = FakeClock(1_000_020.0)
    limiter = SlidingWindowCounter(10, 60, clock=clock, shared=True)
    for _ in range(5):
        limiter.hit()
    sent = limiter.to_share()
    limiter.hit()  # admitted while the share was on its way: not yet in Redis
    limiter.shared(sent)
    limiter.learn({limiter.window(): sum(sent.values())})
    assert limiter.to_share() == {limiter.window(): 6}  # the next share sends the 6th
    assert [limiter.hit() is None for _ in range(5)] == [True] * 4 + [False]


def test_the_previous_window_of_other_processes_slides_out_as_ours_does() -> None:
    clock = FakeClock(1_000_020.0)
    limiter = SlidingWindowCounter(10, 60, clock=clock, shared=True)
    window = limiter.window()
    limiter.learn({window: 10})  # others used the whole window
    assert limiter.hit() is not None
    clock.now += 90  # half-way into the next window: the full previous one weighs 5
    assert [limiter.hit() is None for _ in range(6)] == [True] * 5 + [False]


def test_counts_that_did_not_reach_redis_wait_for_the_next_share_while_they_count() -> None:
    clock = FakeClock(1_000_020.0)
    limiter = SlidingWindowCounter(10, 60, clock=clock, shared=True)
    for _ in range(4):
        limiter.hit()
    window = limiter.window()
    assert limiter.to_share() == {window: 4}  # the share fails: nothing said it arrived
    limiter.hit()
    assert limiter.to_share() == {window: 5}  # the whole count goes again, once
    clock.now += 120  # two windows on: those counts no longer weigh anything
    assert limiter.to_share() == {}


def test_counts_not_shared_before_their_window_ended_are_shared_under_it_after() -> None:
    clock = FakeClock(1_000_079.0)  # a second before the minute ends
    limiter = SlidingWindowCounter(10, 60, clock=clock, shared=True)
    for _ in range(3):
        limiter.hit()
    window = limiter.window()
    clock.now += 2  # the minute turned before those 3 reached Redis
    limiter.hit()
    # They still weigh in the sliding window, so the other processes must learn of them.
    assert limiter.to_share() == {window + 1: 1, window: 3}


def test_an_unshared_counter_keeps_nothing_to_share() -> None:
    limiter = SlidingWindowCounter(10, 60, clock=FakeClock(1_000_020.0))
    limiter.hit()
    assert limiter.to_share() == {}


async def test_a_limiter_without_redis_closes_quietly() -> None:
    # `serve` closes its limiter at shutdown, Redis configured or not.
    limiter = TenantRateLimiter(load_config_dict({"tenants": [{"id": "acme", "name": "Acme"}]}))
    assert limiter.retry_after("acme") is None
    await limiter.aclose()

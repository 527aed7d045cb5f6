"""Ids sort by creation time; timestamps render as the canonical event says."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estafeta import ids
from estafeta.clock import StoreClock, iso_from_ms, ms_from_iso
from estafeta.ids import new_id, ulid
from tests.clocks import ManualClock

CROCKFORD_DIGITS = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CROCKFORD = set(CROCKFORD_DIGITS)


def test_an_id_has_its_prefix_and_26_crockford_characters() -> None:
    made = new_id("evt", 1_751_371_200_000)
    assert made.startswith("evt_") and len(made) == 30
    assert set(made[4:]) <= CROCKFORD


def test_the_time_part_is_the_ulid_encoding_of_the_milliseconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ids, "_last", [0, 0])  # the process's first id
    # 1_469_918_176_385 ms is "01ARYZ6S41" in the ULID specification's example.
    assert ulid(1_469_918_176_385)[:10] == "01ARYZ6S41"


class _Bits(random.Random):
    """Random bits chosen by the test."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def getrandbits(self, k: int, /) -> int:
        return self.bits


@given(st.integers(0, 2**48 - 1), st.integers(0, 2**79 - 1))
def test_a_ulid_is_the_crockford_base32_of_its_128_bits(ms: int, bits: int) -> None:
    # ULID: 48 bits of milliseconds then 80 random bits, as 26 base-32 digits (the top two
    # of 130 bits zero); the encoding is written out by hand, so every digit is held to it.
    value = ms << 80 | bits
    expected = "".join(CROCKFORD_DIGITS[value >> 5 * i & 31] for i in reversed(range(26)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids, "_random", _Bits(bits))
        patch.setattr(ids, "_last", [-1, 0])  # another millisecond: fresh random bits
        assert ulid(ms) == expected


@given(st.integers(0, 2**48 - 2), st.integers(1, 10**6))
def test_ids_sort_by_creation_time(earlier: int, later_by: int) -> None:
    later = min(earlier + later_by, 2**48 - 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids, "_last", [0, 0])  # the process's first id
        first, second = ulid(earlier), ulid(later)
    assert first[:10] < second[:10]  # by the time part, not by counting on


@given(st.integers(1, 2**48 - 1), st.integers(1, 10**6))
def test_an_id_made_after_the_clock_stepped_back_still_sorts_after(
    first_ms: int, back_by: int
) -> None:
    """A store clock's sync may move the time back a millisecond or two (a step of the
    store's own clock, by the step): the next id of the process still sorts after the last,
    as the order of a key's deliveries needs."""
    made = ulid(first_ms)
    assert ulid(max(0, first_ms - back_by)) > made


def test_ids_of_different_milliseconds_have_fresh_random_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Other processes make ids in the same milliseconds: only the random part keeps theirs
    # from colliding with ours.
    monkeypatch.setattr(ids, "_last", [0, 0])  # the process's first id
    randoms = {ulid(1_751_371_200_000 + ms)[10:] for ms in range(100)}
    assert len(randoms) == 100


def test_an_id_made_without_a_time_carries_the_current_millisecond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ids, "_last", [0, 0])  # the process's first id
    before = time.time_ns() // 1_000_000
    made = ulid()
    after = time.time_ns() // 1_000_000
    ms = 0
    for c in made[:10]:
        ms = ms * 32 + CROCKFORD_DIGITS.index(c)
    assert before <= ms <= after


def test_ids_are_unique() -> None:
    assert len({new_id("dlv", 5) for _ in range(10_000)}) == 10_000


@given(st.integers(0, 253_402_300_799_999))
def test_iso_round_trips_milliseconds(ms: int) -> None:
    text = iso_from_ms(ms)
    assert text.endswith("Z") and len(text) == 24
    assert ms_from_iso(text) == ms


def test_iso_renders_the_canonical_form() -> None:
    assert iso_from_ms(1_763_730_300_123) == "2025-11-21T13:05:00.123Z"


def test_ids_made_in_one_millisecond_keep_their_order() -> None:
    made = [new_id("evt", 1_751_371_200_000) for _ in range(1000)]
    assert made == sorted(made) and len(set(made)) == 1000


async def test_a_store_clock_keeps_the_stores_time_whatever_the_wall_clock_does() -> None:
    """A machine 2 minutes ahead reads the store's time once synced, and a step of its wall
    clock (NTP, minutes back) moves nothing: only the time elapsed counts."""
    store_ms = 1_700_000_000_000
    ticks = [0]  # nanoseconds of the clock no one sets

    async def read_store() -> int:
        ticks[0] += 20_000_000  # a 40 ms round trip, the store answering halfway
        answer = store_ms + ticks[0] // 1_000_000  # the store counts from store_ms at 0
        ticks[0] += 20_000_000
        return answer

    wall = ManualClock(store_ms + 120_000)
    clock = StoreClock(read_store, wall=wall, ticks_ns=lambda: ticks[0])
    assert clock.now_ms() == store_ms + 120_000  # not synced yet: the machine's own
    await clock.sync()
    assert clock.now_ms() == store_ms + 40
    wall.now -= 10 * 60_000
    ticks[0] += 5_000_000_000
    assert clock.now_ms() == store_ms + 5_040


async def test_a_slow_read_of_the_store_time_is_taken_first_and_never_after() -> None:
    """A read that waited 3 s for a connection, the store answering at the end: taken as
    read halfway, it is 1.5 s off. The first is still closer than the machine's own clock
    (minutes off, maybe); once synced, counting on is closer."""
    store_ms = 1_700_000_000_000
    ticks = [0]  # nanoseconds of the clock no one sets; the store counts from store_ms at 0
    waits_ns = [3_000_000_000, 20_000_000, 3_000_000_000]  # before each read's answer

    async def read_store() -> int:
        ticks[0] += waits_ns.pop(0)
        return store_ms + ticks[0] // 1_000_000

    wall = ManualClock(store_ms + 120_000)
    clock = StoreClock(read_store, wall=wall, ticks_ns=lambda: ticks[0])
    await clock.sync()
    assert clock.now_ms() == store_ms + 3_000 + 1_500  # off by half the wait, not minutes
    await clock.sync()
    assert clock.now_ms() == store_ms + 3_020 + 10  # a quick read: taken
    await clock.sync()
    assert clock.now_ms() == store_ms + 6_020 + 10  # a slow one: counted on instead

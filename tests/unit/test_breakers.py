"""The worker's view of circuits: what counts, and what a ratio sees."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from estafeta.config import load_config_dict
from estafeta.delivery.breakers import Breakers, counts_against
from estafeta.delivery.circuit import CircuitState
from estafeta.delivery.circuit_store import MemoryCircuitStore
from estafeta.delivery.outcome import Outcome, OutcomeKind

OK = Outcome(OutcomeKind.SUCCESS, 1.0, status_code=200)
DOWN = Outcome(OutcomeKind.RETRYABLE, 1.0, status_code=503, error_class="http_503")


def breakers(
    circuit: dict[str, object], states: MemoryCircuitStore | None = None
) -> tuple[Breakers, MemoryCircuitStore]:
    """A worker's breakers for destination `d`; `states` shared with another worker's."""
    config = load_config_dict(
        {
            "tenants": [{"id": "t"}],
            "destinations": [
                {"id": "d", "tenant": "t", "url": "http://127.0.0.1:9/", **{"circuit": circuit}}
            ],
        }
    )
    states = states if states is not None else MemoryCircuitStore()
    return Breakers(states, config), states


async def test_a_ratio_counts_the_successes_too() -> None:
    board, states = breakers({"failures": 1000, "failure_ratio": 0.5, "min_requests": 4})
    for _ in range(6):
        await board.record("d", OK, started_at=1, now_ms=2)
    for _ in range(4):
        await board.record("d", DOWN, started_at=1, now_ms=3)
    circuit = (await states.get_all())["d"]
    assert circuit.state is CircuitState.CLOSED  # 4 of 10 failed: under half
    for _ in range(3):
        await board.record("d", DOWN, started_at=1, now_ms=4)
    assert (await states.get_all())["d"].state is CircuitState.OPEN  # 7 of 13


async def test_a_healthy_destination_writes_nothing() -> None:
    board, states = breakers({"failures": 5})
    for _ in range(20):
        await board.record("d", OK, started_at=1, now_ms=2)
    assert await states.get_all() == {}


def test_what_counts_against_a_destination() -> None:
    assert counts_against(OK) is True
    assert counts_against(DOWN) is False
    assert counts_against(Outcome(OutcomeKind.RETRYABLE, 1, status_code=429)) is None
    assert counts_against(Outcome(OutcomeKind.PERMANENT, 1, status_code=404)) is None
    assert counts_against(Outcome(OutcomeKind.RETRYABLE, 0, error_class="lease_expired")) is None
    # this process could not open a connection: the destination was never reached
    assert counts_against(Outcome(OutcomeKind.RETRYABLE, 0, error_class="local_resources")) is None


@pytest.mark.parametrize(
    "answer",
    [
        Outcome(OutcomeKind.PERMANENT, 1.0, status_code=400, error_class="http_400"),
        Outcome(OutcomeKind.RETRYABLE, 1.0, status_code=429, error_class="http_429"),
        Outcome(OutcomeKind.RETRYABLE, 1.0, error_class="local_resources"),
    ],
)
async def test_a_probe_answered_with_what_counts_for_nothing_is_given_back(
    answer: Outcome,
) -> None:
    """The destination answered the probe, so the next delivery may probe at once rather
    than wait for the probe to be forgotten (probe_timeout_s, 60 s)."""
    board, states = breakers({"failures": 1, "reset_s": 1})
    await board.record("d", DOWN, started_at=1_000, now_ms=1_000)
    await board.refresh(force=True)
    assert board.not_closed() == {"d"}
    assert await board.try_probe("d", 2_000)
    await board.record("d", answer, started_at=1_500, now_ms=2_010)  # began before: not it
    assert (await states.get_all())["d"].state is CircuitState.HALF_OPEN
    await board.record("d", answer, started_at=2_000, now_ms=2_050)
    assert (await states.get_all())["d"].state is CircuitState.OPEN
    assert board.probe_ready(2_060) == ["d"]
    assert await board.try_probe("d", 2_060)


async def test_a_destination_slower_than_a_minute_closes_its_circuit_after_one_probe() -> None:
    """Allowed 90 s an attempt and answering every one in 80 s. A probe was forgotten after a
    fixed 60 s while still in flight, a second one admitted, and the first one's success
    ignored as late: each probe was replaced before it could answer, and the destination
    got one delivery a minute for ever."""
    config = load_config_dict(
        {
            "tenants": [{"id": "t"}],
            "destinations": [
                {
                    "id": "d",
                    "tenant": "t",
                    "url": "http://127.0.0.1:9/",
                    "timeout_s": 90,
                    "circuit": {"failures": 1, "reset_s": 1},
                }
            ],
        }
    )
    states = MemoryCircuitStore()
    board = Breakers(states, config)
    await board.record("d", DOWN, started_at=0, now_ms=0)  # the outage: the circuit opens
    probes: list[int] = []  # when each probe was sent; each is answered 200 80 s later
    for now in range(1_000, 300_000, 1_000):  # the worker's loop, once a second, 5 minutes
        await board.refresh(force=True)
        for started in [p for p in probes if p + 80_000 == now]:
            await board.record("d", OK, started_at=started, now_ms=now)
        if "d" in board.probe_ready(now) and await board.try_probe("d", now):
            probes.append(now)
    assert len(probes) == 1  # never a second probe while the first was in flight
    circuit = (await states.get_all()).get("d")
    assert circuit is None or circuit.state is CircuitState.CLOSED


async def probe_taken_by_a_killed_worker(*, lease_s: int, timeout_s: int) -> Breakers:
    """A circuit opened at 0 whose probe a worker took at 1 s and was then killed (its answer
    never reaches the circuit), with these `worker.lease_s` and destination `timeout_s`."""
    config = load_config_dict(
        {
            "tenants": [{"id": "t"}],
            "worker": {"lease_s": lease_s},
            "destinations": [
                {
                    "id": "d",
                    "tenant": "t",
                    "url": "http://127.0.0.1:9/",
                    "timeout_s": timeout_s,
                    "circuit": {"failures": 1, "reset_s": 1},
                }
            ],
        }
    )
    board = Breakers(MemoryCircuitStore(), config)
    await board.record("d", DOWN, started_at=0, now_ms=0)  # the circuit opens
    await board.refresh(force=True)
    assert await board.try_probe("d", 1_000)  # taken by the worker that is then killed
    return board


async def test_a_probe_whose_worker_died_is_forgotten_after_a_lease_not_a_minute() -> None:
    """Leases of 10 s, a destination answering within 2 s. The worker that took the probe was
    killed before its answer reached the circuit: its delivery was rescued once its lease
    ended, but the circuit waited a fixed 60 s for the probe, and nothing reached the
    destination for a minute though it was back. The probe is waited for as long as a lease,
    as the delivery is (never less than its attempt may take: the slow destination's test)."""
    board = await probe_taken_by_a_killed_worker(lease_s=10, timeout_s=2)
    assert not await board.try_probe("d", 10_999)  # within its lease: it may still answer
    assert await board.try_probe("d", 11_000)  # its lease is over: the next delivery probes


async def test_a_long_lease_does_not_hold_a_dead_probe_longer_than_a_minute() -> None:
    """Leases of an hour (a setting `worker.lease_s` allows up to 30 days), a destination
    answering within 10 s. A probe whose worker was killed cannot answer after its attempt's
    timeout; the circuit waited a whole lease for it, so nothing reached the recovered
    destination for an hour where it had waited at most a minute before."""
    board = await probe_taken_by_a_killed_worker(lease_s=3600, timeout_s=10)
    assert not await board.try_probe("d", 15_000)  # its attempt may still be answering
    assert await board.try_probe("d", 61_000)  # a minute on: the next delivery probes


async def test_a_slow_destinations_dead_probe_is_forgotten_five_seconds_after_its_timeout() -> None:
    """configuration.md: a dead worker's probe is forgotten after the destination's timeout
    + 5 s when that is longer than the minute: its answer may still be on its way until then."""
    board = await probe_taken_by_a_killed_worker(lease_s=60, timeout_s=90)
    assert not await board.try_probe("d", 95_999)  # 90 s + 5 s after the probe at 1 s
    assert await board.try_probe("d", 96_000)


# A tenant with a WhatsApp Cloud source: its sends have the circuit `send:wa`.
SEND_SOURCE: dict[str, Any] = {
    "tenants": [{"id": "t"}],
    "sources": [
        {
            "id": "wa",
            "tenant": "t",
            "kind": "whatsapp_cloud",
            "app_secret": "s",
            "verify_token": "v",
            "access_token": "a",
            "phone_number_id": "1",
        }
    ],
}


async def test_a_dead_workers_send_probe_is_forgotten_after_a_lease_too() -> None:
    """Messages sent through a provider source (`send:<source>`) have a circuit of the
    defaults, and their attempts a 10 s timeout. With leases of 20 s, a killed worker's probe
    of one was waited for a fixed minute, not the lease configuration.md promises: nothing
    was sent through the number for 40 s after its delivery was rescued."""
    config = load_config_dict({**SEND_SOURCE, "worker": {"lease_s": 20}})
    board = Breakers(MemoryCircuitStore(), config)
    for _ in range(5):  # the default circuit: five failures open it
        await board.record("send:wa", DOWN, started_at=0, now_ms=0)
    await board.refresh(force=True)
    assert await board.try_probe("send:wa", 30_000)  # taken by the worker that is then killed
    assert not await board.try_probe("send:wa", 49_999)  # within its lease: it may answer
    assert await board.try_probe("send:wa", 50_000)  # its lease is over: the next one probes


async def test_a_provider_sends_circuit_opens_after_five_failures_and_probes_after_30_s() -> None:
    """operations.md: provider sends have circuits with the defaults (5 failures, 30 s)."""
    board = Breakers(MemoryCircuitStore(), load_config_dict(SEND_SOURCE))
    for _ in range(4):
        await board.record("send:wa", DOWN, started_at=0, now_ms=0)
    await board.refresh(force=True)
    assert board.not_closed() == set()  # four failures: still closed
    await board.record("send:wa", DOWN, started_at=0, now_ms=0)
    await board.refresh(force=True)
    assert board.not_closed() == {"send:wa"}
    assert not await board.try_probe("send:wa", 29_999)
    assert await board.try_probe("send:wa", 30_000)


async def test_an_open_circuit_blocks_its_destination_until_reset_s_after_it_opened() -> None:
    board, _ = breakers({"failures": 1, "reset_s": 30})
    await board.record("d", DOWN, started_at=0, now_ms=1_000)
    await board.refresh(force=True)
    assert board.blocked_until("d", 2_000) == 31_000
    assert board.blocked_until("d", 31_000) is None  # its probe may go
    assert board.blocked_until("healthy", 2_000) is None


async def test_only_a_circuit_that_is_not_closed_is_ready_for_a_probe() -> None:
    board, _ = breakers({"failures": 2, "reset_s": 30})
    await board.record("d", DOWN, started_at=0, now_ms=0)  # a failure on record, still closed
    await board.refresh(force=True)
    assert (board.on_record(), board.probe_ready(60_000)) == ({"d"}, [])
    await board.record("d", DOWN, started_at=0, now_ms=0)  # open
    await board.refresh(force=True)
    assert (board.probe_ready(29_999), board.probe_ready(30_000)) == ([], ["d"])


async def test_a_forced_refresh_sees_what_another_worker_did_at_once() -> None:
    board, states = breakers({"failures": 1})
    await board.refresh(force=True)  # just read: an unforced refresh would wait REFRESH_S
    other, _ = breakers({"failures": 1}, states)
    await other.record("d", DOWN, started_at=0, now_ms=0)  # another worker opens it
    await board.refresh(force=True)
    assert board.not_closed() == {"d"}


async def test_each_change_of_state_is_counted_once() -> None:
    board, _ = breakers({"failures": 2})
    await board.record("d", DOWN, started_at=0, now_ms=0)  # a failure on record: still closed
    await board.record("d", DOWN, started_at=0, now_ms=0)
    await board.record("d", DOWN, started_at=0, now_ms=0)  # open already: no change of state
    assert board.transitions == {("d", "open"): 1}


async def test_forgetting_a_removed_destination_clears_its_circuit_unless_it_changed() -> None:
    board, states = breakers({"failures": 1})
    await board.record("d", DOWN, started_at=0, now_ms=0)
    await board.forget("d")
    assert (await states.get_all(), board.on_record()) == ({}, set())
    await board.record("d", DOWN, started_at=0, now_ms=0)
    other, _ = breakers({"failures": 1}, states)  # a process naming it again records meanwhile
    await other.record("d", DOWN, started_at=0, now_ms=5)
    await board.forget("d")  # what this worker read is not what is there any more: kept
    assert set(await states.get_all()) == {"d"}
    assert board.on_record() == {"d"}


async def test_forgetting_a_removed_destinations_circuit_logs_what_it_left() -> None:
    """operations.md: `circuit_forgotten` (info) names the `destination` and the `state` its
    circuit was left in; a healthy circuit, with nothing to clear, logs nothing."""
    board, _ = breakers({"failures": 1})
    await board.record("d", DOWN, started_at=0, now_ms=0)  # open
    with capture_logs() as logs:
        await board.forget("d")
        await board.forget("d")  # cleared already: nothing more to say
    forgotten = [e for e in logs if e["event"] == "circuit_forgotten"]
    assert forgotten == [
        {"event": "circuit_forgotten", "log_level": "info", "destination": "d", "state": "open"}
    ]

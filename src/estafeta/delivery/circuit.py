"""The circuit breaker of one destination: pure functions of its state, a policy and the time.

When a destination is down, sending it every due delivery only burns attempts (each one
brings the delivery closer to the dead-letter queue) and hammers a system that is trying to
recover. The breaker notices a run of failures, stops sending for `reset_s`, then lets one
probe through; the probe's result decides whether deliveries flow again.

              failures ≥ threshold (or failure ratio ≥ threshold)
    closed ──────────────────────────────────────────────────────► open
      ▲                                                         │    ▲
      │ probe succeeds                     reset_s have passed: │    │ probe fails
      │                                     admit() → PROBE     ▼    │
      └──────────────────────────────────────────────────── half_open
                  (a probe silent for probe_timeout_s is forgotten; the next admit probes again;
                   a probe that said nothing — `give_back` — is forgotten at once)

Nothing here does I/O or reads a clock: the state is a frozen `Circuit` value shared between
processes by a `CircuitStateStore` (circuit_store.py), and every function takes `now_ms`.
A store's read-modify-write may run the change more than once (optimistic retries), which is
safe because the functions are pure.

How a worker uses them, per destination:

1. Skip what is blocked: `blocked_until(circuit, policy, now)` is the Unix ms before which
   no delivery may be attempted (None: go). A snapshot from `store.get_all()` is enough to
   pick work; postpone blocked deliveries without counting an attempt.
2. Ask before sending: `before, after = await store.update(d, lambda c: admit(c, p, now)[1])`
   and then `admission, _ = admit(before, p, now)` — the same pure call gives the same answer,
   so the store's API needs no side channel. REJECT: don't send (another process holds the
   probe, or the circuit just opened). ALLOW or PROBE: send.
3. Report the result: `await store.update(d, lambda c: record(c, p, success=…, now_ms=end,
   started_at_ms=start))`; or, for a result that says nothing of the destination's health (a
   429, a permanent 4xx) or a probe not sent after all, `give_back(c, started_at_ms=start)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any


class CircuitState(StrEnum):
    CLOSED = "closed"  # deliveries flow
    OPEN = "open"  # nothing is sent until opened_at + reset_s
    HALF_OPEN = "half_open"  # one probe is out; everything else waits for its result


class Admission(StrEnum):
    ALLOW = "allow"  # send: the circuit is closed
    PROBE = "probe"  # send: this is the one trial request of a half-open circuit
    REJECT = "reject"  # do not send now; `blocked_until` says until when


@dataclass(frozen=True, slots=True)
class CircuitPolicy:
    """When a destination's circuit opens and how long it stays open (from its config)."""

    failures: int = 5  # consecutive failures that open the circuit
    reset_s: float = 30.0  # open → half-open after this long
    # Alternatively: open when failures/requests in the window ≥ ratio, once the window saw at
    # least `min_requests`; a flaky destination that fails every other request never makes a
    # run of 5 consecutive failures but is still worth backing off from.
    failure_ratio: float | None = None
    window_s: float = 60.0
    min_requests: int = 10
    # A probe whose worker died never reports back; without this the circuit would stay
    # half-open forever.
    probe_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError(f"circuit failures must be at least 1, not {self.failures}")
        for name in ("reset_s", "window_s", "probe_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"circuit {name} must be a finite number ≥ 0, not {value}")
        if self.window_s == 0 or self.probe_timeout_s == 0:
            raise ValueError("circuit window_s and probe_timeout_s must be greater than 0")
        if self.failure_ratio is not None and not (0 < self.failure_ratio <= 1):
            raise ValueError(f"circuit failure_ratio must be in (0, 1], not {self.failure_ratio}")
        if self.min_requests < 1:
            raise ValueError(f"circuit min_requests must be at least 1, not {self.min_requests}")


@dataclass(frozen=True, slots=True)
class Circuit:
    """The shared state of one destination's circuit; `Circuit()` is a healthy one.

    Invariants (kept by `admit` and `record`): OPEN has `opened_at` and no probe; HALF_OPEN
    has both; CLOSED has neither. The window counters are kept only in ratio mode, so in the
    default consecutive mode a healthy destination's circuit stays equal to `Circuit()` and a
    success changes nothing (a store then has nothing to write).
    """

    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    window_started_at: int = 0  # Unix ms
    window_requests: int = 0
    window_failures: int = 0
    opened_at: int | None = None  # Unix ms when it last opened
    probe_started_at: int | None = None  # Unix ms when the current probe was admitted

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "window_started_at": self.window_started_at,
            "window_requests": self.window_requests,
            "window_failures": self.window_failures,
            "opened_at": self.opened_at,
            "probe_started_at": self.probe_started_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Circuit:
        """Read `to_dict`'s output; missing keys take their defaults (older writers).

        Raises ValueError or TypeError for values of the wrong kind.
        """

        def optional(key: str) -> int | None:
            value = d.get(key)
            return None if value is None else int(value)

        return cls(
            state=CircuitState(d.get("state", CircuitState.CLOSED)),
            consecutive_failures=int(d.get("consecutive_failures", 0)),
            window_started_at=int(d.get("window_started_at", 0)),
            window_requests=int(d.get("window_requests", 0)),
            window_failures=int(d.get("window_failures", 0)),
            opened_at=optional("opened_at"),
            probe_started_at=optional("probe_started_at"),
        )


def admit(circuit: Circuit, policy: CircuitPolicy, now_ms: int) -> tuple[Admission, Circuit]:
    """Whether a delivery may be sent now, and the circuit after asking.

    Only the OPEN → HALF_OPEN edge (and a new probe after a silent one) changes the circuit;
    because the store applies this atomically, exactly one caller gets PROBE.
    """
    if circuit.state is CircuitState.CLOSED:
        return Admission.ALLOW, circuit
    if blocked_until(circuit, policy, now_ms) is not None:
        return Admission.REJECT, circuit
    opened_at = circuit.opened_at if circuit.opened_at is not None else now_ms
    probing = replace(
        circuit, state=CircuitState.HALF_OPEN, opened_at=opened_at, probe_started_at=now_ms
    )
    return Admission.PROBE, probing


def record(
    circuit: Circuit,
    policy: CircuitPolicy,
    *,
    success: bool,
    now_ms: int,
    started_at_ms: int | None = None,
) -> Circuit:
    """The circuit after a send finished with `success`.

    `started_at_ms`, when given, is when that send was admitted: in HALF_OPEN a result from a
    send that began before the current probe (a slow send from before the circuit opened, or a
    probe already given up on) is late and, like any result while OPEN, only moves counters.
    Without it every result in HALF_OPEN is taken as the probe's.
    """
    counted = _count(circuit, policy, success=success, now_ms=now_ms)
    if circuit.state is CircuitState.OPEN:
        return counted  # nothing was admitted while open: this send began before it opened
    if circuit.state is CircuitState.HALF_OPEN:
        if _before_probe(circuit, started_at_ms):
            return counted
        return Circuit() if success else _open(counted, now_ms)
    if not success and _should_open(counted, policy):
        return _open(counted, now_ms)
    return counted


def give_back(circuit: Circuit, *, started_at_ms: int | None = None) -> Circuit:
    """The circuit after its probe told nothing of the destination's health: the destination
    answered with a 429 or a permanent 4xx (reachable, but neither well nor failing), or the
    probe was not sent after all (nothing due, the rate limit held it back).

    The probe is forgotten at once, as a silent one is after `probe_timeout_s`: OPEN again
    with its `opened_at`, so `reset_s` has passed and the next `admit` probes. A send that
    began before the current probe (`started_at_ms`, as for `record`) is not it: no change.
    """
    if circuit.state is not CircuitState.HALF_OPEN or _before_probe(circuit, started_at_ms):
        return circuit
    return replace(circuit, state=CircuitState.OPEN, probe_started_at=None)


def _before_probe(circuit: Circuit, started_at_ms: int | None) -> bool:
    """Whether a send admitted at `started_at_ms` began before the current probe."""
    probe = circuit.probe_started_at
    return started_at_ms is not None and probe is not None and started_at_ms < probe


def blocked_until(circuit: Circuit, policy: CircuitPolicy, now_ms: int) -> int | None:
    """Unix ms before which no delivery to the destination may be attempted.

    None when the circuit is closed, or when `admit` would now hand out a probe. For a
    half-open circuit with a probe out, the answer is when that probe would be forgotten: the
    earliest moment anything else can happen without its result. `admit` answers REJECT
    exactly when this is not None.
    """
    if circuit.state is CircuitState.OPEN and circuit.opened_at is not None:
        until = circuit.opened_at + _ms(policy.reset_s)
    elif circuit.state is CircuitState.HALF_OPEN and circuit.probe_started_at is not None:
        until = circuit.probe_started_at + _ms(policy.probe_timeout_s)
    else:
        return None
    return until if now_ms < until else None


def _count(circuit: Circuit, policy: CircuitPolicy, *, success: bool, now_ms: int) -> Circuit:
    """The counters after one more result, in any state."""
    consecutive = 0 if success else circuit.consecutive_failures + 1
    if policy.failure_ratio is None:
        return replace(circuit, consecutive_failures=consecutive)
    started, requests, failures = (
        circuit.window_started_at,
        circuit.window_requests,
        circuit.window_failures,
    )
    # Tumbling windows, the first starting with the first result; `abs` also restarts a window
    # stamped far in the future by a process whose clock was wrong, instead of counting into
    # it until that clock's time comes.
    if requests == 0 or abs(now_ms - started) >= _ms(policy.window_s):
        started, requests, failures = now_ms, 0, 0
    return replace(
        circuit,
        consecutive_failures=consecutive,
        window_started_at=started,
        window_requests=requests + 1,
        window_failures=failures + (0 if success else 1),
    )


def _should_open(circuit: Circuit, policy: CircuitPolicy) -> bool:
    if circuit.consecutive_failures >= policy.failures:
        return True
    ratio = policy.failure_ratio
    return (
        ratio is not None
        and circuit.window_requests >= policy.min_requests
        and circuit.window_failures / circuit.window_requests >= ratio
    )


def _open(circuit: Circuit, now_ms: int) -> Circuit:
    return replace(circuit, state=CircuitState.OPEN, opened_at=now_ms, probe_started_at=None)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)

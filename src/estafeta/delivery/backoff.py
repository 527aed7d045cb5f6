"""How long to wait before the next attempt: exponential backoff with a cap and jitter.

Pure arithmetic: the caller passes the attempt count and a random number, so the function is
deterministic and table-testable, and the worker owns the source of randomness. Jitter
(±20 % by default, as svix does) spreads the retries of many deliveries that failed together
(a destination that was down) so that they do not come back as one thundering herd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """A destination's retry schedule: `base_s * factor**(attempt-1)`, capped at `max_s`.

    The defaults wait 1 s, 2 s, 4 s … and never more than an hour between two attempts.
    """

    base_s: float = 1.0
    factor: float = 2.0
    max_s: float = 3600.0
    jitter: float = 0.2  # fraction of the delay: 0.2 → the delay is scaled by [0.8, 1.2)

    def __post_init__(self) -> None:
        # Checked here as well as in the config so that a policy built in code cannot make
        # the delay negative or shrink with the attempt number.
        if not (math.isfinite(self.base_s) and self.base_s >= 0):
            raise ValueError(f"backoff base_s must be a finite number ≥ 0, not {self.base_s}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"backoff factor must be a finite number ≥ 1, not {self.factor}")
        if not (math.isfinite(self.max_s) and self.max_s >= 0):
            raise ValueError(f"backoff max_s must be a finite number ≥ 0, not {self.max_s}")
        if not (0 <= self.jitter <= 1):
            raise ValueError(f"backoff jitter must be within [0, 1], not {self.jitter}")


DEFAULT_BACKOFF = BackoffPolicy()  # for deliveries whose destination names no backoff


def backoff_delay_s(policy: BackoffPolicy, attempt: int, rand: float) -> float:
    """The delay in seconds after `attempt` attempts (≥ 1) have been made, within [0, max_s].

    `rand` ∈ [0, 1) picks the jitter: 0.5 means none, 0 the shortest, → 1 the longest.
    At the cap, jitter can only shorten the delay, so `max_s` is a true maximum.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts attempts made so far and starts at 1, not {attempt}")
    if not (0 <= rand <= 1):
        raise ValueError(f"rand must be within [0, 1), not {rand}")
    raw = _uncapped_or_cap(policy, attempt - 1)
    scale = 1.0 + policy.jitter * (2.0 * rand - 1.0)
    return min(policy.max_s, max(0.0, raw * scale))


def _uncapped_or_cap(policy: BackoffPolicy, exponent: int) -> float:
    """`min(max_s, base_s * factor**exponent)` without overflowing for huge exponents."""
    if policy.base_s == 0:
        return 0.0
    try:
        grown = policy.base_s * math.pow(policy.factor, exponent)
    except OverflowError:  # factor**exponent beyond a float: long past the cap
        return policy.max_s
    return min(policy.max_s, grown)  # base_s * a huge float may be inf; min() handles it

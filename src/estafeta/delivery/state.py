"""The delivery state machine, named once (docs/state_machine.md draws it).

            lease                 success
 pending ─────────► in_flight ─────────────► succeeded
   ▲  ▲                │ failure, attempts left
   │  └────────────────┘
   │                   │ failure, no attempts left / permanent error
   │ replay            ▼
   └────────────────  dead ──► discarded (by an operator)

The same strings are the values of the `deliveries.state` column (with a CHECK constraint).
"""

from __future__ import annotations

from enum import StrEnum


class DeliveryState(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    DISCARDED = "discarded"


# The states a delivery waits in, or waits for an operator in: what the queue's depth counts
# (/metrics, /health/detailed). The others are history, which only grows.
QUEUE_STATES = (DeliveryState.PENDING, DeliveryState.IN_FLIGHT, DeliveryState.DEAD)

# Every edge of the machine. The store's guarded updates only ever take these (each names
# the state it leaves in its WHERE clause); tests/unit/test_decision.py checks decide().
ALLOWED_TRANSITIONS: frozenset[tuple[DeliveryState, DeliveryState]] = frozenset(
    {
        (DeliveryState.PENDING, DeliveryState.IN_FLIGHT),  # lease
        (DeliveryState.IN_FLIGHT, DeliveryState.SUCCEEDED),  # success
        (DeliveryState.IN_FLIGHT, DeliveryState.PENDING),  # retry, released or expired lease
        (DeliveryState.IN_FLIGHT, DeliveryState.DEAD),  # out of attempts / permanent error
        (DeliveryState.DEAD, DeliveryState.PENDING),  # replay
        (DeliveryState.DEAD, DeliveryState.DISCARDED),  # discard
    }
)

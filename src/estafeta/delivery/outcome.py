"""What one delivery attempt came to, as a value (never a control-flow exception)."""

from __future__ import annotations

from enum import StrEnum

from estafeta.record import Record

EXCERPT_LIMIT = 1024  # characters of a response body kept with an attempt

# The error class of a send this process could not even open a connection for, out of its
# own resources (descriptors: a flood of client connections took them all): the destination
# was never reached. Named apart from `connection_error`, which says the destination is down
# or unreachable, so that an operator looks at the right machine. Retried with backoff, but
# neither counted by the destination's circuit (breakers.py) nor dead-lettered when it takes
# the last of `max_attempts` (decision.py): it is not the destination's failure.
LOCAL_RESOURCES = "local_resources"
# The error class of a failed TLS handshake: the destination's certificate expired, is not
# trusted or names another host, or it refused ours. Named apart from `connection_error` (the
# excerpt says which, `connectors/tls.py`): the destination is up, and waiting will not help
# until someone mends a certificate or the destination's TLS settings. Retried all the same,
# with backoff (a renewed certificate mends it without a restart), and counted by the circuit.
TLS_ERROR = "tls_error"


class OutcomeKind(StrEnum):
    SUCCESS = "success"
    RETRYABLE = "retryable"  # 408/409/425/429, 5xx, 3xx, timeouts, connection and TLS errors
    PERMANENT = "permanent"  # other 4xx, invalid destination: straight to the DLQ


class Outcome(Record, frozen=True):
    kind: OutcomeKind
    duration_ms: float
    status_code: int | None = None
    # A short stable name for the failure: "http_500", "timeout", "connection_error",
    # "lease_expired", "invalid_destination" ...; None on success.
    error_class: str | None = None
    retry_after_s: float | None = None  # from a Retry-After header, when the destination sent one
    response_excerpt: str = ""  # at most EXCERPT_LIMIT characters
    # The id the destination gave what we sent, when it gives one (a WhatsApp provider's
    # message id): later status webhooks name it.
    external_id: str | None = None
    # A second id the destination gave it, that some of its status webhooks name instead
    # (Z-API's `zaapId`, next to its `messageId`).
    external_alt_id: str | None = None
    # The destination asked us to slow down with something other than HTTP 429 — a provider's
    # rate-limit code on a 400 (Meta's 131056, Twilio's 63018 …) — or with a 429. Like a 429,
    # it is not a failure of the destination (circuits) and waits at least the 429 floor.
    throttled: bool = False

    @property
    def slow_down(self) -> bool:
        """HTTP 429, or a provider's rate-limit answer on any status."""
        return self.throttled or self.status_code == 429

    @property
    def succeeded(self) -> bool:
        return self.kind is OutcomeKind.SUCCESS

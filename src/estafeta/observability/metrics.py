"""Prometheus metrics (`GET /metrics`).

Two kinds, on purpose:

* counters and histograms of what this process did (events accepted, attempts by outcome,
  circuit transitions), the usual per-process Prometheus model: scrape every process;
* gauges of shared state (queue depth by state, each circuit's state, the spool), read
  from the store/Redis when scraped, so any one `serve` process reports the whole hub.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    generate_latest,
)

from estafeta.delivery.circuit import Circuit, CircuitState
from estafeta.delivery.circuit_store import current_circuits, every_circuit
from estafeta.delivery.state import QUEUE_STATES
from estafeta.errors import StoreUnavailable
from estafeta.observability.reads import within

if TYPE_CHECKING:
    from estafeta.delivery.circuit_store import CircuitStateStore
    from estafeta.ingress.spool import Spool, SpoolStats
    from estafeta.store.records import QueueStats
    from estafeta.store.sqlstore import SqlStore

T = TypeVar("T")

REGISTRY = CollectorRegistry()

EVENTS_ACCEPTED = Counter(
    "estafeta_events_accepted_total",
    "Events accepted (committed or spooled), by source and outcome.",
    ["source", "outcome"],  # outcome: stored | duplicate | spooled
    registry=REGISTRY,
)
EVENTS_UNROUTED = Counter(
    "estafeta_events_unrouted_total",
    "Events accepted that match no route (stored, sent to no destination), by source and"
    ' type; past 200 kinds (tenant, source and type), under type "other".',
    ["source", "type"],
    registry=REGISTRY,
)
INGEST_REFUSED = Counter(
    "estafeta_ingest_refused_total",
    "Webhooks (POST/GET /in/{source}) refused, by source and error code; an unknown source"
    ' is counted under source "".',
    ["source", "error"],
    registry=REGISTRY,
)
API_ERRORS = Counter(
    "estafeta_api_errors_total",
    "API requests (every path but /in/{source}) answered with an error, by status and error"
    " code: a run of invalid_api_key is a revoked or mistyped key still in use.",
    ["status", "error"],
    registry=REGISTRY,
)
ATTEMPTS = Counter(
    "estafeta_delivery_attempts_total",
    "Delivery attempts, by destination and outcome (success, retryable, permanent).",
    ["destination", "outcome"],
    registry=REGISTRY,
)
ATTEMPT_SECONDS = Histogram(
    "estafeta_delivery_attempt_seconds",
    "How long one delivery attempt took.",
    ["destination"],
    # Up to the longest attempt `worker.max_attempt_s` allows (600 s): a slow destination's
    # attempts are told apart, not all counted in +Inf.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
CIRCUIT_TRANSITIONS = Counter(
    "estafeta_circuit_transitions_total",
    "Circuit breaker transitions seen by this process, by destination and new state.",
    ["destination", "state"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "estafeta_deliveries_dead_lettered_total",
    "Deliveries moved to the dead-letter queue by this process.",
    ["destination"],
    registry=REGISTRY,
)
LEASE_RACES = Counter(
    "estafeta_lease_races_total",
    "Leases of this process that took nothing: another worker's lease had taken one of the"
    " same ordering keys at the same moment (it leases again at once).",
    registry=REGISTRY,
)
TASK_CRASHES = Counter(
    "estafeta_task_crashes_total",
    "Crashes of this process's background tasks (worker, spool-drainer, alert-monitor,"
    " presence), each restarted after a pause; `task_crashed` in the log has the traceback.",
    ["task"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "estafeta_deliveries",
    "Deliveries waiting (pending, in_flight) or dead, by state (read from the store when scraped).",
    ["state"],
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "estafeta_circuit_state",
    "Each destination's circuit: 0 closed, 1 half-open, 2 open (shared state, when scraped).",
    ["destination"],
    registry=REGISTRY,
)
SPOOL_BYTES = Gauge(
    "estafeta_spool_bytes", "Bytes of events waiting in this process's spool.", registry=REGISTRY
)
SPOOL_SEGMENTS = Gauge(
    "estafeta_spool_segments", "Spool segments waiting to be drained.", registry=REGISTRY
)
SPOOL_QUARANTINED = Counter(
    "estafeta_spool_quarantined_total",
    "Spooled events the store refused, moved to the spool's quarantine/ by this process.",
    registry=REGISTRY,
)
ALERTS = Gauge(
    "estafeta_alert_firing",
    "1 while an alert is firing (queue_backlog …), else 0.",
    ["alert"],
    registry=REGISTRY,
)

# The labelled series counted on every event and every attempt, by their label values.
# prometheus-client validates the values and takes a lock on each `labels()` call (~1.5 µs);
# the values are configured ids and outcome names, so this stays small. Not for metrics
# that are ever `clear()`ed: a cleared series would keep counting here, unexported.
_SERIES: dict[tuple[object, tuple[str, ...]], Any] = {}


def series(metric: Counter | Histogram, *values: str) -> Any:
    """`metric.labels(*values)`, looked up once."""
    key = (metric, values)
    found = _SERIES.get(key)
    if found is None:
        found = _SERIES[key] = metric.labels(*values)
    return found


_CIRCUIT_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


async def render(
    store: SqlStore,
    circuits: CircuitStateStore | None,
    spool: Spool | None,
    destinations: Sequence[str] = (),
    *,
    delivers: bool = True,
) -> tuple[bytes, str]:
    """The exposition text, with the shared-state gauges read now; each of `destinations`
    has a circuit series, closed when none is on record (stores keep only unhealthy ones).

    A gauge the store (or Redis) could not tell within READ_TIMEOUT_S is left out rather than
    stale or failing the scrape: during a store outage the counters and the spool gauges are
    what the operator needs to see. So are the circuits of a process that does not deliver
    during a Redis outage (`current_circuits`): its copy of them is frozen."""
    stats, known, spooled = await asyncio.gather(
        _told(store.queue_stats()),
        _told(current_circuits(circuits, delivers=delivers))
        if circuits is not None
        else _told(_nothing()),
        spool.listed() if spool is not None else _no_spool(),
    )
    if known is not None:
        known = every_circuit(known, destinations)
    return await asyncio.get_running_loop().run_in_executor(
        _RENDERER, _set_and_render, stats, known, spooled
    )


# Rendering a hub of many destinations takes a few hundred ms (mostly the attempt-duration
# histogram); in a thread, the event loop keeps accepting webhooks and delivering meanwhile.
# A thread of its own: the default executor's can all be held by a hung spool disk, which
# must not hold the scrape that shows it. One render at a time: two would not share the CPU
# better, and each scrape's gauges stay as it set them until its text is written.
_RENDERER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-render")


def _set_and_render(
    stats: QueueStats | None, known: dict[str, Circuit] | None, spooled: SpoolStats | None
) -> tuple[bytes, str]:
    """The shared-state gauges set to what was read, and the exposition text (in _RENDERER)."""
    QUEUE_DEPTH.clear()
    if stats is not None:
        for state in QUEUE_STATES:
            QUEUE_DEPTH.labels(state.value).set(stats.by_state.get(state.value, 0))
    CIRCUIT_STATE.clear()
    for destination_id, circuit in (known or {}).items():
        CIRCUIT_STATE.labels(destination_id).set(_CIRCUIT_VALUES[circuit.state])
    if spooled is not None:
        SPOOL_BYTES.set(spooled.bytes)
        SPOOL_SEGMENTS.set(spooled.segments)
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# What a worker counts, all that its own /metrics shows (docs/operations.md): the hub-wide
# gauges `serve` reads from the store when scraped would be counted once per process, and the
# ingest and API families (and the spool's) are never counted by a worker; shown empty, or at
# 0 for a spool it does not have, they listed the worker among their targets.
_WORKERS_OWN = {
    metric._name
    for metric in (
        ATTEMPTS,
        ATTEMPT_SECONDS,
        CIRCUIT_TRANSITIONS,
        DEAD_LETTERED,
        LEASE_RACES,
        TASK_CRASHES,
    )
}


class _ThisProcess:
    """The registry's metrics that a worker counts, and only those."""

    def collect(self) -> Iterator[Metric]:
        return (family for family in REGISTRY.collect() if family.name in _WORKERS_OWN)


async def render_this_process() -> tuple[bytes, str]:
    """The exposition text of what this worker process counted (a worker's endpoint),
    rendered off the event loop as `render` is."""
    body = await asyncio.get_running_loop().run_in_executor(
        _RENDERER, generate_latest, _ThisProcess()
    )
    return body, CONTENT_TYPE_LATEST


async def _told(read: Awaitable[T]) -> T | None:
    """What a read of shared state said, or None when it could not tell in time."""
    try:
        return await within(read)
    except (StoreUnavailable, TimeoutError):
        return None


async def _no_spool() -> None:
    return None


async def _nothing() -> dict[str, Circuit]:
    return {}

"""`GET /health` (liveness, anyone) and `GET /health/detailed` (admin)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response

from estafeta import __version__
from estafeta.api.auth import Principal
from estafeta.api.deps import admin_principal, hub_of
from estafeta.api.responses import json_response
from estafeta.clock import iso_from_ms
from estafeta.delivery.circuit_store import current_circuits, every_circuit
from estafeta.delivery.presence import LIVE_WINDOW_S, named_destinations
from estafeta.delivery.state import QUEUE_STATES
from estafeta.errors import StoreUnavailable
from estafeta.observability.metrics import render
from estafeta.observability.reads import redis_unwritable, within
from estafeta.observability.spool_watch import SpoolHealth, judged

if TYPE_CHECKING:
    from estafeta.delivery.circuit_store import CircuitStateStore
    from estafeta.store.records import QueueStats
    from estafeta.store.sqlstore import SqlStore
    from estafeta.supervise import Tasks

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> Response:
    """200 while the process serves: the liveness probe (HEAD too, as load balancers and
    uptime monitors often probe: app.py answers HEAD as GET on every path)."""
    return json_response({"status": "ok", "version": __version__})


@router.get("/health/detailed")
async def health_detailed(
    request: Request, _caller: Annotated[Principal, Depends(admin_principal)]
) -> Response:
    hub = hub_of(request)
    spool = hub.spool
    # At once, each within READ_TIMEOUT_S: a hung store, Redis or disk must not hold the answer.
    (store, queue), processes, circuits, redis_state, unwritable, listed = await asyncio.gather(
        store_check(hub.store),
        processes_check(hub.store, hub.clock.now_ms()),
        circuits_check(
            hub.circuit_states,
            named_destinations(hub.config),
            delivers=this_process_delivers(request),
        ),
        redis_check(hub.redis, hub.config.redis.key_prefix) if hub.redis is not None else _absent(),
        spool.unwritable() if spool is not None else _absent(),
        spool.listed() if spool is not None else _absent(),
    )
    checks: dict[str, object] = {"store": store}
    if queue is not None:
        checks["queue"] = queue
    if processes is not None:
        checks["processes"] = processes
    checks["circuits"] = circuits
    if redis_state is not None:
        checks["redis"] = redis_state
    monitor = getattr(request.app.state, "monitor", None)
    if monitor is not None:
        checks["alerts"] = {"firing": sorted(monitor.firing)}
    tasks: Tasks | None = getattr(request.app.state, "tasks", None)
    crashed = tasks.crashed_now() if tasks is not None else []
    # A crashed background task (its worker, the spool's drainer) is restarted after a pause;
    # meanwhile the process still accepts webhooks, so it degrades the answer, not a 503.
    checks["tasks"] = {"status": "down", "crashed": crashed} if crashed else {"status": "ok"}
    # Only a store that cannot be reached, or cannot write (its disk full), makes this a 503:
    # without Redis the hub carries on, and a spool that cannot be written or does not drain
    # is for the operator to hear of.
    healthy = store["status"] == "ok"
    degraded = (
        not healthy or (redis_state is not None and redis_state["status"] != "ok") or bool(crashed)
    )
    if spool is not None:
        assert listed is not None  # noqa: S101 - listed when there is a spool
        # A store that reads but cannot write answers the drain: as the alerts judge it.
        reachable = store["status"] != "unavailable"
        state = judged(
            spool,
            listed,
            unwritable=unwritable,
            store_reachable=reachable,
            now_ms=hub.clock.now_ms(),
        )
        checks["spool"] = spool_json(state, spool.max_bytes)
        degraded = degraded or state.degraded
    status = "degraded" if degraded else "ok"
    return json_response({"status": status, "checks": checks}, 200 if healthy else 503)


def spool_json(state: SpoolHealth, max_bytes: int) -> dict[str, object]:
    spooled = state.stats
    body: dict[str, object] = {
        "status": state.status.value,
        "bytes": spooled.bytes,
        "segments": spooled.segments,
        "oldest_at": iso_from_ms(spooled.oldest_at) if spooled.oldest_at else None,
        "waiting_s": None if state.waiting_s is None else round(state.waiting_s, 1),
        "stalled": state.stalled,
        "max_bytes": max_bytes,
    }
    if state.error is not None:
        body["error"] = state.error
    return body


async def store_check(store: SqlStore) -> tuple[dict[str, str], dict[str, object] | None]:
    """The store's state, and the queue's when the store answers: `full` when it answers
    reads but this process's last write failed for want of disk space."""

    async def read() -> QueueStats:
        await store.ping()
        return await store.queue_stats()

    try:
        stats = await within(read())
    except StoreUnavailable as exc:
        return {"status": "unavailable", "error": str(exc)}, None
    except TimeoutError as exc:
        return {"status": "unavailable", "error": f"the store gave {exc}"}, None
    queue: dict[str, object] = {
        # The queue's states, 0 included: an empty queue is a depth of 0, not a missing one.
        # Not the history (succeeded, discarded): counting it walks every delivery kept.
        "by_state": {s.value: stats.by_state.get(s.value, 0) for s in QUEUE_STATES},
        # Those counted past the store's bound: an estimate (PostgreSQL) or a floor (SQLite).
        "estimated": sorted(stats.estimated),
        # the earliest due time among pending deliveries (retries scheduled later included)
        "next_due_at": iso_from_ms(stats.oldest_pending_at)
        if stats.oldest_pending_at is not None
        else None,
    }
    if store.disk_full_error is not None:
        return {"status": "full", "engine": store.dialect, "error": store.disk_full_error}, queue
    return {"status": "ok", "engine": store.dialect}, queue


async def processes_check(store: SqlStore, now_ms: int) -> list[dict[str, object]] | None:
    """The running processes and the destinations each one's configuration names (a rolling
    change shows as processes that differ); None when the store does not answer."""
    try:
        live = await within(store.live_processes(seen_since_ms=now_ms - int(LIVE_WINDOW_S * 1000)))
    except (StoreUnavailable, TimeoutError):
        return None
    return [
        {
            "id": p.id,
            "started_at": iso_from_ms(p.started_at),
            "seen_at": iso_from_ms(p.seen_at),
            "destinations": p.destinations,
            "delivers": p.delivers,
            # when its delivery task last ran steadily (null: it never did, or delivers not)
            "delivering_at": iso_from_ms(p.delivering_at) if p.delivering_at else None,
        }
        for p in live
    ]


async def circuits_check(
    circuits: CircuitStateStore, destinations: Sequence[str], *, delivers: bool
) -> dict[str, object]:
    """Each destination's circuit: those this process's configuration names (closed when
    none is on record: a store keeps only circuits that are not healthy), and any other on
    record (a destination named by another process's configuration)."""
    try:
        known = await within(current_circuits(circuits, delivers=delivers))
    except (StoreUnavailable, TimeoutError):
        return {"status": "unavailable"}
    if known is None:
        return {"status": "unavailable", "error": FROZEN_CIRCUITS}
    known = every_circuit(known, destinations)
    return {
        destination_id: {
            "state": c.state.value,
            "consecutive_failures": c.consecutive_failures,
            "opened_at": iso_from_ms(c.opened_at) if c.opened_at else None,
        }
        for destination_id, c in sorted(known.items())
    }


async def redis_check(client: Redis, key_prefix: str) -> dict[str, str]:
    """Whether the shared Redis takes a write (a PING passes a full or read-only Redis)."""
    trouble = await redis_unwritable(client, key_prefix)
    if trouble is not None:
        error, reason = trouble
        return {
            "status": "unavailable",
            "error": error,
            "reason": reason,
            "effect": "circuits and rate limits are kept per process until it is back",
        }
    return {"status": "ok"}


FROZEN_CIRCUITS = (
    "Redis is unreachable and this process does not deliver: it has no current view of the"
    " circuits (a process that delivers has its own)"
)


def this_process_delivers(request: Request) -> bool:
    """Whether this process's own workers deliver (`serve` without `--no-workers`)."""
    return bool(request.app.state.delivers)  # set by create_app


async def _absent() -> None:
    return None


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format, for the scraper."""
    hub = hub_of(request)
    body, content_type = await render(
        hub.store,
        hub.circuit_states,
        hub.spool,
        named_destinations(hub.config),
        delivers=this_process_delivers(request),
    )
    return Response(body, media_type=content_type)

"""`GET /health` (liveness, anyone) and `GET /health/detailed` (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from estafeta import __version__
from estafeta.api.auth import Principal
from estafeta.api.deps import admin_principal, hub_of
from estafeta.api.responses import json_response
from estafeta.clock import iso_from_ms
from estafeta.errors import StoreUnavailable
from estafeta.observability.metrics import render

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> Response:
    """200 while the process serves: the liveness probe."""
    return json_response({"status": "ok", "version": __version__})


@router.get("/health/detailed")
async def health_detailed(
    request: Request, _caller: Annotated[Principal, Depends(admin_principal)]
) -> Response:
    hub = hub_of(request)
    checks: dict[str, object] = {}
    healthy = True
    try:
        await hub.store.ping()
        stats = await hub.store.queue_stats()
        checks["store"] = {"status": "ok", "engine": hub.store.dialect}
        checks["queue"] = {
            "by_state": stats.by_state,
            # the earliest due time among pending deliveries (retries scheduled later included)
            "next_due_at": iso_from_ms(stats.oldest_pending_at)
            if stats.oldest_pending_at is not None
            else None,
        }
    except StoreUnavailable as exc:
        healthy = False
        checks["store"] = {"status": "unavailable", "error": str(exc)}
    try:
        circuits = await hub.circuit_states.get_all()
        checks["circuits"] = {
            destination_id: {
                "state": c.state.value,
                "consecutive_failures": c.consecutive_failures,
                "opened_at": iso_from_ms(c.opened_at) if c.opened_at else None,
            }
            for destination_id, c in sorted(circuits.items())
        }
    except StoreUnavailable:
        checks["circuits"] = {"status": "unavailable"}
    healthy_redis = True
    if hub.redis is not None:
        redis_state = await redis_check(hub.redis)
        checks["redis"] = redis_state
        healthy_redis = redis_state["status"] == "ok"
    monitor = getattr(request.app.state, "monitor", None)
    if monitor is not None:
        checks["alerts"] = {"firing": sorted(monitor.firing)}
    if hub.spool is not None:
        spooled = hub.spool.stats()
        checks["spool"] = {
            "bytes": spooled.bytes,
            "segments": spooled.segments,
            "oldest_at": iso_from_ms(spooled.oldest_at) if spooled.oldest_at else None,
            "max_bytes": hub.spool.max_bytes,
        }
    # Only a store that cannot be reached makes this a 503: without Redis the hub carries on.
    status = "ok" if healthy and healthy_redis else "degraded"
    return json_response({"status": status, "checks": checks}, 200 if healthy else 503)


async def redis_check(client: Redis) -> dict[str, str]:
    """Whether the shared Redis answers a PING (the client fails within about 2 s)."""
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return {
            "status": "unavailable",
            "error": type(exc).__name__,
            "effect": "circuits and rate limits are kept per process until it is back",
        }
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format, for the scraper."""
    hub = hub_of(request)
    body, content_type = await render(hub.store, hub.circuit_states, hub.spool)
    return Response(body, media_type=content_type)

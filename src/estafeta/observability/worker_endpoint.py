"""`estafeta worker`'s own HTTP endpoint (`worker.metrics_listen`): GET /metrics and
GET /health, so a worker running alone can be scraped and probed.

/metrics is this process's counters and histograms (attempts, their durations, circuit
transitions, dead-lettered deliveries, lease races, task crashes). The hub-wide gauges
(deliveries by state, circuit states, the spool) are left out: `serve` reads them from the
store when scraped, and a worker scraped as well would report the same shared numbers once
more; so are the ingest and API counters, which a worker never counts. /health is 200 while every
supervised task runs, 503 naming the ones that crashed and wait to be started again.

aiohttp's server runs in the worker's own event loop, beside its tasks, without taking over
the process's signals (the worker's graceful stop keeps them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from estafeta import __version__
from estafeta.config.models import joined_listen, split_listen
from estafeta.errors import ServeError
from estafeta.observability.metrics import render_this_process
from estafeta.supervise import Tasks

log = structlog.get_logger("estafeta.worker")

_REFUSALS = {
    404: ("not_found", "no such path: this endpoint serves GET /metrics and GET /health"),
    405: ("method_not_allowed", "this path takes GET only"),
}


def endpoint_app(tasks: Tasks) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        body, content_type = await render_this_process()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def health(_request: web.Request) -> web.Response:
        if tasks.down:
            return web.json_response({"status": "down", "crashed": tasks.crashed_now()}, status=503)
        return web.json_response({"status": "ok", "version": __version__})

    app = web.Application(middlewares=[_errors_as_json])
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/health", health, allow_head=False)
    return app


@web.middleware
async def _errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An unknown path or method answered as the API answers errors: {"error", "detail"}."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status not in _REFUSALS:
            raise
        error, detail = _REFUSALS[exc.status]
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(
            {"error": error, "detail": detail}, status=exc.status, headers=headers
        )


async def start_worker_endpoint(listen: str, tasks: Tasks) -> web.AppRunner:
    """Serve /metrics and /health on `listen` (HOST:PORT; port 0: any free one) and log where
    (every address bound); the caller ends it with `cleanup()`."""
    host, port = split_listen(listen)
    runner = web.AppRunner(endpoint_app(tasks), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ServeError(
            f"cannot serve worker.metrics_listen {listen!r}: {exc.strerror or exc}"
        ) from None
    # Each address bound: a name may resolve to two (localhost: 127.0.0.1 and ::1), each on
    # a port of its own when 0 was asked.
    addresses = [joined_listen(*address[:2]) for address in runner.addresses]
    log.info("metrics_listening", listen=addresses[0], addresses=addresses)
    return runner

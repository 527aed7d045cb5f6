"""The HTTP application: the ingest route (plain Starlette, the hot path) and the API.

With `run_workers`, the app's lifespan also runs a delivery worker in the same process, so
one `estafeta serve` is a whole hub on one machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from estafeta import __version__
from estafeta.api import conversations, dlq, events, health, messages
from estafeta.api.auth import Authenticator
from estafeta.api.responses import (
    handle_http_error,
    handle_starlette_error,
    handle_store_unavailable,
    handle_unexpected,
    handle_validation_error,
)
from estafeta.delivery.breakers import Breakers
from estafeta.delivery.worker import Worker
from estafeta.errors import HttpError, StoreUnavailable
from estafeta.hub import Hub
from estafeta.ingress.endpoint import IngestApp, Message, Receive, Scope, Send, respond
from estafeta.ingress.spool import SpoolDrainer
from estafeta.observability.monitor import BacklogMonitor
from estafeta.supervise import supervised


def create_app(hub: Hub, *, run_workers: bool = False) -> Root:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        if run_workers:

            def run_worker() -> Awaitable[None]:
                # One circuit store per process: the worker's is the one health and metrics
                # read, and a Redis outage is noticed (and logged) once.
                worker = Worker(
                    hub.store,
                    hub.config,
                    clock=hub.clock,
                    wake=hub.deliveries_ready,
                    breakers=Breakers(hub.circuit_states, hub.config),
                )
                return worker.run(stop)

            tasks.append(asyncio.create_task(supervised("worker", run_worker, stop), name="worker"))
        monitor = BacklogMonitor(hub.store, threshold=hub.config.worker.alert_queue_depth)
        app.state.monitor = monitor
        tasks.append(
            asyncio.create_task(
                supervised("backlog-monitor", lambda: monitor.run(stop), stop), name="monitor"
            )
        )
        if hub.spool is not None:
            drainer = SpoolDrainer(hub.spool, hub.store)
            tasks.append(
                asyncio.create_task(
                    supervised("spool-drainer", lambda: drainer.run(stop), stop),
                    name="spool-drainer",
                )
            )
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await hub.close()

    app = FastAPI(
        title="estafeta",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.hub = hub
    app.state.auth = Authenticator(hub.store, hub.config.security.admin_key)
    app.add_exception_handler(HttpError, handle_http_error)
    app.add_exception_handler(StoreUnavailable, handle_store_unavailable)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_starlette_error)
    app.add_exception_handler(Exception, handle_unexpected)
    app.include_router(health.router)
    app.include_router(events.router)
    app.include_router(dlq.router)
    app.include_router(messages.router)
    app.include_router(conversations.router)
    return Root(api=app, ingest=IngestApp(hub), max_body_bytes=hub.config.server.max_body_bytes)


class Root:
    """Webhooks (`/in/…`) go straight to the ingest app; everything else to the API."""

    def __init__(self, *, api: FastAPI, ingest: IngestApp, max_body_bytes: int) -> None:
        self.api = api
        self.ingest = ingest
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
        elif scope["path"].startswith("/in/"):
            await self.ingest(scope, receive, send)
        else:
            await self._api_with_body_limit(scope, receive, send)

    async def _api_with_body_limit(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The API under the same body limit as ingest: refused before it is read when the
        length is declared, and as soon as it goes over when it is not."""
        limit = self.max_body_bytes
        headers = dict(scope["headers"])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            await respond(
                send,
                413,
                {"error": "body_too_large", "detail": f"the body is over the {limit}-byte limit"},
            )
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HttpError(413, "body_too_large", f"the body is over the {limit}-byte limit")
            return message

        await self.api(scope, limited, send)

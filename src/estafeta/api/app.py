"""The HTTP application: the ingest route (plain Starlette, the hot path) and the API.

With `run_workers`, the app's lifespan also runs a delivery worker in the same process, so
one `estafeta serve` is a whole hub on one machine.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from estafeta import __version__
from estafeta.api import conversations, dlq, events, health, messages
from estafeta.api.auth import Authenticator
from estafeta.api.responses import (
    count_api_error,
    handle_http_error,
    handle_starlette_error,
    handle_store_error,
    handle_unexpected,
    handle_validation_error,
)
from estafeta.delivery.breakers import Breakers
from estafeta.delivery.presence import DELIVERY_TASK, Presence, named_destinations
from estafeta.delivery.worker import Worker
from estafeta.errors import HttpError, StoreError
from estafeta.http_protocol import CUT_OFF
from estafeta.hub import Hub
from estafeta.ingress.endpoint import (
    IngestApp,
    Message,
    Receive,
    Scope,
    Send,
    check_declared_length,
    compressed_refusal,
    read_body,
    respond,
)
from estafeta.ingress.spool import SpoolDrainer
from estafeta.observability.monitor import AlertMonitor
from estafeta.supervise import Tasks, supervised


def create_app(
    hub: Hub,
    *,
    run_workers: bool = False,
    presence: Presence | None = None,
    tasks: Tasks | None = None,
) -> Root:
    """The application; with `presence`, its lifespan keeps the process's presence recorded
    (`estafeta serve` announces it once before it listens). Its background tasks are
    supervised under `tasks` (the presence's too), which /health/detailed reports."""
    supervising = tasks or Tasks()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        running: list[asyncio.Task[None]] = []

        def start(name: str, run: Callable[[], Awaitable[None]]) -> None:
            running.append(
                asyncio.create_task(supervised(name, run, stop, tasks=supervising), name=name)
            )

        if run_workers:

            def run_worker() -> Awaitable[None]:
                # One circuit store per process: the worker's is the one health and metrics
                # read, and a Redis outage is noticed (and logged) once.
                worker = Worker(
                    hub.store,
                    hub.config,
                    clock=hub.clock,
                    wake=hub.deliveries_ready,
                    handoff=hub.handoff,
                    breakers=Breakers(hub.circuit_states, hub.config),
                    # Logged under the id /health/detailed lists the process by.
                    worker_id=None if presence is None else presence.process_id,
                    started_ms=None if presence is None else presence.started_ms,
                )
                return worker.run(stop)

            start(DELIVERY_TASK, run_worker)
        if presence is not None:
            start("presence", lambda: presence.run(stop))
        monitor = AlertMonitor(
            hub.store,
            threshold=hub.config.worker.alert_queue_depth,
            dead_threshold=hub.config.worker.alert_dead_letters,
            spool=hub.spool,
            circuits=hub.circuit_states,
            destinations=named_destinations(hub.config),
            down_after_s=hub.config.worker.alert_destination_down_s,
            watch_workers=True,  # its own worker may be the one crashing
            no_workers_after_s=hub.config.worker.alert_no_workers_s,
            refusals=hub.refusals,
            refused_after_s=hub.config.worker.alert_webhooks_refused_s,
            store_down_after_s=hub.config.worker.alert_store_down_s,
            redis=hub.redis,
            redis_down_after_s=hub.config.worker.alert_redis_down_s,
            redis_key_prefix=hub.config.redis.key_prefix,
            delivers=run_workers,
            clock=hub.clock,
        )
        app.state.monitor = monitor
        start("alert-monitor", lambda: monitor.run(stop))
        if hub.spool is not None:
            drainer = SpoolDrainer(hub.spool, hub.store)
            start("spool-drainer", lambda: drainer.run(stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*running)
            await hub.close()

    # FastAPI's /docs page loads Swagger UI from a CDN: blank where the operator's browser
    # cannot reach the internet. FastAPIOffline serves the same files from the package.
    app = FastAPIOffline(
        title="estafeta",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        static_url="/docs/assets",
        # A path with a trailing slash is no route: 404 in the error format, not a 307 (with
        # no body, to a URL made from the Host header) that a client may follow elsewhere.
        redirect_slashes=False,
    )
    app.state.hub = hub
    app.state.delivers = run_workers  # what its health and metrics make of a Redis outage
    app.state.tasks = supervising
    app.state.auth = Authenticator(
        hub.store, hub.config.security.admin_key, tenants=[t.id for t in hub.config.tenants]
    )
    app.add_exception_handler(HttpError, handle_http_error)
    app.add_exception_handler(StoreError, handle_store_error)
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
        elif scope["method"] == "HEAD":
            # RFC 9110 §9.1: HEAD wherever GET is taken, answered with the GET's head. A copy
            # of the scope: the server reads the method of its own to write no body.
            await self._guarded_api(dict(scope, method="GET"), receive, _without_body(send))
        else:
            await self._guarded_api(scope, receive, send)

    async def _guarded_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The API behind checks of its own: the body limit ingest has (refused before it is
        read when the length is declared, as soon as it goes over when it is not), no
        compressed body (`compressed_refusal`), and no NUL characters (`nul_refusal`)."""
        limit = self.max_body_bytes
        try:
            headers = dict(scope["headers"])
            declared = headers.get(b"content-length")
            if declared is not None:
                check_declared_length({"content-length": declared.decode("latin-1")}, limit)
            where = nul_in_url(scope)
            if where is not None:
                raise nul_refusal(where)
            # Read whole before the API sees it (bounded by the limit): a refusal raised
            # while FastAPI reads would reach the client as its own generic 400.
            body = await read_body(scope, receive, limit)
            not_utf8 = not_utf8_json(body)
            if not_utf8 is not None:
                coding = headers.get(b"content-encoding")
                raise compressed_refusal(
                    None if coding is None else coding.decode("latin-1")
                ) or HttpError(
                    400, "invalid_text", f"the request's body is not UTF-8 JSON: {not_utf8}"
                )
            if nul_in_json(body):
                raise nul_refusal("body")
            if lone_surrogate_in_json(body):
                raise HttpError(
                    400,
                    "invalid_text",
                    "the request's body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff"
                    " not in a pair), which is no character",
                )
        except HttpError as refusal:
            # Found before FastAPI asks for the key: the key first. Not for a request the
            # server has answered already (a body not valid HTTP): counted as it answered.
            if refusal.status in (400, 415) and CUT_OFF not in scope:
                auth: Authenticator = self.api.state.auth
                refusal = await auth.refusal(Request(scope)) or refusal
            count_api_error(refusal)
            await respond(
                send,
                refusal.status,
                {"error": refusal.error, "detail": refusal.detail},
                refusal.headers,
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only a disconnect can come
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            await self.api(scope, replay, send)
        except Exception:  # already logged and answered
            # Starlette re-raises an unexpected error once `handle_unexpected` has logged it
            # and answered 500, for the server to log too: uvicorn would print its traceback
            # a second time, as plain text, past the log's JSON and redaction processors.
            return


def _without_body(send: Send) -> Send:
    """`send` for a HEAD answered as its GET: the head as written (its `Content-Length` the
    GET's), the body left out."""

    async def head_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return head_only


# A JSON escape for U+0000 that is not itself escaped text (`\\u0000` is the six characters).
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def nul_in_url(scope: Scope) -> str | None:
    """The part of the URL ("path" or "query") that holds a NUL, raw or as %00, if any."""
    path = scope.get("raw_path") or scope["path"].encode()
    for where, raw in (("path", path), ("query", scope.get("query_string", b""))):
        if b"\x00" in raw or b"%00" in raw:
            return where
    return None


def not_utf8_json(body: bytes) -> str | None:
    """What makes a body no UTF-8 JSON, and where, if anything does. JSON travels as UTF-8
    (RFC 8259), and the checks below look for escapes in UTF-8; but the API's parser reads
    UTF-16 and UTF-32 too (it would take a NUL or a lone surrogate past them) and answers
    any other encoding in a format of its own. A NUL byte is no UTF-8 JSON either (no
    JSON text holds one raw): it is how UTF-16 and UTF-32 look without a byte order mark."""
    nul = body.find(b"\x00")
    try:
        body.decode()
    except UnicodeDecodeError as exc:
        if nul == -1 or exc.start < nul:
            return f"a byte that is not UTF-8 at byte {exc.start}"
    return None if nul == -1 else f"a NUL byte at byte {nul}"


def nul_in_json(body: bytes) -> bool:
    """True when a JSON body holds a NUL character in one of its strings."""
    return b"\\u0000" in body and _JSON_NUL.search(body) is not None


_JSON_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate_in_json(body: bytes) -> bool:
    """True when a JSON body holds a `\\ud800`-style escape that is not half of a pair: the
    API's parser reads it into a str that orjson cannot write nor PostgreSQL store. Only a
    body with such an escape is parsed again, by orjson, which refuses exactly these."""
    if _JSON_SURROGATE.search(body) is None:
        return False
    try:
        # A UTF-8 byte order mark, which the API's parser skips, is no JSON to orjson.
        orjson.loads(body.removeprefix(b"\xef\xbb\xbf"))
    except orjson.JSONDecodeError as exc:
        return "surrogate" in str(exc)
    return False


def nul_refusal(where: str) -> HttpError:
    """The API takes no text with U+0000: PostgreSQL cannot store it, and no field needs it.
    Refused the same on both engines, before anything is read or stored."""
    return HttpError(
        400,
        "invalid_text",
        f"the request's {where} holds a NUL character (U+0000), which no field accepts",
    )

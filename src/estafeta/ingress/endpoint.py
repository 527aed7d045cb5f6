"""`/in/{source}`: the ingest hot path, as a plain ASGI application.

It sits in front of the API (see `api/app.py`), so a webhook crosses no framework middleware:
FastAPI's stack and Starlette's Request/Response cost more per request than everything else
on this path together (measured; see bench/). Order matters: the cheap refusals first
(unknown source, method, size), then who is calling, then the tenant's rate limit, then
parsing (content type, JSON, the provider's shape); nothing is stored until all passed, and
the answer is sent only after commit. A verified request counts against the rate limit
even if its body is then refused: parsing is the work the limit protects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from estafeta.config.models import ROUTING_NUMBER_KEYS
from estafeta.errors import HttpError, StoreError, StoreUnavailable
from estafeta.http_protocol import CUT_OFF
from estafeta.ingress.providers import twilio
from estafeta.ingress.providers.base import InboundRequest, first_values, media_type

if TYPE_CHECKING:
    from estafeta.config import SourceConfig
    from estafeta.hub import Hub
    from estafeta.ingress.generic import ParsedEvent
    from estafeta.store.records import InsertResult

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = structlog.get_logger("estafeta.ingress")

_JSON_HEADERS = [(b"content-type", b"application/json")]
# Marks an answer whose events wait in the local spool because the store is unreachable.
SPOOLED = {"X-Estafeta-Spooled": "1"}
# "Reply nothing" in TwiML, what Twilio reads the answer to an incoming message as.
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def twiml_headers(results: Sequence[InsertResult], marks: dict[str, str] | None) -> dict[str, str]:
    """A TwiML answer's headers: the ids (and duplicates) its JSON would have given."""
    headers = {"Content-Type": "text/xml; charset=utf-8", **(marks or {})}
    if results:
        headers["X-Estafeta-Event-Id"] = ", ".join(r.event_id for r in results)
        if all(r.duplicate for r in results):
            headers["X-Estafeta-Duplicate"] = "1"
    return headers


def require_json_type(content_type: str) -> None:
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise HttpError(
            415,
            "unsupported_media_type",
            f"expected Content-Type application/json, got {content_type or 'none'!r}",
        )


# The content codings that compress (RFC 9110 §8.4.1, IANA's registry, and their aliases).
COMPRESSIONS = frozenset({"gzip", "x-gzip", "deflate", "br", "compress", "x-compress", "zstd"})


def compressed_refusal(coding: str | None) -> HttpError | None:
    """The answer to a body refused as unreadable that says it is compressed: bodies are read
    as they come (none is unpacked: a gzip body may grow a thousandfold past
    `max_body_bytes`), and a gzip body was refused for what the compression made of it (`not
    UTF-8 at byte 1`). Asked only once the body is refused: a sender whose header says gzip
    over a body that is not (or names no compression: `Content-Encoding: utf-8`) is read as
    it always was."""
    if coding is None:
        return None
    named = [token.strip().lower() for token in coding.split(",")]
    if not COMPRESSIONS.intersection(named):
        return None
    return HttpError(
        415,
        "unsupported_media_type",
        f"Content-Encoding {coding.strip()!r} is not accepted: send the body uncompressed",
        {"Accept-Encoding": "identity"},  # RFC 9110 §15.5.16: the codings taken
    )


def check_declared_length(headers: dict[str, str], limit: int) -> None:
    declared = headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise HttpError(400, "invalid_request", "Content-Length is not a number") from None
    if size > limit:
        raise HttpError(413, "body_too_large", f"the body is over the {limit}-byte limit")


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # The server's own refusal (a body not whole in time: 408), or the client gone.
            status, error, detail = scope.get(CUT_OFF) or (
                400,
                "invalid_request",
                "the client disconnected",
            )
            raise HttpError(status, error, detail)
        chunk: bytes = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise HttpError(413, "body_too_large", f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def rate_limit(hub: Hub, tenant_id: str) -> None:
    """Count one request for the tenant, or refuse it with 429 and `Retry-After`."""
    wait_s = await hub.rate_limiter.admit(tenant_id)
    if wait_s is not None:
        raise HttpError(
            429,
            "rate_limited",
            f"tenant {tenant_id!r} is over its ingress rate limit; retry in {wait_s} s",
            {"Retry-After": str(wait_s)},
        )


async def respond(
    send: Send, status: int, content: Any, headers: dict[str, str] | None = None
) -> None:
    """Answer with `content` as JSON, or as text when it is a str (the handshake's echo)."""
    extra = {k.lower(): v for k, v in (headers or {}).items()}
    if isinstance(content, str):
        body = content.encode()
        extra.setdefault("content-type", "text/plain; charset=utf-8")
        # The echo is the caller's own text: no browser may take it for HTML.
        extra.setdefault("x-content-type-options", "nosniff")
    else:
        body = orjson.dumps(content)
    raw_headers = [(k.encode(), v.encode()) for k, v in extra.items()]
    if "content-type" not in extra:
        raw_headers.extend(_JSON_HEADERS)
    # Without it uvicorn frames the body chunked: bytes and work on the hot path, and a
    # framing an HTTP/1.0 client cannot read (RFC 9112 §6.1).
    raw_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class IngestApp:
    """The ASGI application behind `/in/{source}`."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.max_body_bytes = hub.config.server.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, content, headers = await self._handle(scope, receive)
        except HttpError as exc:
            await self._refuse(scope, send, exc)
            return
        except StoreUnavailable as exc:
            self.hub.log_store_error("ingest", exc)
            await respond(
                send,
                503,
                {
                    "error": "store_unavailable",
                    "detail": "the store cannot be reached; retry later",
                },
                {"Retry-After": "5"},
            )
            return
        except StoreError as exc:  # the store answers but refuses (a role without INSERT)
            self.hub.log_store_error("ingest", exc)
            # Refused like any other: counted, so `webhooks_refused` fires if it lasts.
            detail = "the store failed to store the event; retry later"
            await self._refuse(scope, send, HttpError(500, "store_failed", detail))
            return
        except Exception as exc:  # a bug: logged in full, answered opaquely
            log.error("unhandled_error", error_class=type(exc).__name__, exc_info=exc)
            await respond(
                send, 500, {"error": "internal_error", "detail": "an internal error occurred"}
            )
            return
        await respond(send, status, content, headers)

    async def _refuse(self, scope: Scope, send: Send, exc: HttpError) -> None:
        """Answer `exc`, counted as a refusal of the source the path names."""
        source_id = scope["path"][len("/in/") :]
        self.hub.refusals.note(
            source_id, known=source_id in self.hub.sources, status=exc.status, error=exc.error
        )
        await respond(send, exc.status, {"error": exc.error, "detail": exc.detail}, exc.headers)

    async def _handle(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, Any, dict[str, str] | None]:
        hub = self.hub
        source_id = scope["path"][len("/in/") :]
        source = hub.sources.get(source_id)
        handler = hub.source_handlers.get(source_id)
        if source is None or handler is None:
            raise HttpError(404, "unknown_source", f"no source named {source_id!r}")
        method = scope["method"]
        if method not in ("GET", "POST"):
            allowed = ", ".join(handler.methods)
            raise HttpError(
                405, "method_not_allowed", f"this source accepts {allowed}", {"Allow": allowed}
            )
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        if method == "POST":
            limit = self.max_body_bytes
            check_declared_length(headers, limit)
            body = await read_body(scope, receive, limit)
        request = inbound_request(scope, headers, body)
        if method == "GET":
            challenge = handler.handshake(request)
            hub.refusals.accepted(source_id)  # its verify token is right: the refusals end
            return 200, challenge, None
        handler.verify(request)
        await rate_limit(hub, source.tenant)
        try:
            parsed = handler.parse(request)
        except HttpError as refusal:
            if refusal.status != 400:
                raise
            raise compressed_refusal(headers.get("content-encoding")) or refusal from None
        # A webhook's events are committed together, in one transaction (see accept_all).
        results = await hub.accept_all(
            [
                hub.new_event(
                    tenant_id=its.tenant,
                    source_id=its.id,
                    event_type=p.type,
                    data=p.data,
                    idempotency_key=p.idempotency_key,
                    occurred_at=p.occurred_at,
                    raw=p.raw,
                )
                for its, p in owned(hub, source, parsed, request)
            ]
        )
        if not results:  # verified, but nothing to store (Meta's account updates …)
            hub.refusals.accepted(source_id)  # the source is reached and answered: they end
        duplicate = bool(results) and all(r.duplicate for r in results)
        status = handler.accepted_status if results and not duplicate else 200
        marks = SPOOLED if any(r.spooled for r in results) else None
        if handler.answers_twiml:
            return status, EMPTY_TWIML, twiml_headers(results, marks)
        if len(results) == 1:
            return status, {"id": results[0].event_id, "duplicate": duplicate}, marks
        listed = [{"id": r.event_id, "duplicate": r.duplicate} for r in results]
        return status, {"events": listed}, marks


def owned(
    hub: Hub, source: SourceConfig, parsed: Sequence[ParsedEvent], request: InboundRequest
) -> list[tuple[SourceConfig, ParsedEvent]]:
    """The events `source` received, each with the source it belongs to: `source`, unless
    it is an event of a number (a WhatsApp Cloud `phone_number_id`, a Twilio `from`) that
    another tenant's source has. A Meta app or a Twilio account (a Messaging Service's pool)
    serving several businesses posts every number's webhooks to one URL: stored as the
    receiving tenant's, one business got another's patients' messages. Such an event is that
    source's when the request is signed with its secret too (the same app or account); else
    it is left out, and logged: a business that knows its own secret must not write into
    another's conversations. Each number is judged once a webhook (a signature is a pass
    over the body, up to 3 MB)."""
    if source.kind not in ROUTING_NUMBER_KEYS:
        return [(source, p) for p in parsed]
    owners: dict[str | None, SourceConfig | None] = {}
    left_out: dict[str, int] = {}
    kept: list[tuple[SourceConfig, ParsedEvent]] = []
    for p in parsed:
        number = _number_of(source, p, request)
        if number not in owners:
            owners[number] = _owner(hub, source, number, request)
        found = owners[number]
        if found is not None:
            kept.append((found, p))
        else:
            assert number is not None  # noqa: S101 - only a configured number is left out
            left_out[number] = left_out.get(number, 0) + 1
    for number, events in left_out.items():
        count = hub.foreign_number_lines.due((source.id, number), events)
        if count is not None:
            key = "phone_number_id" if source.kind == "whatsapp_cloud" else "number"
            log.warning(
                "webhook_of_another_tenants_number",
                source=source.id,
                sources=[hub.numbers[source.kind, number].id],
                count=count,
                **{key: number},
            )
    return kept


def _number_of(source: SourceConfig, event: ParsedEvent, request: InboundRequest) -> str | None:
    """The number (as `SourceConfig.own_number` writes it) `event` is for."""
    if source.kind == "twilio":
        return twilio.own_number(request, event)
    number = event.data.get("phone_number_id")
    return number if isinstance(number, str) else None


def _owner(
    hub: Hub, source: SourceConfig, number: str | None, request: InboundRequest
) -> SourceConfig | None:
    """The source the events of `number` that `source` received belong to (see `owned`)."""
    theirs = hub.numbers.get((source.kind, number)) if number is not None else None
    if theirs is None or theirs.tenant == source.tenant:
        return source  # a number of this tenant's (or of no source): as it always was
    handler = hub.source_handlers[theirs.id]
    try:
        if isinstance(handler, twilio.TwilioSource):
            # Twilio signed the URL it called, the receiving source's, with the account's
            # auth token: the same account's token is the other source's too.
            receiving = hub.source_handlers[source.id]
            assert isinstance(receiving, twilio.TwilioSource)  # noqa: S101 - same kind
            handler.verify(request, receiving.signed_url(request))
        else:
            handler.verify(request)
    except HttpError:
        return None
    return theirs


def inbound_request(scope: Scope, headers: dict[str, str], body: bytes) -> InboundRequest:
    """The request as sources see it; the URL is rebuilt as the client sent it (Twilio
    signs the full URL)."""
    raw_query = scope.get("query_string", b"").decode("latin-1")
    # ASGI: `raw_path` is optional and may be None; then the decoded path is all there is.
    path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    path_qs = f"{path}?{raw_query}" if raw_query else path
    host = headers.get("host", "localhost")
    return InboundRequest(
        method=scope["method"],
        url=f"{scope.get('scheme', 'http')}://{host}{path_qs}",
        path_qs=path_qs,
        query=first_values(raw_query),
        headers=headers,
        body=body,
        content_type=media_type(headers),
    )

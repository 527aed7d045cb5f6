"""JSON responses and the error format every client sees: `{"error": …, "detail": …}`."""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from estafeta.errors import HttpError, StoreError, StoreUnavailable
from estafeta.jsonvalues import DATA_LEVELS_ABOVE, ORJSON_MAX_DEPTH, WIDE_INTEGER
from estafeta.observability.metrics import API_ERRORS, series

log = structlog.get_logger("estafeta.api")


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content), status_code=status, headers=headers, media_type="application/json"
    )


def error_response(error: HttpError) -> Response:
    """Every error the API answers goes through here, and is counted here."""
    count_api_error(error)
    return json_response(
        {"error": error.error, "detail": error.detail}, error.status, error.headers or None
    )


def count_api_error(error: HttpError) -> None:
    # Codes are the API's own (a fixed set) or `http_<status>`: the series stay few.
    series(API_ERRORS, str(error.status), error.error).inc()


def key_used_elsewhere(key: str, event_id: str, first_use: str, retry: str) -> HttpError:
    """409: a tenant's idempotency keys are shared by `POST /events`, `POST /messages` and
    conversation escalations (all store `api` events), and a key names one request;
    answering the other request's event as a duplicate would report something that was
    never stored."""
    return HttpError(
        409,
        "idempotency_key_reused",
        f"idempotency key {key!r} was already used for {first_use} {event_id}; "
        f"a key names one request: {retry} with a new key",
    )


async def handle_http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)  # noqa: S101 - registered for HttpError only
    return error_response(exc)


async def handle_starlette_error(request: Request, exc: Exception) -> Response:
    """Routing's own refusals (unknown path, wrong method) in our error format."""
    assert isinstance(exc, StarletteHTTPException)  # noqa: S101 - registered for it only
    if exc.status_code == 400:  # a body the parser gave up on: read before the key is
        refused = await request.app.state.auth.refusal(request)
        if refused is not None:
            return error_response(refused)
    unread = _unparsed_body(exc)
    if unread is not None:
        return error_response(HttpError(400, "invalid_request", unread))
    names = {404: "not_found", 405: "method_not_allowed"}
    error = names.get(exc.status_code, f"http_{exc.status_code}")
    detail = {404: "no such path", 405: "this path does not take that method"}.get(
        exc.status_code, str(exc.detail)
    )
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and "Allow" in headers:
        headers["Allow"] = _allowed(headers["Allow"])
    return error_response(HttpError(exc.status_code, error, detail, headers))


def _allowed(allow: str) -> str:
    """A 405's `Allow` as the API answers: with HEAD wherever GET is (app.py's Root answers
    HEAD as GET; a route names only GET), in one order whichever route refused."""
    methods = {method.strip() for method in allow.split(",")}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def _unparsed_body(exc: StarletteHTTPException) -> str | None:
    """Why the API's JSON parser (the standard library's) gave up on a body that FastAPI
    answers only "There was an error parsing the body" for, naming nothing: nested past
    Python's recursion limit, or an integer of more digits than Python converts (4300).
    Both are JSON estafeta could not store either; said as a shallower one is said."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, RecursionError):
        depth = ORJSON_MAX_DEPTH - DATA_LEVELS_ABOVE
        return f"body: arrays and objects nested more than {depth} deep"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"body: {WIDE_INTEGER}"
    return None


async def handle_store_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StoreError)  # noqa: S101 - registered for it only
    request.app.state.hub.log_store_error("api", exc)
    if not isinstance(exc, StoreUnavailable):  # it answers but refuses (a role without SELECT)
        return error_response(HttpError(500, "store_failed", "the store failed; retry later"))
    return error_response(
        HttpError(
            503,
            "store_unavailable",
            "the store cannot be reached; retry later",
            {"Retry-After": "5"},
        )
    )


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for it only
    if any(err.get("type") == "json_invalid" for err in exc.errors()):
        # FastAPI parses the body before any dependency asks for the key.
        refused = await request.app.state.auth.refusal(request)
        if refused is not None:
            return error_response(refused)
    problems = []
    for err in exc.errors():
        location = ".".join(str(part) for part in err.get("loc", ()))
        problems.append(f"{location}: {err.get('msg', 'invalid')}")
    return error_response(HttpError(400, "invalid_request", "; ".join(problems)))


async def handle_unexpected(_request: Request, exc: Exception) -> Response:
    """Anything that is not an HttpError is a bug: logged in full, answered opaquely."""
    log.error("unhandled_error", error_class=type(exc).__name__, exc_info=exc)
    return error_response(HttpError(500, "internal_error", "an internal error occurred"))

"""The bare-HTTP ceilings: an app that reads the body and answers 202 with a small JSON,
served exactly as estafeta is (uvicorn + httptools + uvloop, one process):

    uvicorn trivial_app:app --app-dir bench --loop uvloop \
        --http estafeta.http_protocol:OneWriteHttpToolsProtocol

`app` is a raw ASGI callable, the most any ASGI ingest can do; `starlette_app` is the same
answer from a Starlette route, the issue's reference ceiling ("a trivial Starlette handler
under uvicorn served about 15,700 requests/s on one core").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Message = MutableMapping[str, Any]

_BODY = b'{"id":"evt_01JD0000000000000000000000","duplicate":false}'
_HEADERS = [(b"content-type", b"application/json")]


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Read the whole request, answer 202; lifespan events are acknowledged."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        message = await receive()
        more = bool(message.get("more_body"))
    await send({"type": "http.response.start", "status": 202, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


async def _starlette_ingest(request: Request) -> Response:
    await request.body()
    return Response(_BODY, status_code=202, media_type="application/json")


starlette_app = Starlette(routes=[Route("/in/{source}", _starlette_ingest, methods=["POST"])])

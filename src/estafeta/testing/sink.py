"""A real webhook receiver on 127.0.0.1 for tests, the demo and the benchmark.

Tests of delivery should meet real sockets, real HTTP and real timing, not a mocked client:
that is where redirects, timeouts, keep-alive and partial reads bite. The sink answers every
request with a behaviour a test can switch while it runs (`respond`, `fail_first`), records
what arrived, and lets a test wait for a condition without polling (`wait_for`).

    sink = Sink(secret="whsec_…")          # verify Standard Webhooks signatures
    await sink.start()
    sink.fail_first(2, 503)                 # two failures, then the default 200
    ... deliver to sink.url ...
    assert await sink.wait_for(lambda s: "evt_1" in s.delivered_ids, timeout_s=5)
    await sink.stop()

It also runs as a process for subprocess tests:
`python -m estafeta.testing.sink --port 0 [--fail-first N] [--status S] [--secret whsec_…]`
prints `{"url": …}` once listening and a summary line when stopped (SIGTERM or SIGINT); one
that cannot start (its port in use, a `--secret` that is not base64) prints one `error:` line
on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from estafeta.testing.server import LocalServer


@dataclass
class Received:
    """One request as it arrived. `path` includes any query string; header names are lower-case."""

    webhook_id: str | None
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival
    status: int = 0  # what the sink answered (or will, after a delay)
    # The common name of the certificate the client presented, over TLS that asks for one.
    client_certificate: str | None = None


@dataclass(frozen=True, slots=True)
class BadSignature:
    """A request whose Standard Webhooks signature did not verify, and why."""

    received: Received
    reason: str


@dataclass(frozen=True, slots=True)
class _Behaviour:
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body: bytes = b""


class Sink(LocalServer):
    """An aiohttp server whose answers a test controls; see the module docstring."""

    # Deliveries are events the hub accepted (up to server.max_body_bytes, which has no upper
    # bound) in their envelope: a receiver that refused the largest would fail their tests.
    client_max_size = 1024**3

    def __init__(self, *, secret: str | None = None) -> None:
        super().__init__()
        self._verifier = Webhook(secret) if secret else None
        self._default = _Behaviour()
        self._failures: deque[_Behaviour] = deque()
        self._changed = asyncio.Condition()
        self.received: list[Received] = []
        self.unique_ids: set[str] = set()  # every webhook-id seen, whatever the answer
        self.delivered_ids: set[str] = set()  # ids answered 2xx
        self.duplicates = 0  # 2xx answers for an id that already had one
        self.bad_signatures: list[BadSignature] = []

    def add_routes(self, app: web.Application) -> None:
        """Every method and path reaches the one handler."""
        app.router.add_route("*", "/{tail:.*}", self._handle)

    # -- behaviour ---------------------------------------------------------------------------

    def respond(
        self,
        status: int = 200,
        *,
        headers: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
        body: bytes = b"",
    ) -> None:
        """The answer to every request from now on (after any pending `fail_first`)."""
        self._default = _Behaviour(status, dict(headers or {}), delay_s, body)

    def fail_first(
        self, n: int, status: int = 500, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer the next `n` requests with `status`, then go back to the default.

        Replaces any failures still pending; `fail_first(0)` cancels them.
        """
        failure = _Behaviour(status, dict(headers or {}))
        self._failures = deque(failure for _ in range(n))

    async def wait_for(self, predicate: Callable[[Sink], bool], timeout_s: float) -> bool:
        """Wait until `predicate(sink)` holds; False if it still does not after `timeout_s`.

        Re-checked whenever a request arrives or is answered, never by polling.
        """
        async with self._changed:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait_for(lambda: predicate(self))
            except TimeoutError:
                return False
            return True

    # -- the handler -------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.read()
        received = Received(
            webhook_id=request.headers.get("webhook-id"),
            path=request.path_qs,
            headers={name.lower(): value for name, value in request.headers.items()},
            body=body,
            at=arrived,
            client_certificate=_client_certificate(request),
        )
        bad = self._verify(received)
        # A request with a bad signature is refused without using up a planned failure.
        if bad is not None:
            behaviour = _Behaviour(401, {}, 0.0, bad.encode())
        elif self._failures:
            behaviour = self._failures.popleft()
        else:
            behaviour = self._default
        received.status = behaviour.status
        async with self._changed:
            self.received.append(received)
            if received.webhook_id is not None:
                self.unique_ids.add(received.webhook_id)
            if bad is not None:
                self.bad_signatures.append(BadSignature(received, bad))
            self._changed.notify_all()

        if behaviour.delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), behaviour.delay_s)
        if self._stopping.is_set():  # stopped while waiting: 503, not counted as delivered
            return web.Response(status=503)

        if 200 <= behaviour.status <= 299 and received.webhook_id is not None:
            async with self._changed:
                if received.webhook_id in self.delivered_ids:
                    self.duplicates += 1
                self.delivered_ids.add(received.webhook_id)
                self._changed.notify_all()
        return web.Response(status=behaviour.status, headers=behaviour.headers, body=behaviour.body)

    def _verify(self, received: Received) -> str | None:
        """None when the signature verifies (or none is required), else the reason."""
        if self._verifier is None:
            return None
        try:
            self._verifier.verify(received.body, received.headers, json_parse=False)
        except WebhookVerificationError as exc:
            return str(exc)
        except ValueError as exc:  # a malformed header or a body that is not UTF-8
            return f"malformed: {exc}"
        return None


def _client_certificate(request: web.Request) -> str | None:
    """The common name of the client's certificate, as the TLS server verified it."""
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    for rdn in (peer or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


# -- as a process ------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace, sink: Sink) -> int:
    if args.fail_first:
        sink.fail_first(args.fail_first, args.status)
    else:
        sink.respond(args.status)
    try:
        await sink.start(args.host, args.port)
    except OSError as error:
        # The how-to starts it on port 9000, where an earlier receiver may still listen:
        # one line saying so, not asyncio's traceback.
        reason = error.strerror or str(error)
        print(f"error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 2
    print(json.dumps({"url": sink.url}), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await sink.stop()
    summary = {
        "received": len(sink.received),
        "delivered": len(sink.delivered_ids),
        "duplicates": sink.duplicates,
        "bad_signatures": len(sink.bad_signatures),
    }
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m estafeta.testing.sink`: run a sink until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m estafeta.testing.sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--fail-first", type=int, default=0, metavar="N")
    parser.add_argument(
        "--status",
        type=int,
        default=None,
        metavar="S",
        help="with --fail-first, the status of those N failures (default 500), then 200; "
        "without it, the status of every answer (default 200)",
    )
    parser.add_argument("--secret", default=None, help="verify signatures with this whsec_…")
    args = parser.parse_args(argv)
    if args.status is None:
        args.status = 500 if args.fail_first else 200
    try:
        sink = Sink(secret=args.secret)
    except ValueError as error:  # binascii.Error too: a secret that is not base64
        print(
            # Not the value: a secret, even a mistyped one, is not echoed.
            "error: --secret: not a Standard Webhooks secret "
            f"('whsec_' followed by base64): {error}",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_serve(args, sink))


if __name__ == "__main__":
    sys.exit(main())

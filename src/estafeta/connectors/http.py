"""The HTTP destination: POST the canonical event, signed as Standard Webhooks says.

This is the boundary where aiohttp's exceptions stop. Whatever the destination does — answer
500, hang, refuse the connection, redirect, send a gigabyte of body — `deliver` returns an
`Outcome`; only a bug in estafeta raises. The rules that turn an answer into a decision
(`classify_status`, `parse_retry_after`) are pure and live in `delivery.decision`.

All destinations share one pooled `aiohttp.ClientSession` (`new_client_session`), owned by
the worker: a session per destination would multiply sockets and DNS lookups, and keep-alive
is what makes thousands of small POSTs per second cheap.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hmac
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urljoin

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest, ConnectionKey
from aiohttp.connector import Connection
from aiohttp.http import HttpProcessingError, RawResponseMessage
from aiohttp.streams import StreamReader
from aiohttp.tracing import Trace
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from estafeta import __version__
from estafeta.config.models import BODY_HEADERS, OWN_HEADERS
from estafeta.connectors.exchange import Answer, exchange
from estafeta.delivery.decision import classify_status, parse_retry_after
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import EXCERPT_LIMIT, Outcome, OutcomeKind
from estafeta.urls import outline

# A UTF-8 character takes at most 4 bytes, so this many bytes always hold EXCERPT_LIMIT whole
# characters when the body is that long; a character cut at the end is dropped by the slice.
_EXCERPT_BYTES = EXCERPT_LIMIT * 4
_USER_AGENT = f"estafeta/{__version__}"


def sign_webhook(secret: str | Sequence[str], msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The `webhook-signature` value (`v1,<base64>`) for one message; with several secrets
    (one being rotated), one signature per secret, space-separated, the current one first,
    as the specification allows: a receiver verifies with either."""
    secrets = (secret,) if isinstance(secret, str) else secret
    return _sign(tuple(signing_key(each) for each in secrets), msg_id, timestamp_s, body)


def signing_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret, decoded as the reference library
    (`standardwebhooks`) decodes it; raises what the library raises for one it refuses."""
    Webhook(secret)  # the library's own checks, so that we refuse exactly what it refuses
    return base64.b64decode(secret.removeprefix("whsec_") + "==")


def _sign(keys: tuple[bytes, ...], msg_id: str, timestamp_s: int, body: bytes) -> str:
    # Standard Webhooks signs `{id}.{timestamp}.{body}`. Done on the body's bytes: the
    # library takes the body as a str, and decoding it to encode it again cost two passes
    # over every payload; tests hold this to the library's output and the spec's vectors.
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp_s, body)
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode() for key in keys
    )


# 1xx answers one request may get before its final one. A server may send 100 Continue, a few
# 103 Early Hints, or 102 Processing every few seconds while it works; Go's client stops at 5.
MAX_INTERIM_ANSWERS = 100


class _BoundedInterim(ResponseHandler):
    """aiohttp's connection protocol, failing a request once its destination sent it more
    than MAX_INTERIM_ANSWERS 1xx answers.

    aiohttp skips 1xx answers for as long as they come, and a destination that sends
    nothing else kept the worker parsing them, one CPU at full speed, until the attempt's
    timeout: a few such deliveries starved every other send and the store's answers. The
    connection is closed (nothing more of it is parsed) and the request fails as an answer
    that is not valid HTTP (`invalid_response`).
    """

    _interim = 0  # 1xx answers since the last final one on this connection

    def feed_data(self, data: tuple[RawResponseMessage, StreamReader], size: int = 0) -> None:
        code = data[0].code
        if code >= 200 or code == 101:  # a final answer (101 ends HTTP on the connection)
            self._interim = 0
        elif self._interim < MAX_INTERIM_ANSWERS:
            self._interim += 1
        else:
            if not self.is_eof():
                message = f"more than {MAX_INTERIM_ANSWERS} interim (1xx) answers to one request"
                self.set_exception(HttpProcessingError(message=message))
                if self.transport is not None:
                    self.transport.close()
            return
        super().feed_data(data, size)


class _OneAnswerPerRequest(aiohttp.TCPConnector):
    """A pool that never hands out a kept-alive connection holding an answer nobody asked
    for yet.

    HTTP/1.1 pairs an answer with its request only by order. A destination that answers
    twice, or sends more body than its Content-Length (or any after a 204), once the
    answer was read whole, leaves an answer in the idle pooled connection, and aiohttp
    gave it to the next request sent on it: that delivery was recorded with an answer
    written before it was sent (a forged 200 marked it delivered, though the destination
    never answered it). Such a connection is closed and another one taken instead. (One
    that arrives only after the next request was written cannot be told from its answer:
    HTTP/1.1 has nothing to tell them apart.)
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # aiohttp's own protocol factory, with 1xx answers bounded (_BoundedInterim).
        protocol: type[ResponseHandler] = _BoundedInterim
        self._factory = functools.partial(protocol, loop=self._loop)

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        # Bounded by the pool's size, which is all there is to drop before a new
        # connection is made, in case a destination answers a new one before it is asked.
        for _ in range(self.limit):
            protocol = connection.protocol
            if protocol is None or not protocol.should_close:  # nothing unasked was read
                break
            connection.close()
            connection = await super().connect(req, traces, timeout)
        return connection

    def _release(
        self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False
    ) -> None:
        super()._release(key, protocol, should_close=should_close)
        # aiohttp's `limit` counts only the connections in use: each destination's burst
        # left as many idle ones, which steady traffic reuses in turn so that none times
        # out, and a process held up to `limit` sockets per destination, past the open files
        # it was sized for. Past `limit` open ones, in use or idle, the longest idle are closed
        # (a private aiohttp method, as `_factory` above: constraints.txt pins the version).
        idle = sum(len(kept) for kept in self._conns.values())
        for _ in range(len(self._acquired) + idle - self.limit if self.limit else 0):
            oldest = min(self._conns, key=lambda k: self._conns[k][0][1])
            kept = self._conns[oldest]
            kept.popleft()[0].close()
            if not kept:
                del self._conns[oldest]


def new_client_session(*, connections: int = 256) -> aiohttp.ClientSession:
    """One pooled client session for every HTTP destination; call it inside the running loop.

    `connections` must be at least the number of sends that may run at once (the worker's
    `concurrency`), to any one host as to all: aiohttp counts the wait for a free socket in
    the request's timeout, so a send queued behind a pool that is too small timed out
    without ever reaching its destination, and its attempt was spent. How many sends one
    destination gets at once is the worker's decision, not the pool's. DNS answers are cached
    for 5 minutes. Responses are not decompressed (and we ask for `identity`): we only keep a
    short excerpt of a body, and inflating it is work and a zip-bomb risk. Cookies are
    neither kept nor sent: the session serves every tenant's destinations, and a cookie one
    answer set would otherwise go with the next delivery to that host, whoever's it is.
    """
    connector = _OneAnswerPerRequest(
        limit=connections,
        limit_per_host=connections,
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    )


class HttpConnector:
    """Delivers to one HTTP endpoint; implements `connectors.base.Connector`.

    The constructor raises ValueError for a configuration that can never work (a timeout
    that is not positive, a secret that does not decode); a malformed URL is reported by
    `deliver` as a permanent `invalid_destination` outcome instead, so that it lands in the
    dead-letter queue where an operator sees it.
    """

    def __init__(
        self,
        *,
        url: str,
        secret: str | Sequence[str] | None,
        timeout_s: float,
        session: aiohttp.ClientSession,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        now_s: Callable[[], float] = time.time,
    ) -> None:
        if not timeout_s > 0:  # aiohttp reads 0 as "no timeout": a worker could hang forever
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self._url = url
        # Decoding the secrets once here makes a malformed one fail at start-up, not on
        # every delivery. Several while one is rotated: a signature each, current first.
        try:
            secrets = (secret,) if isinstance(secret, str) else secret or ()
            self._keys = tuple(signing_key(each) for each in secrets if each)
        except (ValueError, EmptyWebhookSecretError) as exc:
            raise ValueError(
                f"the destination secret is not a whsec_<base64> secret: {exc}"
            ) from exc
        self._timeout_s = timeout_s
        # The destination's own context (`connectors.tls.client_context`), else aiohttp's
        # verifying default: never a context that does not verify.
        self._tls: ssl.SSLContext | bool = tls if tls is not None else True
        self._session = session
        self._now_s = now_s
        extra = {name.lower(): value for name, value in (headers or {}).items()}
        # The configuration refuses these names; left out here too, as they would send a
        # body other than the one signed (or one no receiver can read).
        ours = (*OWN_HEADERS, *BODY_HEADERS)
        self._base_headers = {k: v for k, v in extra.items() if k not in ours} | {
            "content-type": "application/json",
            "user-agent": _USER_AGENT,
            "accept-encoding": "identity",
        }

    def _headers_for(self, delivery: LeasedDelivery) -> dict[str, str]:
        timestamp_s = int(self._now_s())
        headers = self._base_headers | {
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(timestamp_s),
        }
        if self._keys:
            headers["webhook-signature"] = _sign(
                self._keys, delivery.event_id, timestamp_s, delivery.payload
            )
        return headers

    async def deliver(self, delivery: LeasedDelivery) -> Outcome:
        """POST the event once and report what came of it; never raises for the destination."""
        # Signing is outside the try: an error there is ours (a bug), not the destination's.
        headers = self._headers_for(delivery)
        answer = await exchange(
            self._session,
            "POST",
            self._url,
            headers=headers,
            body=delivery.payload,
            timeout_s=self._timeout_s,
            read_limit=_EXCERPT_BYTES,
            tls=self._tls,
        )
        if isinstance(answer, Outcome):
            return answer
        kind = classify_status(answer.status)
        succeeded = kind is OutcomeKind.SUCCESS
        return Outcome(
            kind=kind,
            duration_ms=answer.duration_ms,
            status_code=answer.status,
            error_class=None if succeeded else f"http_{answer.status}",
            retry_after_s=None
            if succeeded
            else parse_retry_after(answer.retry_after, int(self._now_s() * 1000)),
            response_excerpt=self._excerpt(answer),
        )

    def _excerpt(self, answer: Answer) -> str:
        """The answer's body, or for a redirect where it points: a destination that moved
        (http → https, a new host) answers 301 with no body worth reading, and its Location
        is what the operator needs to mend the URL. It is shown as its outline, like every
        URL in an excerpt (a hook's path can be its credential)."""
        if 300 <= answer.status < 400:
            where = "without a Location"
            if answer.location:
                target = ""
                with contextlib.suppress(ValueError):  # a Location urljoin cannot read
                    target = outline(urljoin(self._url, answer.location))
                where = f"to {target}" if target else "to a Location that is not a URL"
            return f"redirect {where}, not followed"[:EXCERPT_LIMIT]
        return answer.body.decode("utf-8", errors="replace")[:EXCERPT_LIMIT]

    async def close(self) -> None:
        """Nothing to release: the shared session belongs to whoever created it."""


__all__ = ["HttpConnector", "new_client_session", "sign_webhook"]

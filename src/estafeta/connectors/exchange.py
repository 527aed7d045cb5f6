"""One HTTP request to a destination, and every way it can fail, as a value.

Shared by the webhook connector (http.py) and the WhatsApp providers' clients: the request is
made with redirects off and one total timeout (and sent once more if the kept-alive
connection it took was already closing, see `exchange`), at most `read_limit` bytes of the
answer are read, and every foreign exception is translated here into an `Outcome` (never
raised), so each caller only decides what an answer means.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from estafeta.connectors.tls import tls_failure
from estafeta.delivery.expiry import Expiry
from estafeta.delivery.outcome import (
    EXCERPT_LIMIT,
    LOCAL_RESOURCES,
    TLS_ERROR,
    Outcome,
    OutcomeKind,
)
from estafeta.urls import outline

# None of aiohttp's limits: each exchange's timeout is its Expiry (the session's default
# would add aiohttp's 300 s total).
_BOUNDED_BY_EXPIRY = aiohttp.ClientTimeout()
_CUT_IN_HEAD = "Server disconnected in the middle of the answer's head"
# A URL already fit to send: RFC 3986 characters only, every `%` starting an escape.
_ENCODED_URL = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
# How aiohttp names a destination's own TLS context in a failure to connect (`Cannot connect
# to host crm.lan:443 ssl:<ssl.SSLContext object at 0x7f…>`): an address different in every
# process and restart, that would split one outage into as many `dlq list --summary` groups.
_CONTEXT_OBJECT = re.compile(r"<ssl\.SSLContext object at 0x[0-9a-fA-F]+>")
_CONTEXT_NAMED = "the destination's context"  # as aiohttp's own is named `ssl:default`


# What a connection this process cannot open for want of its own resources fails with:
# out of descriptors (EMFILE, or the host's: ENFILE), of socket buffers or of memory.
LOCAL_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True, slots=True)
class Answer:
    """What the destination answered (any status)."""

    status: int
    body: bytes  # at most the caller's read_limit bytes
    retry_after: str | None  # the Retry-After header, as sent
    duration_ms: float
    location: str | None = None  # the Location header of a 3xx (redirects are not followed)


async def exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    body: bytes,
    timeout_s: float | None,
    read_limit: int,
    tls: ssl.SSLContext | bool = True,
) -> Answer | Outcome:
    """The destination's answer, or an `Outcome` when there was none.

    `tls` is the context an https URL is verified with (`connectors.tls`); True is aiohttp's
    default, verifying with the system's CA store.

    A request aiohttp could not write because the kept-alive connection it took from the
    pool was already closing (the destination closed it after its last answer, without a
    `Connection: close`) is sent once more on a new one, within the same timeout: it never
    reached the destination, so this adds no duplicate. aiohttp resends only idempotent
    methods, not a POST; counted as a failure, it cost an attempt and a mark in the
    destination's circuit, every other delivery for such a destination.
    """
    started = time.perf_counter()
    target = as_written(url)
    # The timeout is ours, not aiohttp's: aiohttp's fired in the turn a busy process read an
    # answer that came in time (delivery/expiry.py).
    expiry = None if timeout_s is None else Expiry(timeout_s)
    try:
        try:
            got = await _request(session, method, target, headers, body, tls, read_limit, expiry)
        except aiohttp.ClientConnectionError as exc:
            if not _never_sent(exc) or (timeout_s is not None and _elapsed_s(started) >= timeout_s):
                raise
            got = await _request(session, method, target, headers, body, tls, read_limit, expiry)
    except asyncio.CancelledError:
        if expiry is None or not expiry.ended_it():
            raise  # a shutdown, or the worker's ceiling: not this exchange's timeout
        return no_answer(started, url, "timeout", no_answer_within(timeout_s))
    except TimeoutError as exc:  # = asyncio.TimeoutError since 3.11: the system's (ETIMEDOUT)
        # A bare TimeoutError's excerpt and `last_error` would read `TimeoutError`, which
        # says neither that nothing came back nor after how long.
        return no_answer(started, url, "timeout", str(exc) or no_answer_within(timeout_s))
    # Before ClientError, which both are: a URL we cannot send to will never work.
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        return no_answer(started, url, "invalid_destination", exc, OutcomeKind.PERMANENT)
    # Before ClientConnectorError, which it is: aiohttp's text names the context object
    # (`ssl:<ssl.SSLContext object at 0x7f…>`), different in every process, not the reason.
    except aiohttp.ClientSSLError as exc:
        return no_answer(started, url, TLS_ERROR, tls_failure(exc) or exc)
    except aiohttp.ClientConnectorError as exc:
        if exc.os_error.errno in LOCAL_RESOURCE_ERRNOS:
            return no_answer(started, url, LOCAL_RESOURCES, exc)
        refused = isinstance(exc.os_error, ConnectionRefusedError) or (
            exc.os_error.errno == errno.ECONNREFUSED
        )
        return no_answer(started, url, "connection_refused" if refused else "connection_error", exc)
    # An answer that is not HTTP (a broken status line or header): aiohttp's text names a
    # status it made up (400) and the URL; its message alone says what was wrong.
    except aiohttp.ClientResponseError as exc:
        return no_answer(started, url, "invalid_response", exc.message or exc)
    # Closed after part of the head: aiohttp's message is then the head it had begun to
    # parse, whose text (`<RawResponseMessage(…, code=200, reason='OK', …`) read as if the
    # destination had answered 200.
    except aiohttp.ServerDisconnectedError as exc:
        detail = exc.message if isinstance(exc.message, str) else _CUT_IN_HEAD
        return no_answer(started, url, "connection_error", detail)
    except (aiohttp.ClientError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in LOCAL_RESOURCE_ERRNOS:
            return no_answer(started, url, LOCAL_RESOURCES, exc)
        # With TLS 1.3 a destination judges our client certificate after the handshake: its
        # alert arrives as the request is written or its answer read.
        if (failure := tls_failure(exc)) is not None:
            return no_answer(started, url, TLS_ERROR, failure)
        return no_answer(started, url, "connection_error", exc)
    except ValueError as exc:  # yarl/aiohttp on a URL or header they cannot use
        return no_answer(started, url, "invalid_destination", exc, OutcomeKind.PERMANENT)
    finally:
        if expiry is not None:
            expiry.disarm()
    status, content, retry_after, location = got
    return Answer(status, content, retry_after, elapsed_ms(started), location)


def _never_sent(exc: BaseException) -> bool:
    """aiohttp found the connection closing when it came to write the request."""
    closing = aiohttp.ClientConnectionResetError
    return isinstance(exc, closing) or isinstance(exc.__cause__, closing)


async def _request(
    session: aiohttp.ClientSession,
    method: str,
    url: URL | str,
    headers: Mapping[str, str],
    body: bytes,
    tls: ssl.SSLContext | bool,
    read_limit: int,
    expiry: Expiry | None,
) -> tuple[int, bytes, str | None, str | None]:
    """The status, at most `read_limit` bytes of the body, `Retry-After` and a 3xx's
    `Location`; aiohttp's exceptions go through, and the `expiry`'s before the status."""
    async with session.request(
        method,
        url,
        data=body,
        headers=headers,
        allow_redirects=False,
        timeout=_BOUNDED_BY_EXPIRY,
        ssl=tls,
    ) as response:
        status = response.status
        retry_after = response.headers.get("Retry-After")
        location = response.headers.get("Location") if 300 <= status < 400 else None
        if location is not None:
            # aiohttp decodes headers with surrogateescape: a byte that is not UTF-8
            # would leave a lone surrogate in the excerpt, which no store can write.
            location = location.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return status, await _read_bounded(response, read_limit, expiry), retry_after, location


@functools.lru_cache(maxsize=1024)  # a destination's URL is sent again and again
def as_written(url: str) -> URL | str:
    """`url` as aiohttp should send it: byte for byte when it is already encoded.

    Given a string, aiohttp lets yarl re-encode it, which decodes `%2F`, `%3A`, `%40`, `%7E`
    … in the path and query; a signed URL (CloudFront, S3, a SAS token, a hook that signs its
    query) then no longer matches its signature. A URL that is not encoded (a space, an
    accent) is still left to yarl to encode, and one yarl refuses to aiohttp to report.
    """
    if not _ENCODED_URL.fullmatch(url):
        return url
    try:
        written = URL(url, encoded=True)
        _ = written.explicit_port  # yarl reads it lazily: a bad port would raise in aiohttp
    except ValueError:
        return url
    return written


async def _read_bounded(
    response: aiohttp.ClientResponse, limit: int, expiry: Expiry | None
) -> bytes:
    """At most `limit` bytes of the body, reading no more than needed, until `expiry`.

    The status is already known, so a body that breaks off half-way (or outlasts the
    timeout) does not change the outcome: what was read is kept (a 200 cut short still
    means the destination took it). A body left unread makes aiohttp close the connection
    instead of pooling it, which is right for a response we stopped reading.
    """
    chunks: list[bytes] = []
    remaining = limit
    try:
        while remaining > 0:
            chunk = await response.content.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass
    except asyncio.CancelledError:
        if expiry is None or not expiry.ended_it():
            raise
    return b"".join(chunks)


def no_answer_within(timeout_s: float | None) -> str:
    """The excerpt of an attempt that timed out: `no answer within 10 s`."""
    return "no answer" if timeout_s is None else f"no answer within {timeout_s:g} s"


def no_answer(
    started: float,
    url: str,
    error_class: str,
    exc: BaseException | str,
    kind: OutcomeKind = OutcomeKind.RETRYABLE,
) -> Outcome:
    """An outcome for a failure with no usable HTTP answer; the exception's text is the
    excerpt, with the URL cut to its origin."""
    detail = without_credentials(str(exc) or type(exc).__name__, url)
    detail = _CONTEXT_OBJECT.sub(_CONTEXT_NAMED, detail)
    return Outcome(
        kind=kind,
        duration_ms=elapsed_ms(started),
        error_class=error_class,
        response_excerpt=detail[:EXCERPT_LIMIT],
    )


def without_credentials(detail: str, url: str) -> str:
    """`detail` with `url` written as its outline, `scheme://host:port/…` (`estafeta.urls`).

    aiohttp names the whole URL in some errors (a scheme it cannot send to, a URL it cannot
    parse), and the excerpt is stored and shown to every reader of the tenant's deliveries.
    """
    shown = outline(url)
    if not shown:
        return detail  # no host: not a URL anything could be sent to, nothing to cut
    written = {url}
    for encoded in (False, True):
        with contextlib.suppress(ValueError, TypeError):
            # As yarl normalises it or as it was sent (`as_written`), and as aiohttp names
            # the request's URL: without user and password (sent as an Authorization
            # header) and without the fragment (never sent).
            parsed = URL(url, encoded=encoded)
            sent = parsed.with_user(None)
            written |= {str(parsed), str(sent), str(sent.with_fragment(None))}
    for form in sorted(written - {shown}, key=len, reverse=True):
        detail = detail.replace(form, shown)
    return detail


def elapsed_ms(started: float) -> float:
    return _elapsed_s(started) * 1000


def _elapsed_s(started: float) -> float:
    return time.perf_counter() - started

"""One HTTP request to a destination, and every way it can fail, as a value.

Shared by the webhook connector (http.py) and the WhatsApp providers' clients: the request is
made with redirects off and one total timeout, at most `read_limit` bytes of the answer are
read, and every foreign exception is translated here into an `Outcome` (never raised), so
each caller only decides what an answer means.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from estafeta.delivery.outcome import EXCERPT_LIMIT, Outcome, OutcomeKind
from estafeta.urls import outline


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
    timeout: aiohttp.ClientTimeout,
    read_limit: int,
) -> Answer | Outcome:
    """The destination's answer, or an `Outcome` when there was none."""
    started = time.perf_counter()
    try:
        async with session.request(
            method,
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=timeout,
        ) as response:
            status = response.status
            retry_after = response.headers.get("Retry-After")
            location = response.headers.get("Location") if 300 <= status < 400 else None
            if location is not None:
                # aiohttp decodes headers with surrogateescape: a byte that is not UTF-8
                # would leave a lone surrogate in the excerpt, which no store can write.
                location = location.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            content = await _read_bounded(response, read_limit)
    except TimeoutError as exc:  # = asyncio.TimeoutError since 3.11; aiohttp's timeouts too
        return no_answer(started, url, "timeout", exc)
    # Before ClientError, which both are: a URL we cannot send to will never work.
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        return no_answer(started, url, "invalid_destination", exc, OutcomeKind.PERMANENT)
    except aiohttp.ClientConnectorError as exc:
        refused = isinstance(exc.os_error, ConnectionRefusedError) or (
            exc.os_error.errno == errno.ECONNREFUSED
        )
        return no_answer(started, url, "connection_refused" if refused else "connection_error", exc)
    # An answer that is not HTTP (a broken status line or header): aiohttp's text names a
    # status it made up (400) and the URL; its message alone says what was wrong.
    except aiohttp.ClientResponseError as exc:
        return no_answer(started, url, "invalid_response", exc.message or exc)
    except (aiohttp.ClientError, OSError) as exc:
        return no_answer(started, url, "connection_error", exc)
    except ValueError as exc:  # yarl/aiohttp on a URL or header they cannot use
        return no_answer(started, url, "invalid_destination", exc, OutcomeKind.PERMANENT)
    return Answer(status, content, retry_after, elapsed_ms(started), location)


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of the body, reading no more than needed.

    The status is already known, so a body that breaks off half-way does not change the
    outcome: what was read is kept (a 200 cut short still means the destination took it). A
    body left unread makes aiohttp close the connection instead of pooling it, which is right
    for a response we stopped reading.
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
    return b"".join(chunks)


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
    with contextlib.suppress(ValueError, TypeError):
        # As yarl normalises it, and without user and password (aiohttp sends those as an
        # Authorization header and names the URL without them).
        parsed = URL(url)
        written |= {str(parsed), str(parsed.with_user(None))}
    for form in sorted(written - {shown}, key=len, reverse=True):
        detail = detail.replace(form, shown)
    return detail


def elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000

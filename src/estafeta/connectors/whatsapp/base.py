"""What the four provider clients share: the protocol, one HTTP exchange, and outcomes.

This is where aiohttp's exceptions stop for the WhatsApp send path, as in
`connectors/http.py`: a timeout, a refused connection, a reset or an answer that is not HTTP
becomes a RETRYABLE `Outcome` (`timeout`, `connection_refused`, `connection_error`, `tls_error`,
`invalid_response`), a URL that cannot work a PERMANENT `invalid_destination`. What a
provider *answered* is read by each provider's module, from its documented error format
(contracts §1.7, §2.4, §3.5, §9.7), into `provider_error` outcomes:

* `error_class` is `"{provider}_{code}"` with the provider's own error code
  (`whatsapp_cloud_131047`, `twilio_63016`, `sendpulse_2020202020`), or
  `"{provider}_http_{status}"` when the answer carries no code;
* a 2xx without the provider's message id is `{provider}_no_message_id`, RETRYABLE
  (`no_message_id`);
* `response_excerpt` starts with `"{code} {title}"` on its own line (e.g.
  `131047 Re-engagement message`), then the provider's body, bounded by EXCERPT_LIMIT.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

import aiohttp
import orjson

from estafeta import __version__
from estafeta.connectors.exchange import exchange as http_exchange
from estafeta.connectors.whatsapp.message import OutboundMessage
from estafeta.delivery.decision import parse_retry_after
from estafeta.delivery.outcome import EXCERPT_LIMIT, Outcome, OutcomeKind

USER_AGENT = f"estafeta/{__version__}"
_BODY_LIMIT = 64 * 1024  # a send answer is a few hundred bytes; never read a huge one


class ProviderClient(Protocol):
    """Sends one message through one provider account; implemented per provider."""

    async def send(self, message: OutboundMessage) -> Outcome:
        """One attempt; never raises for a failure of the provider or the network."""
        ...


@dataclass(frozen=True, slots=True)
class Reply:
    """A provider's HTTP answer, read (up to 64 KiB) and timed."""

    status: int
    body: bytes
    retry_after_s: float | None = None  # from Retry-After, when sent and readable
    duration_ms: float = 0.0

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def basic_auth(user: str, password: str) -> str:
    """An `Authorization: Basic …` value (Twilio, contracts §2.4)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def exchange(
    session: aiohttp.ClientSession,
    url: str,
    *,
    timeout_s: float,
    headers: dict[str, str],
    body: bytes,
    method: str = "POST",
    secrets: tuple[str, ...] = (),
) -> Reply | Outcome:
    """One request; the answer as a `Reply`, or an `Outcome` when there was no answer.

    `secrets` are credentials in the URL (Z-API's instance token): a provider may echo the
    path it was called on, and what it answered becomes an attempt's stored, shown excerpt,
    so they are masked in the answer. An error that names the URL shows only its origin
    already (`connectors/exchange.py`).
    """
    started = time.perf_counter()
    outcome = await _exchange(session, url, timeout_s, headers, body, method, started)
    if isinstance(outcome, Outcome):
        return outcome
    for secret in filter(None, secrets):
        outcome = dataclasses.replace(outcome, body=outcome.body.replace(secret.encode(), b"***"))
    return outcome


async def _exchange(
    session: aiohttp.ClientSession,
    url: str,
    timeout_s: float,
    headers: dict[str, str],
    body: bytes,
    method: str,
    started: float,
) -> Reply | Outcome:
    # identity: the shared session does not decompress (connectors/http.py), and a
    # compressed error body would hide the provider's code.
    headers = {
        "user-agent": USER_AGENT,
        "accept": "application/json",
        "accept-encoding": "identity",
        **headers,
    }
    answer = await http_exchange(
        session,
        method,
        url,
        headers=headers,
        body=body,
        timeout_s=timeout_s,
        read_limit=_BODY_LIMIT,
    )
    if isinstance(answer, Outcome):
        return answer
    return Reply(
        status=answer.status,
        body=answer.body,
        retry_after_s=parse_retry_after(answer.retry_after, int(time.time() * 1000)),
        duration_ms=answer.duration_ms,
    )


def success(reply: Reply, external_id: str | None, alt_id: str | None = None) -> Outcome:
    """The provider accepted the message; `external_id` is its id for it, `alt_id` a second
    one some of its status webhooks name instead. The answer's excerpt is kept, as every
    attempt's is (DESIGN §2)."""
    return Outcome(
        kind=OutcomeKind.SUCCESS,
        duration_ms=reply.duration_ms,
        status_code=reply.status,
        external_id=external_id,
        external_alt_id=alt_id if alt_id != external_id else None,
        response_excerpt=reply.text()[:EXCERPT_LIMIT],
    )


def provider_error(
    reply: Reply,
    kind: OutcomeKind,
    provider: str,
    code: int | str | None,
    title: str | None,
    *,
    throttled: bool = False,
) -> Outcome:
    """A failure the provider answered: `{provider}_{code}` and a `{code} {title}` excerpt.

    Without a code, the class is `{provider}_http_{status}` and the first line
    `{status} {title or the status's phrase}`. A retryable failure keeps Retry-After.
    `throttled`: the provider's code says "slow down" (a rate limit), whatever the status.
    """
    if code is None or code == "":
        error_class = f"{provider}_http_{reply.status}"
        head = f"{reply.status} {title or _phrase(reply.status)}".rstrip()
    else:
        error_class = f"{provider}_{code}"
        head = f"{code} {title or ''}".rstrip()
    head = " ".join(head.split())  # one line, whatever the provider's title holds
    body = reply.text().strip()
    excerpt = f"{head}\n{body}" if body else head
    return Outcome(
        kind=kind,
        duration_ms=reply.duration_ms,
        status_code=reply.status,
        error_class=error_class,
        retry_after_s=reply.retry_after_s if kind is OutcomeKind.RETRYABLE else None,
        response_excerpt=excerpt[:EXCERPT_LIMIT],
        throttled=kind is OutcomeKind.RETRYABLE and (throttled or reply.status == 429),
    )


def no_message_id(reply: Reply, provider: str, expected: str, name: str) -> Outcome:
    """A 2xx without the message id every send answer of the provider carries: not the
    provider's answer (a proxy's or captive portal's page, a wrong `api_base`), so nothing
    says the message was taken. Taken for a success, it stayed `sent` for good with no id
    for its statuses to name; RETRYABLE instead, and a failure of the destination (like a
    5xx, its circuit opens when every send is answered so, and the messages wait)."""
    title = f"{reply.status} without {expected}: not {name}'s answer"
    return provider_error(reply, OutcomeKind.RETRYABLE, provider, "no_message_id", title)


def refused(error_class: str, reason: str) -> Outcome:
    """A message this provider cannot send at all: PERMANENT, without a request."""
    return Outcome(
        kind=OutcomeKind.PERMANENT,
        duration_ms=0.0,
        error_class=error_class,
        response_excerpt=reason[:EXCERPT_LIMIT],
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def join_url(base: str, path: str) -> str:
    """`base` (with or without a trailing slash) + `/` + `path`."""
    return base.rstrip("/") + "/" + path.lstrip("/")

"""What the fake provider servers share: a real aiohttp server and planned misbehaviour.

Every fake (`meta`, `twilio`, `zapi`, `sendpulse`) listens on 127.0.0.1 (port 0 by default),
checks credentials and the request as the provider documents, records each send it accepts
in `sent` with the id it issued, and answers the way a test plans:

    fake.fail_next(2, 503)          # two 503s with the provider's error body, then normal
    fake.throttle_next(1, retry_after_s=2)
    fake.reject_next(131047)        # the provider's permanent error with that code
    fake.slow(5)                    # every answer waits 5 s (slow(0) undoes it)

Planned answers queue up in the order planned and are used by requests that pass the
credential and validation checks (a bad request is answered as such and uses none). Then
`await fake.send_status(hub_url, message_id, "delivered", duplicate=True)` posts the
provider's status webhook for that message to the hub, signed as the provider signs it,
twice when asked (providers re-deliver); `status_webhook(...)` is the same request as a
value, for tests that hand it to the ingress parsers directly.

The hub's answer to each webhook is judged as the provider judges it (`webhook_problem`):
one the provider would not count as delivered is recorded in `webhook_failures`, and a
provider that retries (Meta, contracts §1.3) posts it again at once, at most
`webhook_redeliveries` times (counted in `redeliveries`; no waiting). A test asserts
`fake.webhook_failures == []` to know the hub answered as the provider expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import orjson
from aiohttp import web

from estafeta.testing.server import LocalServer


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A send the fake accepted: the id it issued, and the request as parsed."""

    message_id: str
    path: str
    # The JSON object, or (Twilio) the form: each name → its value, or list when repeated.
    request: dict[str, Any]
    headers: dict[str, str]  # lower-case names


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer of a fake."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=self.body,
            headers=dict(self.headers),
            content_type=self.content_type,
        )


@dataclass(frozen=True, slots=True)
class StatusWebhook:
    """A webhook (a status, or Twilio's incoming message) exactly as the provider would POST
    it."""

    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class WebhookFailure:
    """A hub answer to a webhook that the provider would not take as delivered."""

    url: str
    kind: str  # "status", or "incoming" (a message from the customer)
    status: int
    content_type: str  # the answer's media type, lower case, "" when none
    error: str  # the provider's name for it: "http_status", or Twilio's debugger code
    reason: str


def json_answer(status: int, document: object, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, orjson.dumps(document), dict(headers or {}))


def retry_after(seconds: float | None) -> dict[str, str]:
    return {} if seconds is None else {"Retry-After": f"{seconds:g}"}


def with_token(url: str, token: str | None) -> str:
    """`url` with `?token=<token>` (DESIGN §3.2: Z-API and SendPulse webhooks carry the
    source's token in the URL), unless `token` is None or the URL already has one."""
    query = urlsplit(url).query
    if token is None or "token" in parse_qs(query):
        return url
    return f"{url}{'&' if query else '?'}{urlencode({'token': token})}"


def hex_id(length: int, *, upper: bool = True) -> str:
    """`length` random hex characters."""
    value = secrets.token_hex((length + 1) // 2)[:length]
    return value.upper() if upper else value


class RateWindow:
    """At most `limit` events in any `period_s` seconds (a sliding window); `limit` None
    means no limit. `allows` only looks; `take` records an event."""

    def __init__(self, limit: int | None, period_s: float = 1.0) -> None:
        self.limit = limit
        self.period_s = period_s
        self._times: deque[float] = deque()

    def allows(self, now: float) -> bool:
        if self.limit is None:
            return True
        while self._times and self._times[0] <= now - self.period_s:
            self._times.popleft()
        return len(self._times) < self.limit

    def take(self, now: float) -> None:
        if self.limit is not None:
            self._times.append(now)


class PairLimit:
    """One event per `interval_s` per key, with bursts of up to `burst` events borrowed from
    the future quota (GCRA: each event pushes the key's theoretical time on by
    `interval_s`; an event is allowed while that stays within `burst * interval_s` of now).
    `burst` None means no limit."""

    def __init__(self, interval_s: float, burst: int | None) -> None:
        self.interval_s = interval_s
        self.burst = burst
        self._due: dict[Hashable, float] = {}

    def allows(self, key: Hashable, now: float) -> bool:
        if self.burst is None:
            return True
        due = max(self._due.get(key, now), now)
        return due + self.interval_s - now <= self.burst * self.interval_s + 1e-9

    def take(self, key: Hashable, now: float) -> None:
        if self.burst is not None:
            self._due[key] = max(self._due.get(key, now), now) + self.interval_s


class FakeProvider(LocalServer):
    """The shared machinery; a subclass adds its routes and its documented answers."""

    #: How many more times a webhook the hub did not take is posted; none by default:
    #: Twilio retries no answer (contracts §2.5), Z-API and SendPulse document no retry.
    webhook_redeliveries = 0

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[SentMessage] = []
        self.webhook_failures: list[WebhookFailure] = []  # answers the provider refuses
        self.redeliveries = 0  # webhooks posted again after such an answer
        self.requests = 0  # requests that reached a send endpoint, whatever the answer
        self._planned: deque[Answer] = deque()
        self._delay_s = 0.0
        self._late_s = 0.0
        # The clock the enforced limits (rates, token lifetimes) read; a test may swap it.
        self.clock: Callable[[], float] = time.monotonic

    # -- misbehaviour ------------------------------------------------------------------------

    def fail_next(
        self, n: int = 1, status: int = 500, body: bytes | Mapping[str, Any] | None = None
    ) -> None:
        """The next `n` sends get `status`, with `body` or the provider's body for it."""
        if body is None:
            answer = self.error_answer(status)
        else:
            raw = body if isinstance(body, bytes) else orjson.dumps(body)
            answer = Answer(status, raw)
        self._plan(n, answer)

    def throttle_next(self, n: int = 1, *, retry_after_s: float | None = None) -> None:
        """The next `n` sends get the provider's throttling answer (+ Retry-After if given)."""
        self._plan(n, self.throttle_answer(retry_after_s))

    def reject_next(self, code: int | str, n: int = 1) -> None:
        """The next `n` sends get the provider's permanent error `code`."""
        self._plan(n, self.reject_answer(code))

    def slow(self, seconds: float) -> None:
        """Every answer from now on waits `seconds` first; `slow(0)` stops it."""
        self._delay_s = max(0.0, seconds)

    def answer_late(self, seconds: float) -> None:
        """Every send from now on is handled (an accepted message is in `sent`) and only then
        answered, `seconds` later: a client that gives up before has lost the answer of a
        message the provider took. `answer_late(0)` stops it."""
        self._late_s = max(0.0, seconds)

    def _plan(self, n: int, answer: Answer) -> None:
        self._planned.extend(answer for _ in range(n))

    # -- what a subclass provides -------------------------------------------------------------

    @abstractmethod
    def error_answer(self, status: int) -> Answer:
        """The provider's documented error body for an HTTP status."""

    @abstractmethod
    def throttle_answer(self, retry_after_s: float | None) -> Answer:
        """The provider's documented throttling answer."""

    @abstractmethod
    def reject_answer(self, code: int | str) -> Answer:
        """The provider's answer refusing a send with this error code."""

    @abstractmethod
    def status_webhook(self, hub_url: str, message_id: str, status: str) -> StatusWebhook:
        """The status webhook the provider would post to the hub."""

    # -- for the handlers ----------------------------------------------------------------------

    async def arrive(self, *, count: bool = True) -> None:
        """Count a send request (unless not `count`) and wait as `slow` says (cut short by
        `stop`)."""
        if count:
            self.requests += 1
        if self._delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._delay_s)

    async def answer(self, answer: Answer) -> web.Response:
        """`answer` as the response, after the wait `answer_late` asks for."""
        if self._late_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._late_s)
        return answer.response()

    def planned(self) -> Answer | None:
        """The next planned answer, if any."""
        return self._planned.popleft() if self._planned else None

    def record(self, message_id: str, request: web.Request, parsed: dict[str, Any]) -> None:
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.sent.append(SentMessage(message_id, request.path, parsed, headers))

    def find(self, message_id: str) -> SentMessage | None:
        """The accepted send that got `message_id`."""
        return next((sent for sent in self.sent if sent.message_id == message_id), None)

    # -- status webhooks -----------------------------------------------------------------------

    def webhook_problem(
        self, kind: str, status: int, content_type: str, body: bytes
    ) -> tuple[str, str] | None:
        """(error, reason) when the provider would not count this answer to a webhook of
        `kind` as delivered; None when it would. By default any 2xx is delivered (what Z-API
        and SendPulse are taken to expect: neither documents it, contracts §3.1, §9.3)."""
        if 200 <= status <= 299:
            return None
        return "http_status", f"HTTP {status} is not a 2xx"

    async def send_status(
        self, hub_url: str, message_id: str, status: str, *, duplicate: bool = False
    ) -> list[int]:
        """POST the status webhook to `hub_url` (twice when `duplicate`); the hub's statuses,
        redeliveries included."""
        hook = self.status_webhook(hub_url, message_id, status)
        return await self.post_webhook(hook, "status", duplicate=duplicate)

    async def post_webhook(
        self, hook: StatusWebhook, kind: str, *, duplicate: bool = False
    ) -> list[int]:
        """POST `hook` (twice when `duplicate`), judging each answer as the provider does and
        posting again what it would redeliver; the statuses of every answer, in order."""
        answers: list[int] = []
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(2 if duplicate else 1):
                for attempt in range(1 + self.webhook_redeliveries):
                    if attempt:
                        self.redeliveries += 1
                    async with session.post(
                        hook.url, data=hook.body, headers=hook.headers
                    ) as reply:
                        body = await reply.read()
                        answers.append(reply.status)
                        content_type = media_type(reply.headers.get("Content-Type", ""))
                    problem = self.webhook_problem(kind, reply.status, content_type, body)
                    if problem is None:
                        break
                    error, reason = problem
                    self.webhook_failures.append(
                        WebhookFailure(hook.url, kind, reply.status, content_type, error, reason)
                    )
        return answers


def media_type(content_type: str) -> str:
    """`text/xml` of `text/XML; charset=utf-8`; "" when there is none."""
    return content_type.split(";", 1)[0].strip().lower()

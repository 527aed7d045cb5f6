"""The hub: the configuration, the store and the pieces built from them, wired once.

`Hub.accept` (one event) and `Hub.accept_all` (the events of one webhook) are the one way an
event enters estafeta, whichever door it came through (a provider webhook, a generic source,
the events API): it is made canonical and routed (`Hub.new_event`), and committed together
with its deliveries before the caller gets an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any, Required, TypedDict, Unpack

import orjson
import structlog

from estafeta.clock import Clock, SystemClock, iso_from_ms
from estafeta.config import Config, SourceConfig
from estafeta.delivery.breakers import circuit_state_store
from estafeta.delivery.circuit_store import close_circuits
from estafeta.delivery.handoff import Handoff
from estafeta.delivery.model import LeasedDelivery
from estafeta.errors import HttpError, StoreError, StoreUnavailable
from estafeta.ids import new_id
from estafeta.ingress.generic import GenericSource
from estafeta.ingress.providers.base import ProviderSource, source_for
from estafeta.ingress.ratelimit import TenantRateLimiter
from estafeta.ingress.spool import Spool
from estafeta.messaging.facts import (
    ESCALATED_TYPE,
    SEND_TYPE,
    Facts,
    digits,
    facts_of,
    send_destination,
    storable,
)
from estafeta.messaging.outbound import SEND_PRIORITY
from estafeta.observability.log_throttle import LogThrottle
from estafeta.observability.metrics import EVENTS_ACCEPTED, series
from estafeta.observability.refusals import Refusals
from estafeta.observability.unrouted import Unrouted
from estafeta.redis_client import connect_redis
from estafeta.routing.router import Router, Target
from estafeta.store.group_commit import GroupCommitter
from estafeta.store.ingest import event_key
from estafeta.store.records import (
    InsertResult,
    NewDelivery,
    NewEscalation,
    NewEvent,
    NewMessage,
)
from estafeta.store.sqlstore import SqlStore

log = structlog.get_logger("estafeta.hub")


API_SOURCE = "api"  # the source id of events that come through the API, not a webhook

# After the store failed, ingress spools straight away for this long before it tries the
# store again: a request must not wait for a connection timeout while the store is down.
STORE_RETRY_S = 1.0
# `events_spooled`'s `error` for events spooled while the store answers (Hub.accept_all).
SPOOLED_BEHIND = "earlier events of their ordering_key wait in the spool"


class EventFields(TypedDict, total=False):
    """What an event is made of, as the door it came through gives it (`Hub.new_event`)."""

    tenant_id: Required[str]
    source_id: Required[str]
    event_type: Required[str]
    data: Required[dict[str, Any]]
    idempotency_key: Required[str | None]
    occurred_at: int | None
    priority: int | None
    ordering_key: str | None
    raw: str | None
    extra_targets: Sequence[Target]
    message: NewMessage | None
    escalation: NewEscalation | None
    event_id: str | None


def ordering_keys(events: Sequence[NewEvent]) -> list[tuple[str, str]]:
    """The (destination, ordering key) of each of the events' deliveries that has one: the
    keys its batch must not commit ahead of (store/group_commit.py)."""
    keys: list[tuple[str, str]] = []
    for event in events:
        for delivery in event.deliveries:
            if delivery.ordering_key is not None:
                keys.append((delivery.destination_id, delivery.ordering_key))
    return keys


class SpoolTurn:
    """A spooling request's place in line (Hub._spool): `queued` is set once its events are
    queued for the journal. One that ended before (its lookup failed, or it was cancelled)
    sets it with `before`, the turn it was waiting for, which the next one waits for
    instead: the next must not be journaled ahead of the request before it either."""

    __slots__ = ("before", "queued")

    def __init__(self) -> None:
        self.queued = asyncio.Event()
        self.before: SpoolTurn | None = None

    def pass_on(self, previous: SpoolTurn) -> None:
        """Ended before its turn: the next waits for `previous` (or what it waits for)."""
        before: SpoolTurn | None = previous
        while before is not None and before.queued.is_set():  # no chain of passed turns
            before = before.before
        self.before = before
        self.queued.set()

    async def wait(self) -> None:
        """Until this request queued its events, or ended and the one before it did."""
        turn: SpoolTurn | None = self
        while turn is not None:
            await turn.queued.wait()
            turn = turn.before


class Hub:
    def __init__(
        self,
        config: Config,
        store: SqlStore,
        clock: Clock | None = None,
        *,
        spool: Spool | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self._store_down_until = 0.0
        self._store_down_error = ""  # why the store was last found down: see _spool
        # Set as a request finds the store unreachable (then replaced): see _stored_ids.
        self._store_found_down = asyncio.Event()
        # Keys whose first event is being journaled, set once it is (or failed): see _spool.
        self._spooling: dict[tuple[str, str, str], asyncio.Event] = {}
        # The turn of the request spooling last: see _spool.
        self._spool_turn = SpoolTurn()
        self._spool_turn.queued.set()
        self.clock: Clock = clock or SystemClock()
        self.router = Router(config)
        # The shared Redis when configured: circuits and the tenants' inbound rate limits
        # live there, /health/detailed pings it.
        self.redis = connect_redis(config.redis.url) if config.redis.url else None
        self.rate_limiter = TenantRateLimiter(
            config, redis=self.redis, key_prefix=config.redis.key_prefix
        )
        # Plain dicts: pydantic's attribute access is measurable on the ingest hot path.
        self.sources = {s.id: s for s in config.sources}
        # How each source verifies and parses what it receives, by source id.
        self.source_handlers: dict[str, ProviderSource] = {
            s.id: GenericSource(s) if s.kind == "generic" else source_for(s) for s in config.sources
        }
        # The source of each (kind, number): a Meta app or a Twilio account posts every
        # number's webhooks to one URL, which may be another tenant's source
        # (ingress/endpoint.py: `owned`). The loader refuses a number in two sources.
        self.numbers: dict[tuple[str, str], SourceConfig] = {}
        for s in config.sources:
            if (number := s.own_number()) is not None:
                self.numbers.setdefault((s.kind, number), s)
        # SQLite has one writer: a second concurrent flush would only wait for the lock.
        # PostgreSQL commits up to 4 batches at once, a second only once 16 events wait.
        flushes = 1 if store.dialect == "sqlite" else 4
        # One item per request: a webhook's events share one transaction, whatever else
        # shares its batch (see accept_all).
        self._ingest: GroupCommitter[Sequence[NewEvent], list[InsertResult]] = GroupCommitter(
            self._store_batch,
            max_batch=500,
            max_concurrent_flushes=flushes,
            min_parallel_batch=16,
            # A store that has not committed a request's events by then counts as
            # unreachable for it: spooled and answered while the provider still waits,
            # not after the driver's 30 s statement timeout (store/group_commit.py).
            give_up_after_s=config.storage.spool_after_s,
            # A key's later event must not commit in a batch beside the running one that
            # holds its earlier event: a worker could lease the later one first.
            keys_of=ordering_keys,
        )
        # Where circuits are shared, read by /health/detailed and /metrics.
        self.circuit_states = circuit_state_store(config, store, self.redis)
        # Set whenever deliveries are committed pending, so in-process workers wake at once.
        self.deliveries_ready = asyncio.Event()
        # The worker in this process, if one runs, takes fresh deliveries as they are stored.
        self.handoff = Handoff()
        # Webhooks refused at /in/, counted and logged (a provider's rotated secret).
        self.refusals = Refusals(clock=self.clock)
        self.unrouted = Unrouted()
        # `store_unavailable`/`store_failed` lines of the API's and ingest's 503s and 500s,
        # by (side, error): an outage, or a role that may not write, refuses every request;
        # the log says so once a minute (log_throttle.py).
        self.unavailable_lines = LogThrottle()
        # `webhook_of_another_tenants_number` (ingress/endpoint.py: `owned`), as few.
        self.foreign_number_lines = LogThrottle()

    def log_store_error(self, side: str, exc: StoreError) -> None:
        """A request of `side` (`ingest`, `api`) met `exc`: a line a minute of each kind.
        Unreachable is the spool's to cover; anything else (a write refused to the role,
        42501) is the operator's to fix, and was logged as a bug, a traceback a request."""
        unlogged = self.unavailable_lines.due((side, str(exc)))
        if unlogged is None:
            return
        if isinstance(exc, StoreUnavailable):
            log.warning("store_unavailable", error=str(exc), count=unlogged)
        else:
            log.error("store_failed", error=str(exc), count=unlogged)

    def new_event(
        self,
        *,
        tenant_id: str,
        source_id: str,
        event_type: str,
        data: dict[str, Any],
        idempotency_key: str | None,
        occurred_at: int | None = None,
        priority: int | None = None,
        ordering_key: str | None = None,
        raw: str | None = None,
        extra_targets: Sequence[Target] = (),
        message: NewMessage | None = None,
        escalation: NewEscalation | None = None,
        event_id: str | None = None,
    ) -> NewEvent:
        """The event as it will be stored: made canonical and routed, its deliveries named.

        `extra_targets` are deliveries the event needs whatever the routes say (a message
        send goes to its provider); `message` and `escalation` are stored with the event.
        """
        now = self.clock.now_ms()
        event_id = event_id or new_id("evt", now)
        occurred = occurred_at if occurred_at is not None else now
        canonical = {
            "id": event_id,
            "type": event_type,
            "tenant": tenant_id,
            "source": source_id,
            "occurred_at": iso_from_ms(occurred),
            "received_at": iso_from_ms(now),
            "data": data,
        }
        targets = [
            *extra_targets,
            *self.router.targets(
                tenant_id, canonical, priority=priority, ordering_key=ordering_key
            ),
        ]
        # Only a message queued here (`send_message`) is a sent message: an event published
        # with the type `message.send` (POST /api/v1/events, a generic source) sends
        # nothing, so it must count nothing in the conversation it names.
        facts = facts_of(event_type, data) if event_type != SEND_TYPE or message else Facts()
        return NewEvent(
            id=event_id,
            tenant_id=tenant_id,
            source_id=source_id,
            type=event_type,
            idempotency_key=None if idempotency_key is None else storable(idempotency_key),
            occurred_at=occurred,
            received_at=now,
            payload=orjson.dumps(canonical).decode(),
            deliveries=tuple(
                NewDelivery(
                    id=new_id("dlv", now),
                    destination_id=t.destination_id,
                    priority=t.priority,
                    max_attempts=t.max_attempts,
                    ordering_key=t.ordering_key,
                )
                for t in targets
            ),
            raw=raw,
            conversation_id=facts.conversation_id,
            message_ref=facts.message_ref,
            direction=facts.direction,
            contact_name=facts.contact_name,
            message=message,
            escalation=escalation,
        )

    async def accept(self, **fields: Unpack[EventFields]) -> InsertResult:
        """Store one event and its deliveries durably; returns its id (or the original's)."""
        (result,) = await self.accept_all((self.new_event(**fields),))
        return result

    async def accept_all(self, events: Sequence[NewEvent]) -> list[InsertResult]:
        """Store the events of one request durably, all in one transaction or none: a
        webhook is answered for all its events or refused for all, so the sender's retry
        stores each exactly once. When the store is unreachable they go to the spool."""
        if not events:  # a webhook that says nothing we use
            return []
        if self.spool is not None:
            if time.monotonic() < self._store_down_until:
                return await self._spool(events, self._store_down_error)
            if self.spool.holds_order_of(events):
                try:
                    return await self._spool(events, SPOOLED_BEHIND, store_answers=True)
                except HttpError:
                    # Full, or its disk failing: the store answers, so the events are stored
                    # out of their key's order rather than refused (a 503 says the store is
                    # unreachable, and a sender that does not retry, Twilio, loses them).
                    spooled = self._spooled_originals(events)
                    if spooled:
                        return await self._store_beside(events, spooled)
            elif self.spool.holds_keys and (spooled := self._spooled_originals(events)):
                return await self._store_beside(events, spooled)
        try:
            results = await self._ingest.submit(events)
        except StoreUnavailable as exc:
            if self.spool is None:
                raise
            self._store_down_until = time.monotonic() + STORE_RETRY_S
            self._store_down_error = str(exc)
            self._store_found_down.set()
            self._store_found_down = asyncio.Event()
            return await self._spool(events, self._store_down_error)
        for event, result in zip(events, results, strict=True):
            self._count(event, "duplicate" if result.duplicate else "stored")
        return results

    def _spooled_originals(self, events: Sequence[NewEvent]) -> dict[int, InsertResult]:
        """The events (by position) whose idempotency key this process has spooled and the
        drain not imported yet, each answered as its spooled original."""
        assert self.spool is not None  # noqa: S101 - callers check
        found: dict[int, InsertResult] = {}
        for i, event in enumerate(events):
            original = self.spool.undrained_id(
                event.tenant_id, event.source_id, event.idempotency_key
            )
            if original is not None:
                found[i] = InsertResult(original, duplicate=True, spooled=True)
        return found

    async def _store_beside(
        self, events: Sequence[NewEvent], spooled: dict[int, InsertResult]
    ) -> list[InsertResult]:
        """Store the events but the repeats of `spooled` ones, answered as their originals:
        the store has not those yet, and would keep a repeat as new, the drain then dropping
        the original whose id was answered. In the request's order; off the hot path."""
        rest = [e for i, e in enumerate(events) if i not in spooled]
        stored = iter(await self._ingest.submit(rest) if rest else [])
        results: list[InsertResult] = []
        for i, event in enumerate(events):
            result = spooled.get(i) or next(stored)
            self._count(event, "duplicate" if result.duplicate else "stored")
            results.append(result)
        return results

    def _count(self, event: NewEvent, outcome: str) -> None:
        """One event accepted (`stored`, `spooled`, or a `duplicate` of one already)."""
        series(EVENTS_ACCEPTED, event.source_id, outcome).inc()
        self.refusals.accepted(event.source_id)
        if not event.deliveries and outcome != "duplicate":
            self.unrouted.note(event.tenant_id, event.source_id, event.type)

    async def _store_batch(
        self, requests: Sequence[Sequence[NewEvent]]
    ) -> list[list[InsertResult]]:
        """Commit the events of a batch of requests (the group committer's flush), answered
        request by request. Deliveries the in-process worker may take are stored leased to
        it and handed over once committed (delivery/handoff.py); the worker is woken for
        those stored pending."""
        events = requests[0] if len(requests) == 1 else [e for r in requests for e in r]
        results = await self._store_events(events)
        answers: list[list[InsertResult]] = []
        start = 0
        for request in requests:
            answers.append(results[start : start + len(request)])
            start += len(request)
        return answers

    async def _store_events(self, events: Sequence[NewEvent]) -> list[InsertResult]:
        reservation = self.handoff.reserve(events)
        if reservation is None:
            results = await self.store.insert_events(events)
            some_pending = True
        else:
            try:
                results = await self.store.insert_events(reservation.events)
            except BaseException:
                reservation.cancel()
                raise
            leased, taken = reservation.settle(results)
            if not taken:  # the worker is stopping: any worker may lease them
                await self._give_back(leased)
            some_pending = reservation.leaves_pending or not taken
        if some_pending:
            stored = zip(events, results, strict=True)
            if any(event.deliveries and not result.duplicate for event, result in stored):
                self.deliveries_ready.set()
        return results

    async def _give_back(self, leased: list[LeasedDelivery]) -> None:
        """Leases the worker did not take, made pending again. The batch is committed
        whatever happens here: if this fails, the leases expire and are rescued."""
        try:
            await self.store.release(leased, self.clock.now_ms())
        except Exception as exc:
            # Any error, not only an unreachable store: raised from here, it would fail the
            # requests of a committed batch, which the group committer would store again.
            log.warning(
                "handed_leases_not_released", count=len(leased), error_class=type(exc).__name__
            )

    async def send_message(
        self,
        *,
        tenant_id: str,
        source_id: str,
        to: str,
        content: dict[str, Any],
        idempotency_key: str | None,
        priority: int = SEND_PRIORITY,
    ) -> tuple[str | None, InsertResult]:
        """Queue a WhatsApp message through a provider source: a `message.send` event whose
        delivery goes to `send:<source>`, one customer's messages strictly in order.
        Returns the message id: for a repeated idempotency key the original message's, or
        None when the key was first used by an event that is not a message send (published
        through `POST /api/v1/events`, which shares the tenant's keys)."""
        now = self.clock.now_ms()
        message_id = new_id("msg", now)
        source = self.sources[source_id]
        event = self.new_event(
            tenant_id=tenant_id,
            source_id=API_SOURCE,
            event_type=SEND_TYPE,
            # `conversation_id` as the customer's own messages carry it: whoever routes
            # `message.*` finds the reply in the customer's conversation.
            data={
                "message_id": message_id,
                "source": source_id,
                "to": to,
                "conversation_id": digits(to),
                **content,
            },
            idempotency_key=idempotency_key,
            extra_targets=[
                Target(
                    destination_id=send_destination(source_id),
                    priority=priority,
                    max_attempts=source.send_max_attempts,
                    ordering_key=digits(to),
                )
            ],
            message=NewMessage(
                id=message_id,
                source_id=source_id,
                recipient=to,
                content=orjson.dumps(content).decode(),
            ),
        )
        (result,) = await self.accept_all((event,))
        if result.duplicate:
            if result.spooled and self.spool is not None:
                # The original waits in the spool: the store (down) does not know it yet.
                key = event.idempotency_key  # as stored (`storable`)
                return self.spool.spooled_message_id(tenant_id, API_SOURCE, key), result
            return await self.store.message_id_for_event(result.event_id), result
        return message_id, result

    async def escalate(
        self,
        *,
        tenant_id: str,
        conversation_id: str,
        contact_name: str | None,
        reason: str,
        priority: int,
        actor: str,
        idempotency_key: str | None = None,
    ) -> InsertResult:
        """Hand a conversation to a human: `conversation.escalated`, routed like any event.
        `priority` is the human's urgency, in the event and the conversation; its deliveries
        take their routes' priority. A repeated `idempotency_key` (one of the tenant's `api`
        keys) answers the original event, storing nothing."""
        now = self.clock.now_ms()
        return await self.accept(
            tenant_id=tenant_id,
            source_id=API_SOURCE,
            event_type=ESCALATED_TYPE,
            data={
                "conversation_id": conversation_id,
                "contact_name": contact_name,
                "reason": reason,
                "priority": priority,
                "escalated_by": actor,
            },
            idempotency_key=idempotency_key,
            escalation=NewEscalation(
                id=new_id("esc", now), reason=reason, priority=priority, actor=actor
            ),
        )

    async def _spool(
        self, events: Sequence[NewEvent], reason: str, *, store_answers: bool = False
    ) -> list[InsertResult]:
        """Journal the events locally, in one write: all of them, or none and a 503, as the
        store commits them; they reach the store when the drainer imports them. A key this
        process spooled before, or repeated within the request, is one event, as the store
        answers it; a key another request is journaling right now waits for it first. With
        `store_answers` (events spooled behind their key's, the store up), a key the store
        already has is answered as its original too. `reason`: why, for `events_spooled`."""
        assert self.spool is not None  # noqa: S101 - callers check
        # Journaled in the order the requests came, whatever the waits below end first: a
        # key's events spooled behind it keep their order, which the drain's chunks keep.
        previous, turn = self._spool_turn, SpoolTurn()
        self._spool_turn = turn
        try:
            return await self._spool_in_turn(events, reason, previous, turn, store_answers)
        finally:
            if not turn.queued.is_set():
                turn.pass_on(previous)  # ended before its turn: failed, or cancelled

    async def _spool_in_turn(
        self,
        events: Sequence[NewEvent],
        reason: str,
        previous: SpoolTurn,
        turn: SpoolTurn,
        store_answers: bool,
    ) -> list[InsertResult]:
        assert self.spool is not None  # noqa: S101 - callers check
        keys = {event_key(e) for e in events if e.idempotency_key is not None}
        stored: dict[tuple[str, str, str], str] = {}
        if store_answers and keys:
            # Journaled anew, a repeat would be answered with an id the drain then drops as
            # a duplicate: one that never exists. Unknown if the store fails or hangs now,
            # as in an outage (http-api.md): bounded as a commit is, the sender waiting, and
            # no longer waited for once another request finds the store unreachable.
            with contextlib.suppress(StoreUnavailable, TimeoutError):
                async with asyncio.timeout(self.config.storage.spool_after_s):
                    stored = await self._stored_ids(
                        [e for e in events if e.idempotency_key is not None]
                    )
        await previous.wait()
        # A key an earlier request is journaling: answered with its id once it is durable,
        # or journaled here if that failed.
        while appending := [self._spooling[k] for k in keys if k in self._spooling]:
            await asyncio.gather(*(done.wait() for done in appending))
        results: list[InsertResult] = []
        new: list[NewEvent] = []
        duplicates: list[NewEvent] = []  # answered as the spooled original, counted as such
        first: dict[tuple[str, str, str], str] = {}  # key → the id of its first event here
        for event in events:
            key = None if event.idempotency_key is None else event_key(event)
            original = None if key is None else first.get(key)
            if original is None:
                original = self.spool.spooled_id(
                    event.tenant_id, event.source_id, event.idempotency_key
                )
            if original is not None:
                results.append(InsertResult(original, duplicate=True, spooled=True))
                duplicates.append(event)
                continue
            if key is not None and key in stored:
                results.append(InsertResult(stored[key], duplicate=True))
                duplicates.append(event)
                continue
            if key is not None:
                first[key] = event.id
            new.append(event)
            results.append(InsertResult(event.id, duplicate=False, spooled=True))
        done = asyncio.Event()
        for key in first:
            self._spooling[key] = done
        turn.queued.set()  # the next may queue its events: ours are queued at once below
        try:
            if new:
                await self.spool.append_all(new, reason=reason)
        finally:
            for key in first:
                del self._spooling[key]
            done.set()
        for event in new:
            self._count(event, "spooled")
        for event in duplicates:
            self._count(event, "duplicate")
        return results

    async def _stored_ids(self, events: Sequence[NewEvent]) -> dict[tuple[str, str, str], str]:
        """The store's `stored_ids_by_key`, or StoreUnavailable as soon as another request
        finds the store unreachable meanwhile: the requests spooled after this one wait for
        its answer (their turn), and one whose commit the store left unanswered for
        `spool_after_s` must not wait as long again."""
        found_down = asyncio.ensure_future(self._store_found_down.wait())
        lookup = asyncio.ensure_future(self.store.stored_ids_by_key(events))
        try:
            await asyncio.wait((lookup, found_down), return_when=asyncio.FIRST_COMPLETED)
        finally:
            found_down.cancel()
            lookup.cancel()  # if still waiting: cancelled, as by the bound, or the caller
        if not lookup.done():
            raise StoreUnavailable("the store was found unreachable meanwhile")
        return lookup.result()

    async def close(self) -> None:
        await self._ingest.close()
        if self.spool is not None:
            await self.spool.close()
        await self.rate_limiter.aclose()
        await close_circuits(self.circuit_states)
        if self.redis is not None:
            await self.redis.aclose()

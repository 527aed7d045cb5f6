"""The alerts of a `serve` process, checked every 5 s:

* `queue_backlog`: pending deliveries pile up past `worker.alert_queue_depth`. Ingress keeps
  accepting (what it accepts is durable); an operator must hear that delivery falls behind.
  It fires when the depth crosses the threshold and resolves when it is back under 90 % of
  it (hysteresis, so a queue hovering at the line does not flap).
* `dead_letters`: deliveries wait in the dead-letter queue (`worker.alert_dead_letters`, 1 by
  default). Nothing retries them on their own, and a permanent refusal (a CRM's expired
  token answering 401) sends every delivery there at its first attempt without opening the
  circuit: only this says so. It resolves once they are replayed or discarded.
* `spool_stalled`: the spool holds events, the store answers, and the drain has got nowhere
  for a minute (`spool_watch.STALL_S`): the drainer is stuck, keeps crashing or does not run.
  It resolves once the drain gets through (or the spool is empty), not when a store outage
  seen meanwhile gives the drain its minute again.
* `spool_unwritable`: no segment can be made in the spool's directory: the next store outage
  would be answered `503 spool_unavailable` instead of spooled.
* `spool_full`: the spool holds `storage.spool_max_bytes`: while the store cannot be reached,
  webhooks are answered `503 spool_full`, and providers retry them later or give up.
* `destination_down`: a destination's circuit has not closed for
  `worker.alert_destination_down_s`. Its deliveries wait pending without spending attempts
  (so nothing reaches the DLQ), and a small business's backlog may never reach
  `queue_backlog`'s depth: without this, a CRM down all day would go unheard. While Redis
  is unreachable the circuits are each process's own: a `serve` that delivers judges its
  own; one that does not (`--no-workers`) has only the copy it read before the outage, and
  holds the alert as it stood rather than fire or resolve on that.
* `store_down`: the store has not answered the monitor's read for `worker.alert_store_down_s`
  (unreachable, or refusing the read: a role without SELECT).
  The spool takes the webhooks meanwhile and the other alerts that read the store wait for
  it (`spool_stalled`, `no_workers`), so without this a database down all day was heard of
  only by a probe of /health/detailed. It resolves at the first read answered.
* `redis_down`: the configured Redis has not taken a write (of `<key_prefix>probe`: a full
  or read-only Redis answers a PING) for `worker.alert_redis_down_s`.
  Nothing is lost or stopped, but circuits and rate limits are kept per process meanwhile
  (N workers may send N times a destination's `rate_limit`): an operator must hear of it
  even when nothing else goes wrong. It resolves when Redis takes a write again.
* `no_workers`: deliveries wait and no process (`estafeta worker`, or a `serve` with its
  workers, this one included) has delivered for `worker.alert_no_workers_s`, by the store's
  record of processes (delivery/presence.py): none runs, or each one's delivery task keeps
  crashing. Ingest goes on accepting, so without this a worker that never started or keeps
  crashing was heard of only once the backlog reached `queue_backlog`'s depth, days later
  at a clinic's traffic. The time counts from this process's start, and from the last
  time it found the store unreachable (processes cannot record themselves then), at the
  earliest: those put firing off, never resolve it. It resolves when one delivers again or
  nothing waits.
* `webhooks_refused`: a source's webhooks have been refused (a bad signature, a body it
  cannot read, the tenant's rate limit …) for `worker.alert_webhooks_refused_s`, at least
  `MIN_REFUSED` of them and none of its events accepted since the first, by this process's
  count (observability/refusals.py). A provider whose app secret or auth token was rotated
  retries for a while, or not at all (Twilio), and then its messages are lost: the log's
  `ingest_refused` lines said so once a minute, no alert did. A stray bad request or two
  do not fire it. It resolves when an event of the source is accepted (or its handshake
  answered, or a verified webhook that carries no event).

Each fires once and resolves once; both are log events (`alert_fired` / `alert_resolved`),
the `estafeta_alert_firing` gauge, and a line in /health/detailed. `destination_down` does
so per destination (its log events name it), the gauge and the line while any is down;
`webhooks_refused` likewise per source.
Sending alerts elsewhere is the alerting issue's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from typing import Any

import structlog
from redis.asyncio import Redis

from estafeta.clock import Clock, SystemClock, iso_from_ms
from estafeta.config.models import DEFAULT_REDIS_KEY_PREFIX
from estafeta.delivery.circuit import CircuitState
from estafeta.delivery.circuit_store import CircuitStateStore, current_circuits
from estafeta.errors import StoreError
from estafeta.ingress.spool import Spool
from estafeta.observability.metrics import ALERTS
from estafeta.observability.reads import redis_unwritable, within
from estafeta.observability.refusals import Refusals
from estafeta.observability.spool_watch import STALL_S, SpoolStatus, observe
from estafeta.store.records import QueueDepths
from estafeta.store.sqlstore import SqlStore
from estafeta.store.views import QUEUE_COUNT_LIMIT

log = structlog.get_logger("estafeta.alerts")

BACKLOG = "queue_backlog"
DEAD_LETTERS = "dead_letters"
SPOOL_STALLED = "spool_stalled"
SPOOL_UNWRITABLE = "spool_unwritable"
SPOOL_FULL = "spool_full"
SPOOL_ALERTS = (SPOOL_STALLED, SPOOL_UNWRITABLE, SPOOL_FULL)
DESTINATION_DOWN = "destination_down"
NO_WORKERS = "no_workers"
WEBHOOKS_REFUSED = "webhooks_refused"
REDIS_DOWN = "redis_down"
STORE_DOWN = "store_down"
# Every alert, in the runbook's order (docs/operations.md has a section for each).
EVERY_ALERT = (
    BACKLOG,
    DEAD_LETTERS,
    DESTINATION_DOWN,
    NO_WORKERS,
    WEBHOOKS_REFUSED,
    STORE_DOWN,
    REDIS_DOWN,
    *SPOOL_ALERTS,
)
# Refusals a source's streak needs before it can fire: not one stray request, nor two.
MIN_REFUSED = 3
RESOLVE_RATIO = 0.9


class KeyedAlert:
    """An alert raised per destination or per source: fired and resolved for each one, the
    gauge and /health/detailed's line standing while any one fires."""

    def __init__(self, alert: str, key: str) -> None:
        self.alert = alert
        self.key = key  # the name its log events give the destination or source
        self.keys: set[str] = set()  # those it fires for

    def resolve_all_but(self, present: Collection[str]) -> None:
        for gone in sorted(self.keys.difference(present)):
            self.keys.discard(gone)
            log.info("alert_resolved", alert=self.alert, **{self.key: gone})

    def fire(self, key: str, **fields: Any) -> None:
        if key not in self.keys:
            self.keys.add(key)
            log.warning("alert_fired", alert=self.alert, **{self.key: key}, **fields)

    def publish(self, firing: set[str]) -> None:
        if self.keys:
            firing.add(self.alert)
        else:
            firing.discard(self.alert)
        ALERTS.labels(self.alert).set(1 if self.keys else 0)


class AlertMonitor:
    def __init__(
        self,
        store: SqlStore,
        *,
        threshold: int,
        dead_threshold: int = 1,
        spool: Spool | None = None,
        circuits: CircuitStateStore | None = None,
        destinations: Collection[str] = (),
        down_after_s: float = 300.0,
        watch_workers: bool = False,
        no_workers_after_s: float = 120.0,
        refusals: Refusals | None = None,
        refused_after_s: float = 300.0,
        redis: Redis | None = None,
        redis_down_after_s: float = 60.0,
        redis_key_prefix: str = DEFAULT_REDIS_KEY_PREFIX,
        delivers: bool = True,
        store_down_after_s: float = 60.0,
        clock: Clock | None = None,
        interval_s: float = 5.0,
    ) -> None:
        self.store = store
        self.threshold = threshold
        self.dead_threshold = dead_threshold
        # The depths the alerts' lines report (`pending=`) are exact up to the queue's own
        # counting bound, and up to a threshold above it: past those, a floor.
        self.counted_to = max(QUEUE_COUNT_LIMIT, threshold, dead_threshold)
        self.spool = spool
        self.circuits = circuits
        # Those of this process's configuration: a circuit left open on record by a
        # destination since removed (no delivery will probe it again) is not an outage.
        self.destinations = frozenset(destinations)
        self.down_after_ms = round(down_after_s * 1000)
        # Whether this process's own workers act on the circuits it reads: during a Redis
        # outage its memory copy is then its live view, else a copy frozen at the outage.
        self.delivers = delivers
        self.redis = redis
        self.redis_down_after_ms = round(redis_down_after_s * 1000)
        self.redis_key_prefix = redis_key_prefix
        self.store_down_after_ms = round(store_down_after_s * 1000)
        # store_down and redis_down: the first look of each one's outage that failed.
        self._outage_since: dict[str, int] = {}
        self.clock: Clock = clock or SystemClock()
        self.interval_s = interval_s
        self.watch_workers = watch_workers
        self.no_workers_after_ms = round(no_workers_after_s * 1000)
        # A worker started just after this process is not missing, nor one that could not
        # record itself while the store was unreachable: its absence counts from the later
        # of the two at the earliest.
        self.started_ms = self.clock.now_ms()
        self._unreachable_ms = 0
        # The drain's last progress when `spool_stalled` was last found stalled.
        self._stalled_progress_at: int | None = None
        self.refusals = refusals
        self.refused_after_ms = round(refused_after_s * 1000)
        self._refused = KeyedAlert(WEBHOOKS_REFUSED, "source")
        self.firing: set[str] = set()
        # Destinations whose circuit is not closed, since when (as first seen: its opened_at,
        # which a failed probe moves on, is kept from the outage's start), and those of them
        # alerted on.
        self._down_since: dict[str, int] = {}
        self._down = KeyedAlert(DESTINATION_DOWN, "destination")
        alerts = [BACKLOG, DEAD_LETTERS, STORE_DOWN]
        if spool is not None:
            alerts.extend(SPOOL_ALERTS)
        if circuits is not None:
            alerts.append(DESTINATION_DOWN)
        if watch_workers:
            alerts.append(NO_WORKERS)
        if refusals is not None:
            alerts.append(WEBHOOKS_REFUSED)
        if redis is not None:
            alerts.append(REDIS_DOWN)
        for alert in alerts:
            ALERTS.labels(alert).set(0)

    @property
    def down(self) -> set[str]:
        """The destinations alerted on as down."""
        return self._down.keys

    async def check(self) -> None:
        try:
            # Within the read bound: a hung store would hold every alert's round for the
            # driver's 30 s command timeout (redis_down, the spool's, no_workers with it).
            # Counted as far as the thresholds need, and no further (store/views.py).
            depths = await within(self.store.queue_depths(self.counted_to))
        except (StoreError, TimeoutError) as exc:  # the spool covers an outage meanwhile
            # A read refused (a role without SELECT, 42501) is the store not answering too:
            # it crashed the round before, every round, and no alert said so.
            store_reachable = False
            self._unreachable_ms = self.clock.now_ms()
            # The error's text, not the URL: the store's errors name the cause, never data.
            error = str(exc) or type(exc).__name__
            self._outage(STORE_DOWN, self.store_down_after_ms, error=error)
        else:
            store_reachable = True
            self._outage(STORE_DOWN, self.store_down_after_ms, answered=True)
            pending = depths.pending
            if pending >= self.threshold:
                self._fire(BACKLOG, pending=pending, threshold=self.threshold)
            elif pending < self.threshold * RESOLVE_RATIO:
                self._resolve(BACKLOG, pending=pending, threshold=self.threshold)
            if depths.dead >= self.dead_threshold:
                self._fire(DEAD_LETTERS, dead=depths.dead, threshold=self.dead_threshold)
            else:
                self._resolve(DEAD_LETTERS, dead=depths.dead, threshold=self.dead_threshold)
            if self.watch_workers:
                await self._check_workers(depths)
        if self.redis is not None:
            await self._check_redis(self.redis)
        if self.circuits is not None:
            await self._check_destinations(self.circuits)
        if self.refusals is not None:
            self._check_refusals(self.refusals)
        if self.spool is None:
            return
        state = await observe(
            self.spool, store_reachable=store_reachable, now_ms=self.clock.now_ms()
        )
        if state.status is SpoolStatus.UNWRITABLE:
            self._fire(SPOOL_UNWRITABLE, error=state.error)
        else:
            self._resolve(SPOOL_UNWRITABLE)
        # By its bytes, not its status: a full spool on a full disk is `unwritable` too.
        if state.stats.bytes >= self.spool.max_bytes:
            self._fire(SPOOL_FULL, bytes=state.stats.bytes, max_bytes=self.spool.max_bytes)
        else:
            self._resolve(SPOOL_FULL, bytes=state.stats.bytes)
        if state.stalled:
            self._fire(
                SPOOL_STALLED,
                segments=state.stats.segments,
                waiting_s=round(state.waiting_s or 0.0, 1),
                stall_s=STALL_S,
            )
            self._stalled_progress_at = self.spool.progress_at
        elif not state.stats.segments or (
            # Once the drain got through: an outage seen since it fired starts the drain's
            # minute again (spool_watch), which says nothing of a drainer that is stuck.
            store_reachable and self.spool.progress_at != self._stalled_progress_at
        ):
            self._resolve(SPOOL_STALLED, segments=state.stats.segments)

    async def _check_destinations(self, circuits: CircuitStateStore) -> None:
        try:
            known = await within(current_circuits(circuits, delivers=self.delivers))
        except (StoreError, TimeoutError):  # unknown this round: nothing changes
            return
        if known is None:  # a copy frozen by a Redis outage says nothing of now
            return
        now = self.clock.now_ms()
        down = {
            d: c
            for d, c in known.items()
            if c.state is not CircuitState.CLOSED and d in self.destinations
        }
        self._down_since = {
            d: self._down_since.get(d, min(c.opened_at or now, now)) for d, c in down.items()
        }
        self._down.resolve_all_but(down)
        for destination, since in sorted(self._down_since.items()):
            if now - since >= self.down_after_ms:
                self._down.fire(
                    destination,
                    circuit=down[destination].state.value,
                    since=iso_from_ms(since),
                    down_s=round((now - since) / 1000),
                )
        self._down.publish(self.firing)

    def _outage(
        self, alert: str, after_ms: int, *, answered: bool = False, **fields: object
    ) -> None:
        """An alert on something that stopped answering (the store, Redis): fired, with
        `fields`, once it has not answered for `after_ms`; resolved at its first answer."""
        if answered:
            self._outage_since.pop(alert, None)
            self._resolve(alert)
            return
        now = self.clock.now_ms()
        since = self._outage_since.setdefault(alert, now)
        if now - since >= after_ms:
            self._fire(
                alert, **fields, since=iso_from_ms(since), down_s=round((now - since) / 1000)
            )

    async def _check_redis(self, client: Redis) -> None:
        trouble = await redis_unwritable(client, self.redis_key_prefix)
        if trouble is None:
            self._outage(REDIS_DOWN, self.redis_down_after_ms, answered=True)
            return
        error, reason = trouble
        self._outage(REDIS_DOWN, self.redis_down_after_ms, error=error, reason=reason)

    def _check_refusals(self, refusals: Refusals) -> None:
        now = self.clock.now_ms()
        streaks = refusals.streaks
        self._refused.resolve_all_but(streaks)
        for source, streak in sorted(streaks.items()):
            if now - streak.first_at >= self.refused_after_ms and streak.count >= MIN_REFUSED:
                self._refused.fire(
                    source,
                    error=streak.error,
                    refused=streak.count,
                    since=iso_from_ms(streak.first_at),
                )
        self._refused.publish(self.firing)

    async def _check_workers(self, depths: QueueDepths) -> None:
        # In flight too: leased to a worker that died, they wait for a live one's rescue.
        pending, in_flight = depths.pending, depths.in_flight
        if not pending and not in_flight:
            self._resolve(NO_WORKERS, pending=0, in_flight=0)
            return
        try:
            last = await within(self.store.last_delivering_at())
        except (StoreError, TimeoutError):  # unknown this round: nothing changes
            self._unreachable_ms = self.clock.now_ms()
            return
        now = self.clock.now_ms()
        if last is not None and now - last < self.no_workers_after_ms:
            self._resolve(NO_WORKERS, pending=pending, in_flight=in_flight)
            return
        # This process's start and a store outage only put firing off: they say nothing of a
        # worker, so an alert firing stands through them (a store that missed one round
        # resolved it, and it fired again two minutes later, no worker anywhere meanwhile).
        since = max(last or 0, self.started_ms, self._unreachable_ms)
        if now - since >= self.no_workers_after_ms:
            self._fire(
                NO_WORKERS,
                pending=pending,
                in_flight=in_flight,
                last_seen=None if last is None else iso_from_ms(last),
            )

    def _fire(self, alert: str, **fields: Any) -> None:
        if alert not in self.firing:
            self.firing.add(alert)
            ALERTS.labels(alert).set(1)
            log.warning("alert_fired", alert=alert, **fields)

    def _resolve(self, alert: str, **fields: Any) -> None:
        if alert in self.firing:
            self.firing.discard(alert)
            ALERTS.labels(alert).set(0)
            log.info("alert_resolved", alert=alert, **fields)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

"""Helpers for the chaos suite: faults injected into real processes under real load.

The acceptance harness (`tests/acceptance/conftest.py`) provides the TOML writer, the
`estafeta` process fixture, the signed-webhook client, `wait_until` and direct SQL; this file
adds only what a fault needs:

* `chaos_database`: a fresh PostgreSQL database for one test (dropped afterwards);
* `TcpProxy`: an asyncio TCP proxy on 127.0.0.1 between estafeta and PostgreSQL that a test
  cuts (listener closed, every proxied connection aborted, new ones refused) and restores,
  or freezes (connections stay open and nothing answers: a hung server) and thaws;
* `RedisProcess`: a `redis-server` of the test's own, killed and restarted on the same port
  (the shared Redis on 6379 and the shared PostgreSQL are never stopped);
* `Load`: a sender of signed webhooks that retries a request that failed with a connection
  error, with the same `webhook-id` (a real provider does), and remembers every answer;
* small measurements over arrival times at a sink (per-second counts, sliding windows);
* what every scenario checks at its end: all it acknowledged arrived
  (`acknowledged_and_delivered`), and what a SIGKILL may send twice (`leased_by`); the
  hub and the end the kill scenarios share (`kill_config`, `assert_kills_lost_nothing`);
* a killed process's database connections gone (`tcp_ports`, `disconnected`: what the store
  holds of it is then final), and the counters of `/metrics` (`scrape`, `counted`) beside
  what the store recorded (`attempts_by_outcome`, `dead_lettered`).

Under CI=true a missing PostgreSQL or `redis-server` fails the test instead of skipping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (  # estafeta and the hook: re-exported for this folder
    SIGNED_SOURCE,
    HubClient,
    Proc,
    estafeta,
    free_port,
    leads_to_crm_config,
    pytest_runtest_makereport,
    query,
    report,
    signed_request,
    wait_until,
)
from tests.conftest import IN_CI, PG_ADMIN_URL, fresh_database

__all__ = ["estafeta", "pytest_runtest_makereport"]

# -- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture
def chaos_database() -> Iterator[str]:
    """`postgresql://…/<fresh database>` for this test alone, dropped (FORCE) at teardown."""
    with fresh_database("estafeta_chaos") as url:
        yield url


def pg_target() -> tuple[str, int]:
    """Host and port of the shared PostgreSQL server (what the proxy forwards to)."""
    rest = PG_ADMIN_URL.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = rest.partition(":")
    return host or "127.0.0.1", int(port or 5432)


def via_proxy(database_url: str, proxy_port: int) -> str:
    """The same database, reached through the proxy on 127.0.0.1:`proxy_port`."""
    scheme, rest = database_url.split("://", 1)
    authority, _, path = rest.partition("/")
    user = authority.rsplit("@", 1)[0] + "@" if "@" in authority else ""
    return f"{scheme}://{user}127.0.0.1:{proxy_port}/{path}"


# -- a TCP proxy that can be cut --------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:`port` to a target; `cut()` takes the target away, `restore()`
    brings it back on the same port.

    Cut means what a crashed or partitioned database looks like to a client that is told at
    once: the listener is closed (new connections are refused) and every proxied connection
    is aborted (RST) on both sides. Frozen means what a hung one (a stopped process, a
    network that drops packets) looks like: connections are accepted and kept, and nothing
    is forwarded either way until `thaw()`.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0  # accepted so far, for reports
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._cut = False
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        self._cut = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for client, upstream in list(self._links):
            for writer in (client, upstream):
                writer.transport.abort()
        self._links.clear()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def restore(self) -> None:
        """Listen again on the same port (SO_REUSEADDR is asyncio's default on Unix)."""
        self._cut = False
        try:
            await self.start()
        except OSError as exc:
            raise AssertionError(f"the proxy cannot listen on {self.port} again: {exc}") from exc

    async def close(self) -> None:
        await self.cut()
        self.thaw()  # connections waiting to be forwarded see the cut and are aborted

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), timeout=5
            )
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        if self._cut:  # cut while we were connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.connections += 1
        link = (writer, up_writer)
        self._links.add(link)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._pipes.difference_update(pipes)
            self._links.discard(link)
            for w in link:
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while chunk := await reader.read(65536):
                await self._flowing.wait()
                writer.write(chunk)
                await writer.drain()


@pytest.fixture
async def pg_proxy() -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(*pg_target())
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


# -- a Redis of the test's own ----------------------------------------------------------------


class RedisProcess:
    """`redis-server` on a fixed free port, without persistence; killed and restarted."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, timeout_s: float = 10) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed"
            if IN_CI:
                pytest.fail(f"{message}; it is required under CI=true")
            pytest.skip(message)
        self._process = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--dir", str(self.directory),
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        client = redis.asyncio.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    await client.ping()
                    return
                except (redis.exceptions.RedisError, OSError):
                    if self._process.returncode is not None or time.monotonic() > deadline:
                        raise AssertionError(
                            f"redis-server on port {self.port} did not start"
                        ) from None
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await asyncio.wait_for(self._process.wait(), timeout=10)
        self._process = None


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisProcess(directory, free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


# -- load -------------------------------------------------------------------------------------


def lead(n: int) -> tuple[str, Mapping[str, Any]]:
    """Webhook number `n`: its webhook-id and a body routed by every scenario's route."""
    return f"msg_{n:05d}", {"type": "lead.created", "data": {"n": n}}


# A request that failed like this never got an answer: the sender cannot know whether it was
# stored, so it sends the same webhook (same webhook-id) again.
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


@dataclass
class Answer:
    status: int
    event_id: str | None
    spooled: bool
    at: float  # time.monotonic() when the answer arrived


@dataclass
class Load:
    """Sends signed webhooks to a hub and keeps what it answered, by webhook (msg) id."""

    hub: HubClient
    source: str = SIGNED_SOURCE  # a generic source signed with SOURCE_SECRET
    retry_pause_s: float = 0.1
    give_up_after_s: float = 60.0
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    connection_errors: int = 0  # failed tries that were sent again
    in_flight: int = 0
    ok: int = 0  # webhooks answered 2xx so far

    async def send(self, msg_id: str, body: Mapping[str, Any]) -> None:
        """Send one webhook until it gets an HTTP answer (bounded by `give_up_after_s`)."""
        deadline = time.monotonic() + self.give_up_after_s
        self.in_flight += 1
        try:
            while True:
                try:
                    status, answer, spooled = await self._post(body, msg_id)
                except CONNECTION_ERRORS:
                    self.connection_errors += 1
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"{msg_id}: no answer for {self.give_up_after_s} s"
                        ) from None
                    await asyncio.sleep(self.retry_pause_s)
                    continue
                event_id = answer.get("id") if isinstance(answer, dict) else None
                self.ok += 200 <= status < 300
                self.answers.setdefault(msg_id, []).append(
                    Answer(status, event_id if isinstance(event_id, str) else None, spooled,
                           time.monotonic())
                )  # fmt: skip
                return
        finally:
            self.in_flight -= 1

    async def _post(self, body: Mapping[str, Any], msg_id: str) -> tuple[int, Any, bool]:
        raw, headers = signed_request(body, msg_id)
        url = f"{self.hub.base_url}/in/{self.source}"
        async with self.hub.http.post(url, data=raw, headers=headers) as response:
            answer = await response.json(content_type=None)
            return response.status, answer, response.headers.get("X-Estafeta-Spooled") == "1"

    async def burst(
        self, messages: Sequence[tuple[str, Mapping[str, Any]]], *, concurrency: int
    ) -> None:
        """Send all of `messages`, at most `concurrency` at a time."""
        gate = asyncio.Semaphore(concurrency)

        async def one(msg_id: str, body: Mapping[str, Any]) -> None:
            async with gate:
                await self.send(msg_id, body)

        await asyncio.gather(*(one(m, b) for m, b in messages))

    async def steady(
        self,
        rate_per_s: float,
        stop: asyncio.Event,
        make: Callable[[int], tuple[str, Mapping[str, Any]]],
        *,
        max_in_flight: int = 200,
        count: int | None = None,
    ) -> int:
        """Start `rate_per_s` webhooks a second (on a fixed schedule, no drift) until `stop`,
        or until `count` are started; waits for the ones started and returns how many were
        sent."""
        tasks: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        n = 0
        while not stop.is_set() and (count is None or n < count):
            due = started + n / rate_per_s
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            if len(tasks) >= max_in_flight:
                raise AssertionError(f"{max_in_flight} webhooks unanswered: the hub is stuck")
            msg_id, body = make(n)
            task = asyncio.create_task(self.send(msg_id, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.gather(*tasks)
        return n

    async def wait_acknowledged(self, n: int, *, timeout_s: float) -> None:
        """Wait (bounded) until `n` webhooks have been answered 2xx."""

        async def reached() -> bool:
            return self.ok >= n

        await wait_until(reached, timeout_s=timeout_s, what=f"{n} acknowledged webhooks")

    # -- what the sender saw ----------------------------------------------------------------

    @property
    def sent(self) -> int:
        return len(self.answers)

    def acknowledged(self) -> dict[str, set[str]]:
        """msg id → the event ids the hub acknowledged (2xx) for it."""
        return {
            msg: {a.event_id for a in answers if 200 <= a.status < 300 and a.event_id}
            for msg, answers in self.answers.items()
            if any(200 <= a.status < 300 for a in answers)
        }

    def refused(self) -> dict[str, list[int]]:
        """msg id → the non-2xx statuses it got (none expected in these scenarios)."""
        return {
            msg: [a.status for a in answers if not 200 <= a.status < 300]
            for msg, answers in self.answers.items()
            if any(not 200 <= a.status < 300 for a in answers)
        }

    def spooled(self) -> list[Answer]:
        return [a for answers in self.answers.values() for a in answers if a.spooled]


def lost(acknowledged: Mapping[str, set[str]], delivered: set[str]) -> set[str]:
    """Acknowledged messages none of whose event ids reached the sink with a 2xx.

    A message has more than one id only when a retry was answered from the spool while the
    store was down (documented: the spool answers a new id, dropped as a duplicate at drain);
    any of its ids arriving is the message arriving.
    """
    return {msg for msg, ids in acknowledged.items() if not ids & delivered}


def acknowledged_ids(acknowledged: Mapping[str, set[str]]) -> set[str]:
    return set().union(*acknowledged.values()) if acknowledged else set()


async def all_delivered(
    sink: Sink, acknowledged: Mapping[str, set[str]], *, timeout_s: float
) -> set[str]:
    """Wait (bounded) until every acknowledged message reached `sink`; returns the lost ones."""
    await sink.wait_for(lambda s: not lost(acknowledged, s.delivered_ids), timeout_s)
    return lost(acknowledged, sink.delivered_ids)


async def acknowledged_and_delivered(
    load: Load, sink: Sink, *, sent: int, timeout_s: float
) -> tuple[dict[str, set[str]], set[str]]:
    """Every one of the `sent` webhooks was acknowledged (none refused) and then reached
    `sink` within `timeout_s`; returns what was acknowledged, and what was lost (nothing)."""
    assert load.refused() == {}, list(load.refused().items())[:10]
    acknowledged = load.acknowledged()
    assert len(acknowledged) == sent
    missing = await all_delivered(sink, acknowledged, timeout_s=timeout_s)
    assert not missing, f"{len(missing)} acknowledged webhooks never delivered"
    return acknowledged, missing


# -- killed processes -------------------------------------------------------------------------


async def leased_by(database_url: str, pid: int) -> set[str]:
    """Event ids of the deliveries in flight under a lease of process `pid` (its worker ids
    hold its pid): after a SIGKILL, these and only these may be sent again."""
    rows = await query(
        database_url,
        "SELECT event_id FROM deliveries WHERE state = 'in_flight' AND leased_by LIKE :pid",
        {"pid": f"%:{pid}:%"},
    )
    return {event_id for (event_id,) in rows}


def kill_config(database_url: str, workdir: Path, sink: Sink) -> Path:
    """The hub the kill scenarios kill: `sink` answers 200 after 50 ms, so that dozens of
    sends are in flight at any moment, and a lease of max(lease_s, timeout_s + 2) = 4 s
    brings a dead process's sends back soon."""
    sink.respond(200, delay_s=0.05)
    return leads_to_crm_config(
        database_url,
        workdir,
        sink.url,
        timeout_s=2,
        max_attempts=20,
        worker={"lease_s": 1, "concurrency": 32, "batch_size": 32},
    )


async def assert_kills_lost_nothing(
    name: str,
    load: Load,
    sink: Sink,
    database_url: str,
    in_flight_at_kill: set[str],
    *,
    events: int,
    kills: int,
    started: float,
) -> None:
    """The end of a kill scenario, once its kills are done: every one of `events` webhooks
    was acknowledged and delivered, and once the deliveries settled, only sends in flight at
    a kill were duplicated (`assert_killed_sends_only_were_duplicated`); then its report."""
    acknowledged, missing = await acknowledged_and_delivered(load, sink, sent=events, timeout_s=60)
    await settled_deliveries(database_url, timeout_s=30)
    await assert_killed_sends_only_were_duplicated(
        sink, acknowledged, database_url, in_flight_at_kill, events=events, kills=kills
    )
    report(name, sink, acknowledged, sent=load.sent, lost=len(missing), started=started)


async def assert_killed_sends_only_were_duplicated(
    sink: Sink,
    acknowledged: Mapping[str, set[str]],
    database_url: str,
    in_flight_at_kill: set[str],
    *,
    events: int,
    kills: int,
) -> None:
    """After processes were SIGKILLed mid-run and the deliveries settled: each of `events`
    webhooks became one event (a retry after a server kill made no second one) whose
    delivery succeeded, everything acknowledged arrived, and every event sent twice was in
    flight, leased by a process when it was killed, and rescued from that lease
    (`lease_expired`) — unless one of its attempts timed out: the sink records its answer
    when the request arrives, so a send the worker gave up on (a loaded machine can stretch
    the sink's 50 ms past the 2 s timeout) shows a 2xx there and is rightly sent again."""
    stored = await query(database_url, "SELECT count(*) FROM events")
    assert stored == [(events,)], f"{stored[0][0]} events stored for {events} webhooks"
    by_state = await deliveries_by_state(database_url)
    assert by_state == {"succeeded": events}, by_state
    ids_by_webhook: dict[int, set[str]] = {}
    for r in sink.received:
        number = orjson.loads(r.body)["data"]["n"]
        ids_by_webhook.setdefault(number, set()).add(r.webhook_id or "")
    assert {n for n, ids in ids_by_webhook.items() if len(ids) > 1} == set()
    assert acknowledged_ids(acknowledged) == sink.delivered_ids

    oks = Counter(r.webhook_id or "" for r in sink.received if 200 <= r.status < 300)
    timed_out = await events_with_attempt(database_url, "timeout")
    duplicated = {event_id for event_id, n in oks.items() if n > 1} - timed_out
    rescued = await events_with_attempt(database_url, "lease_expired")
    unrescued = duplicated - rescued
    # Their attempts say how each came to be sent again (a timeout, a rescue, or neither).
    attempts = [] if not unrescued else await attempts_of(database_url, unrescued)
    assert not unrescued, f"sent again without a rescue: {unrescued}; attempts: {attempts}"
    assert duplicated <= in_flight_at_kill, (
        f"sent again though not in flight at a kill: {sorted(duplicated - in_flight_at_kill)}"
    )
    assert max((oks[event_id] for event_id in duplicated), default=1) <= 1 + kills


def tcp_ports(pid: int, remote_port: int) -> set[int]:
    """The local ports of process `pid`'s TCP sockets connected to `remote_port` (Linux
    /proc): its connections to the database, which `pg_stat_activity.client_port` names.
    Only those: Linux gives one local port to connections to different servers, so a port
    of its connections to a sink can be another process's database connection's too."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
                    if remote == remote_port:
                        ports.add(local)
    return ports


async def disconnected(
    database_url: str, ports: Iterable[int], *, before_s: float, timeout_s: float
) -> None:
    """Wait (bounded) until no PostgreSQL backend of this database opened before the Unix
    time `before_s` serves a client on one of `ports`: the connections of a process killed
    then are gone, so a statement one of them was running has committed or rolled back, and
    what the store holds of that process is final."""
    wanted = sorted(ports)

    async def gone() -> bool:
        rows = await query(
            database_url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND client_port = ANY(:ports) AND backend_start < to_timestamp(:before)",
            {"ports": wanted, "before": before_s},
        )
        return rows == [(0,)]

    await wait_until(gone, timeout_s=timeout_s, what=f"no backend for the ports {wanted}")


# -- /metrics ---------------------------------------------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: aiohttp.ClientSession, base_url: str) -> Samples:
    """The samples of `GET {base_url}/metrics`: (name, sorted labels) → value."""
    async with http.get(f"{base_url}/metrics") as response:
        assert response.status == 200, f"{base_url}/metrics: {response.status}"
        exposition = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def counted(samples: Samples, name: str, *labels: str) -> Counter[tuple[str, ...]]:
    """The sample `name`'s values by the values of `labels` (other labels summed over)."""
    totals: Counter[tuple[str, ...]] = Counter()
    for (sample, pairs), value in samples.items():
        if sample == name:
            found = dict(pairs)
            totals[tuple(found.get(label, "") for label in labels)] += int(value)
    return totals


# -- measuring at the sink --------------------------------------------------------------------


def arrivals(sink: Sink, *, status: int | None = None) -> list[float]:
    """Arrival times (monotonic) at `sink`, sorted; only answers of `status` when given."""
    return sorted(r.at for r in sink.received if status is None or r.status == status)


def per_second(times: Iterable[float], start: float, end: float) -> list[int]:
    """Counts in consecutive whole 1-second windows [start, start+1), … up to `end`."""
    windows = [0] * max(0, int(end - start))
    for t in times:
        i = int(t - start)
        if start <= t and 0 <= i < len(windows):
            windows[i] += 1
    return windows


def median(values: Sequence[int]) -> float:
    return float(statistics.median(values)) if values else 0.0


def busiest_second(times: Sequence[float], width_s: float = 1.0) -> tuple[int, float]:
    """The most arrivals within any `width_s`-long window (sliding, not aligned to whole
    seconds), and when that window starts."""
    ordered = sorted(times)
    best, best_at, j = 0, 0.0, 0
    for i, t in enumerate(ordered):
        while t - ordered[j] >= width_s:
            j += 1
        if i - j + 1 > best:
            best, best_at = i - j + 1, ordered[j]
    return best, best_at


# -- the store, read directly -----------------------------------------------------------------


async def attempts_of(database_url: str, event_ids: set[str]) -> list[tuple[Any, ...]]:
    """The attempts of these events' deliveries, in order: (event id, number, started_at,
    duration_ms, outcome, status_code, error_class)."""
    rows = await query(
        database_url,
        "SELECT d.event_id, a.number, a.started_at, a.duration_ms, a.outcome, a.status_code,"
        " a.error_class FROM attempts a JOIN deliveries d ON d.id = a.delivery_id"
        " ORDER BY d.event_id, a.started_at",
    )
    return [tuple(row) for row in rows if row[0] in event_ids]


async def events_with_attempt(database_url: str, error_class: str) -> set[str]:
    """Event ids that have a delivery with an attempt of `error_class` (e.g. lease_expired)."""
    rows = await query(
        database_url,
        "SELECT DISTINCT d.event_id FROM attempts a JOIN deliveries d ON d.id = a.delivery_id"
        " WHERE a.error_class = :error_class",
        {"error_class": error_class},
    )
    return {event_id for (event_id,) in rows}


def _execute(database_url: str, sql: str, params: Mapping[str, Any]) -> int:
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        with engine.begin() as conn:
            return conn.execute(text(sql), dict(params)).rowcount
    finally:
        engine.dispose()


async def execute(database_url: str, sql: str, params: Mapping[str, Any] | None = None) -> int:
    """Run one writing statement against the store and commit; returns the row count."""
    return await asyncio.to_thread(_execute, database_url, sql, params or {})


async def deliveries_by_state(database_url: str) -> dict[str, int]:
    rows = await query(database_url, "SELECT state, count(*) FROM deliveries GROUP BY state")
    return {state: int(n) for state, n in rows}


async def settled_deliveries(database_url: str, *, timeout_s: float) -> dict[str, int]:
    """Wait (bounded) until no delivery is pending or in flight; returns the counts by state.

    A sink counts a request when it arrives, the hub records the outcome only after the
    answer: between the two, a delivery the sink already has is still `in_flight`.
    """
    last: dict[str, int] = {}

    async def idle() -> bool:
        nonlocal last
        last = await deliveries_by_state(database_url)
        return last.get("pending", 0) + last.get("in_flight", 0) == 0

    try:
        await wait_until(idle, timeout_s=timeout_s, what="no delivery pending or in flight")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {last}") from None
    return last


async def attempts_by_outcome(database_url: str) -> Counter[tuple[str, ...]]:
    """(destination, outcome) → attempts recorded, as `estafeta_delivery_attempts_total`
    counts them."""
    rows = await query(
        database_url,
        "SELECT d.destination_id, a.outcome, count(*) FROM attempts AS a"
        " JOIN deliveries AS d ON d.id = a.delivery_id GROUP BY d.destination_id, a.outcome",
    )
    return Counter({(destination, outcome): int(n) for destination, outcome, n in rows})


async def dead_lettered(database_url: str) -> Counter[tuple[str, ...]]:
    """(destination,) → moves to the dead-letter queue so far, as
    `estafeta_deliveries_dead_lettered_total` counts them: the deliveries dead now and every
    replay (each took one dead delivery back), when nothing was discarded."""
    rows = await query(
        database_url,
        "SELECT destination_id, count(*) FILTER (WHERE state = 'dead') + sum(replays)"
        " FROM deliveries GROUP BY destination_id",
    )
    return Counter({(destination,): int(n) for destination, n in rows if n})


def logged(proc: Proc, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of `proc` whose event is `event`."""
    return [line for line in proc.log_events() if line.get("event") == event]

"""Helpers for the acceptance suite: real `estafeta` processes, real sinks, real HTTP.

Every test here starts the `estafeta` command as a child process (`serve`, `worker`, the CLI),
points it at a configuration file written for the test, talks to it over loopback HTTP and
watches what arrives at `estafeta.testing.Sink` receivers running in the test's event loop.

* `write_config` turns a config dict (e.g. `tests.conftest.base_config(...)`) into TOML;
* the `estafeta` fixture starts processes (`serve` on the `server.listen` of its file, once
  it answers /health), and kills whatever is still running at teardown; when a test fails,
  the tail of each child's stderr is printed;
* `run_cli` runs one command to completion without blocking the event loop (the sinks live
  in it);
* `HubClient` sends signed webhooks concurrently and reads the API with the admin key;
* `wait_until` polls a condition with a bounded deadline (for state only the API shows;
  what a sink sees is awaited with `Sink.wait_for`, never polled).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from sqlalchemy import create_engine, text

from estafeta.connectors.http import sign_webhook
from estafeta.testing.sink import Sink
from tests.conftest import SINK_SECRET, SOURCE_SECRET, base_config

ADMIN_KEY = "test-admin-key"  # what base_config puts in [security] admin_key
TENANT = "clinica-sol"
SIGNED_SOURCE = "crm-events"  # base_config's generic source signed with SOURCE_SECRET
FAST_BACKOFF = {"base_s": 0.05, "factor": 2, "max_s": 0.2, "jitter": 0}
# Opens after 5 consecutive failures like the default, but probes again after 0.5 s, not 30 s.
# The circuit state outlives a process (it is kept in the store), so a restarted hub obeys it.
FAST_CIRCUIT = {"failures": 5, "reset_s": 0.5}

# -- the command ------------------------------------------------------------------------------


def estafeta_command() -> list[str]:
    """`python -m estafeta` when the package has a `__main__`, else the console script."""
    if importlib.util.find_spec("estafeta.__main__") is not None:
        return [sys.executable, "-m", "estafeta"]
    script = Path(sys.executable).parent / "estafeta"
    if not script.exists():
        raise RuntimeError(f"neither `python -m estafeta` nor {script} is available")
    return [str(script)]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: ours without ESTAFETA_* (they would override the file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESTAFETA_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- configuration ----------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    """A TOML value: JSON's string escapes are valid in TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return f"{{ {inner} }}" if inner else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")


def to_toml(data: Mapping[str, Any]) -> str:
    """The shapes a config uses: tables of scalars, arrays of tables, inline tables, lists."""
    lines: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            lines.append(f"[{_toml_key(key)}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for entry in value:
                lines.append(f"[[{_toml_key(key)}]]")
                lines.extend(
                    f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items() if v is not None
                )
                lines.append("")
        else:
            lines.insert(0, f"{_toml_key(key)} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(to_toml(data), encoding="utf-8")
    return path


def http_destination(
    destination_id: str,
    url: str,
    *,
    timeout_s: float = 30,
    max_attempts: int = 5,
    **extra: Any,
) -> dict[str, Any]:
    """An http destination of the test tenant, signed with SINK_SECRET, with fast backoff
    and a fast circuit breaker (`extra` overrides or adds keys).

    The timeout is generous: the sinks answer from the test's own event loop, which a
    loaded machine (a full `make test` on 2 cores) can keep from answering for seconds, and
    a send that timed out is sent again by design (a duplicate), and counts toward opening
    the circuit. A test that wants sends to time out, or short leases, sets it."""
    return {
        "id": destination_id,
        "tenant": TENANT,
        "kind": "http",
        "url": url,
        "secret": SINK_SECRET,
        "timeout_s": timeout_s,
        "max_attempts": max_attempts,
        "backoff": FAST_BACKOFF,
        "circuit": FAST_CIRCUIT,
        **extra,
    }


def hub_config(
    database_url: str,
    workdir: Path,
    *,
    port: int | None = None,
    destinations: list[dict[str, Any]],
    routes: list[dict[str, Any]],
    worker: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`base_config` listening on `port` (a free one unless given), with these destinations
    and routes."""
    return base_config(
        database_url,
        server={"listen": f"127.0.0.1:{free_port() if port is None else port}"},
        storage={"url": database_url, "spool_dir": str(workdir / "spool")},
        worker={"poll_interval_s": 0.05, "rescue_interval_s": 0.5, **(worker or {})},
        destinations=destinations,
        routes=routes,
    )


def leads_to_crm_config(
    database_url: str,
    workdir: Path,
    sink_url: str,
    *,
    port: int | None = None,
    worker: Mapping[str, Any] | None = None,
    redis_url: str | None = None,
    **destination: Any,
) -> Path:
    """The commonest test hub, written to `workdir/estafeta.toml`: `lead.*` events routed to
    one `crm` destination at the sink (`destination` overrides its keys), and Redis at
    `redis_url` when given; listening on `port`, or a free one."""
    data = hub_config(
        database_url,
        workdir,
        port=port,
        destinations=[http_destination("crm", f"{sink_url}/hooks/crm", **destination)],
        routes=[{"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm"]}],
        worker=worker,
    )
    if redis_url is not None:
        data["redis"] = {"url": redis_url}
    return write_config(workdir / "estafeta.toml", data)


# -- processes --------------------------------------------------------------------------------


@dataclass
class Proc:
    """One `estafeta` child process; stdout and stderr go to files next to the config."""

    name: str
    args: list[str]
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])

    def log_events(self) -> list[dict[str, Any]]:
        """The structured (JSON) log lines this process wrote to stderr."""
        events: list[dict[str, Any]] = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    parsed = orjson.loads(line)
                    if isinstance(parsed, dict):
                        events.append(parsed)
        return events

    def failure(self, what: str) -> AssertionError:
        return AssertionError(
            f"{self.name} (pid {self.pid}, exit {self.popen.returncode}): {what}\n"
            f"--- stderr tail ---\n{self.tail()}"
        )

    async def wait_log(self, event: str, timeout_s: float = 30) -> dict[str, Any]:
        """Until the process logs `{"event": event, ...}` on stderr (bounded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.log_events():
                if line.get("event") == event:
                    return line
            if not self.running():
                raise self.failure(f"exited before logging {event!r}")
            if time.monotonic() > deadline:
                raise self.failure(f"did not log {event!r} within {timeout_s} s")
            await asyncio.sleep(0.05)

    def send_signal(self, signum: int) -> None:
        if self.running():
            self.popen.send_signal(signum)

    async def wait_exit(self, timeout_s: float) -> int:
        """The exit code (negative: killed by that signal); AssertionError after `timeout_s`."""
        try:
            return await asyncio.to_thread(self.popen.wait, timeout_s)
        except subprocess.TimeoutExpired:
            raise self.failure(f"still running {timeout_s} s later") from None

    async def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM and wait for the exit."""
        self.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout_s)

    async def sigkill(self) -> None:
        """SIGKILL (no goodbye) and wait until the process is gone."""
        self.send_signal(signal.SIGKILL)
        assert await self.wait_exit(10) == -signal.SIGKILL, self.tail()

    def kill(self) -> None:
        if self.running():
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


@dataclass
class Server(Proc):
    """`estafeta serve`, answering HTTP on `listen` (host:port)."""

    listen: str

    @property
    def base_url(self) -> str:
        return f"http://{self.listen}"

    async def wait_healthy(self, timeout_s: float = 30) -> None:
        """Until `GET /health` answers 200 (bounded; this is process start-up)."""
        deadline = time.monotonic() + timeout_s
        probe = aiohttp.ClientTimeout(total=1)
        async with aiohttp.ClientSession(timeout=probe) as http:
            while True:
                if not self.running():
                    raise self.failure("exited before answering /health")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"{self.base_url}/health") as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise self.failure(f"/health did not answer within {timeout_s} s")
                await asyncio.sleep(0.05)


def listen_address(config: Path) -> str:
    """The `server.listen` of a config file: where a `serve` of it answers."""
    listen: str = tomllib.loads(config.read_text(encoding="utf-8"))["server"]["listen"]
    return listen


class Estafeta:
    """Starts `estafeta` processes for one test and cleans them all up afterwards."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Proc] = []

    def _spawn(
        self, name: str, args: Sequence[str]
    ) -> tuple[list[str], subprocess.Popen[bytes], Path, Path]:
        """`estafeta ARGS…` started: its command line, process, stdout and stderr files."""
        n = len(self.started)
        stdout_path = self.workdir / f"{n:02d}-{name}.stdout"
        stderr_path = self.workdir / f"{n:02d}-{name}.stderr"
        command = [*estafeta_command(), *args]
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                command, stdout=out, stderr=err, cwd=self.workdir, env=child_env()
            )
        return command, popen, stdout_path, stderr_path

    def start(self, name: str, *args: str) -> Proc:
        """`estafeta ARGS…`, not waited for (a test that watches a start-up or its failure)."""
        proc = Proc(name, *self._spawn(name, args))
        self.started.append(proc)
        return proc

    async def serve(
        self, config: Path, *args: str, no_workers: bool = False, name: str = "serve"
    ) -> Server:
        """`estafeta serve --config F ARGS…`, once it answers /health on F's `server.listen`
        (read from the file, so a restart of the same file answers where the first did)."""
        command = ["serve", "--config", str(config), *args]
        if no_workers:
            command.append("--no-workers")
        server = Server(name, *self._spawn(name, command), listen=listen_address(config))
        self.started.append(server)
        await server.wait_healthy()
        return server

    def worker(self, config: Path, *args: str, name: str = "worker") -> Proc:
        """`estafeta worker --config F ARGS…` (await `wait_log("worker_started")` for
        readiness)."""
        return self.start(name, "worker", "--config", str(config), *args)

    def kill_all(self) -> None:
        for proc in self.started:
            proc.kill()

    def report(self) -> str:
        return "\n".join(
            f"=== {p.name} pid={p.pid} exit={p.popen.returncode} args={' '.join(p.args[-4:])}\n"
            f"{p.tail()}"
            for p in self.started
        )


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture
def estafeta(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Estafeta]:
    """Start `estafeta` children; all killed at teardown, their stderr shown on failure."""
    launcher = Estafeta(tmp_path)
    try:
        yield launcher
    finally:
        launcher.kill_all()
        if request.node.stash.get(_FAILED, False) and launcher.started:
            print("\n--- estafeta processes ---\n" + launcher.report())


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(
    *args: str, cwd: Path, timeout_s: float = 60, env: Mapping[str, str] | None = None
) -> CliResult:
    """Run `estafeta ARGS…` to completion without blocking the event loop; `env` is added
    to the environment."""
    process = await asyncio.create_subprocess_exec(
        *estafeta_command(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env={**child_env(), **(env or {})},
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"`estafeta {' '.join(args)}` ran over {timeout_s} s") from None
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


# -- talking to the hub -----------------------------------------------------------------------


@dataclass
class Sent:
    """What the hub answered to each webhook: status and the event id it acknowledged."""

    statuses: list[int] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)  # webhook-id sent → event id answered
    errors: list[str] = field(default_factory=list)

    @property
    def acknowledged(self) -> set[str]:
        return set(self.ids.values())


def signed_request(
    body: Mapping[str, Any], msg_id: str, secret: str = SOURCE_SECRET
) -> tuple[bytes, dict[str, str]]:
    """A Standard Webhooks request (body, headers) as a sender would make it."""
    raw = orjson.dumps(body)
    timestamp = int(time.time())
    return raw, {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_webhook(secret, msg_id, timestamp, raw),
    }


class HubClient:
    """A running hub's HTTP surface, as a sender and as the operator (admin key)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url
        self.http = session
        self.admin = {"authorization": f"Bearer {ADMIN_KEY}"}

    async def post_signed(
        self, body: Mapping[str, Any], msg_id: str, source: str = SIGNED_SOURCE
    ) -> tuple[int, dict[str, Any]]:
        raw, headers = signed_request(body, msg_id)
        async with self.http.post(f"{self.base_url}/in/{source}", data=raw, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def send_leads(self, count: int) -> Sent:
        """`count` `lead.created` webhooks (data `{"n": n}`, webhook-id `msg_0000n`)."""
        return await self.send_many(
            [{"type": "lead.created", "data": {"n": n}} for n in range(count)],
            [f"msg_{n:05d}" for n in range(count)],
        )

    async def send_many(
        self,
        bodies: Sequence[Mapping[str, Any]],
        msg_ids: Sequence[str],
        *,
        concurrency: int = 50,
    ) -> Sent:
        """Send signed webhooks concurrently (at most `concurrency` at a time)."""
        sent = Sent()
        gate = asyncio.Semaphore(concurrency)

        async def one(body: Mapping[str, Any], msg_id: str) -> None:
            async with gate:
                try:
                    status, answer = await self.post_signed(body, msg_id)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    sent.errors.append(f"{msg_id}: {type(exc).__name__}: {exc}")
                    return
            sent.statuses.append(status)
            if status == 202 and isinstance(answer.get("id"), str):
                sent.ids[msg_id] = answer["id"]

        await asyncio.gather(*(one(b, m) for b, m in zip(bodies, msg_ids, strict=True)))
        return sent

    async def get_json(self, path: str, *, headers: Mapping[str, str] | None = None) -> Any:
        async with self.http.get(f"{self.base_url}{path}", headers=headers or self.admin) as r:
            assert r.status == 200, f"GET {path}: {r.status} {await r.text()}"
            return await r.json()

    async def post_json(
        self, path: str, body: Any, *, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        async with self.http.post(
            f"{self.base_url}{path}", json=body, headers=headers or self.admin
        ) as r:
            return r.status, await r.json(content_type=None)

    async def event(self, event_id: str) -> dict[str, Any]:
        found: dict[str, Any] = await self.get_json(f"/api/v1/events/{event_id}")
        return found

    async def delivery(self, event_id: str, destination: str) -> dict[str, Any]:
        """The event's delivery to `destination`, with its attempt log."""
        for d in (await self.event(event_id))["deliveries"]:
            if d["destination"] == destination:
                found: dict[str, Any] = d
                return found
        raise AssertionError(f"event {event_id} has no delivery to {destination!r}")

    async def dead(self, destination: str) -> list[dict[str, Any]]:
        found = await self.get_json(f"/api/v1/dlq?destination={destination}&limit=10000")
        deliveries: list[dict[str, Any]] = found["deliveries"]
        return deliveries

    async def queue(self) -> dict[str, int]:
        """The queue's deliveries by state, from `GET /health/detailed`: those of pending,
        in_flight and dead that some delivery is in (the answer names all three, 0
        included; the history, succeeded and discarded, is not the queue's)."""
        found = await self.get_json("/health/detailed")
        by_state: dict[str, int] = found["checks"]["queue"]["by_state"]
        return {state: count for state, count in by_state.items() if count}


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str
) -> None:
    """Poll `condition` (state only the API or the database shows) until a deadline."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        await asyncio.sleep(0.1)


async def settled(hub: HubClient, database_url: str, *, timeout_s: float) -> dict[str, int]:
    """Wait until the hub says no delivery is pending or in flight; returns the store's
    counts by state, the history's included."""
    last: dict[str, int] = {}

    async def idle() -> bool:
        nonlocal last
        last = await hub.queue()
        return last.get("pending", 0) + last.get("in_flight", 0) == 0

    await wait_until(idle, timeout_s=timeout_s, what=f"an idle queue (last seen: {last})")
    counted = await query(database_url, "SELECT state, count(*) FROM deliveries GROUP BY state")
    return {state: int(n) for state, n in counted}


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        yield session


@contextlib.asynccontextmanager
async def hub_client(server: Server) -> AsyncIterator[HubClient]:
    """`server`'s HTTP surface, on a session of its own (closed after)."""
    async with client_session() as http:
        yield HubClient(server.base_url, http)


async def send_one_lead(server: Server) -> str:
    """One signed `lead.created` webhook (webhook-id msg_1), accepted (202): its event id."""
    async with hub_client(server) as hub:
        status, answer = await hub.post_signed({"type": "lead.created", "data": {}}, "msg_1")
    assert status == 202, answer
    return str(answer["id"])


# -- the database, read directly --------------------------------------------------------------


def _sync_url(database_url: str) -> str:
    if database_url.startswith("postgresql://"):
        return database_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    return database_url


def _query(database_url: str, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    engine = create_engine(_sync_url(database_url))
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), dict(params)).all()]
    finally:
        engine.dispose()


async def query(
    database_url: str, sql: str, params: Mapping[str, Any] | None = None
) -> list[tuple[Any, ...]]:
    """Rows of one read-only statement against the store (in a thread: the loop keeps going)."""
    return await asyncio.to_thread(_query, database_url, sql, params or {})


def _execute(database_url: str, statements: Sequence[str]) -> None:
    engine = create_engine(_sync_url(database_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


async def execute(database_url: str, *statements: str) -> None:
    """Run statements that change the store or the server (roles, grants), each committed."""
    await asyncio.to_thread(_execute, database_url, statements)


def summary(
    name: str,
    *,
    sent: int,
    acknowledged: int,
    delivered: int,
    duplicates: int,
    lost: int,
    started: float,
) -> None:
    print(
        f"{name}: sent={sent} acknowledged={acknowledged} delivered={delivered} "
        f"duplicates={duplicates} lost={lost} duration={time.monotonic() - started:.1f}s"
    )


def report(
    name: str,
    sink: Sink,
    acknowledged: Collection[Any],
    *,
    sent: int,
    lost: int,
    started: float,
) -> None:
    """The scenario's `summary`, with what arrived at `sink` (`acknowledged`: one item a
    webhook the hub acknowledged)."""
    summary(
        name,
        sent=sent,
        acknowledged=len(acknowledged),
        delivered=len(sink.delivered_ids),
        duplicates=sink.duplicates,
        lost=lost,
        started=started,
    )

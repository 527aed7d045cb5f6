"""Running estafeta: `serve` (HTTP + in-process workers) and `worker` (workers alone)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, NoReturn, TypeVar

import structlog
import uvicorn
from redis.asyncio import Redis

from estafeta.api.app import create_app
from estafeta.cancelling import cancel_and_wait
from estafeta.clock import Clock, StoreClock, SystemClock
from estafeta.config import Config
from estafeta.config.models import joined_listen, split_listen
from estafeta.connectors.registry import unavailable_kinds
from estafeta.delivery.presence import DELIVERY_TASK, Presence
from estafeta.delivery.worker import Worker, default_worker_id
from estafeta.errors import ConfigError, ServeError
from estafeta.http_protocol import OneWriteHttpToolsProtocol
from estafeta.hub import Hub
from estafeta.ingress.spool import Spool
from estafeta.observability.log_throttle import throttle_server_lines
from estafeta.observability.worker_endpoint import start_worker_endpoint
from estafeta.redis_client import connect_redis
from estafeta.redis_prefix import PrefixProcesses
from estafeta.stopping import stop_signals
from estafeta.store import open_store
from estafeta.store.sqlstore import SqlStore
from estafeta.supervise import Tasks, supervised

log = structlog.get_logger("estafeta.server")


STOP_SIGNALS = stop_signals()  # at import: the disposition the process was started with
T = TypeVar("T")


def force_stop(signum: int) -> NoReturn:
    """A second stop signal (SIGTERM, SIGINT, SIGHUP) during a graceful stop: end the process
    now, as a crash would (docs/operations.md, Stopping). Nothing is lost: a request is
    answered only after its commit, and leases not given back expire and are rescued. The
    process dies of the signal itself, so that its status says it did not stop gracefully.

    Safe in a Python signal handler: the line is written straight to stderr's descriptor,
    since the handler may interrupt this very thread in the middle of a log line, holding
    the logger's (non-reentrant) write lock."""
    name = signal.Signals(signum).name
    with contextlib.suppress(Exception):  # nothing may keep the process from ending
        line = _rendered("shutdown_forced", "warning", signal=name)
        if line is not None:
            os.write(2, f"{line}\n".encode())
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the signal did not end the process


def _rendered(event: str, level: str, **fields: Any) -> str | None:
    """`event` as the configured logger would print it; None if its level is filtered out."""
    config = structlog.get_config()
    wrapper = config["wrapper_class"]
    is_enabled_for = getattr(wrapper, "is_enabled_for", None)
    if is_enabled_for is not None and not is_enabled_for(None, logging.getLevelName(level.upper())):
        return None
    event_dict: Any = {"event": event, **fields}
    try:
        for processor in config["processors"]:
            event_dict = processor(None, level, event_dict)
    except structlog.DropEvent:
        return None
    return str(event_dict)


def log_stopping(signum: int) -> None:
    """The first stop signal: a graceful stop begins (another one forces it)."""
    log.info("stopping", signal=signal.Signals(signum).name)


def tune_garbage_collector() -> None:
    """Fewer, shorter collections: the ingest benchmark saw full collections stall the
    server for up to 78 ms (p99 87 → ~50 ms without them). Objects alive after start-up
    (modules, configuration, compiled statements) are frozen out of every later scan, and
    the young generation is collected less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine on uvloop (the fastest asyncio loop available here)."""
    import uvloop

    tune_garbage_collector()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def prepared_store(config: Config, *, migrate: bool = True) -> SqlStore:
    """The store, migrated and holding the configuration's tenants, sources and routes."""
    issues = unavailable_kinds(config)
    if issues:
        raise ConfigError(issues)
    store = open_store(config.storage.url)
    try:
        if migrate:
            await store.migrate()
        else:
            await store.require_schema()
        await store.sync_config(config, SystemClock().now_ms())
    except BaseException:
        await store.close()  # its connections, and their threads on SQLite
        raise
    return store


async def unless_stopped(
    step: Awaitable[T], undo: Callable[[T], Awaitable[object]] | None = None
) -> T | None:
    """A start-up step (connecting, migrating: it may wait for another process's migration),
    abandoned when a stop signal arrives meanwhile: None then. Before the server or the
    worker loop takes the signals over, they would kill the process (SIGTERM) or end it
    with click's `Aborted!` (SIGINT) instead of the graceful stop, exit 0, docs/cli.md
    promises. `undo` is given the result of a step that ended as the signal came (what
    it opened or recorded: the step itself cleans up only when cancelled)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        # The stop first, even if the step ended too (in the same turn as the signal): its
        # result taken, the process went on to serve, deaf to the signal it had consumed.
        if not stop.is_set():
            return task.result()
        # prepared_store closes its store when cancelled; a step that ended first is undone,
        # one that failed meanwhile says why.
        result = await cancel_and_wait(task)
        if result is not None and undo is not None:
            await undo(result)
        log.info("stopped_while_starting")
        return None
    finally:
        stopped.cancel()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def forced_by_signals() -> Iterator[None]:
    """The last steps of a stop (closing the store): a stop signal now ends the process
    at once, as a second one does during the graceful stop, instead of killing it silently
    (SIGTERM) or with click's `Aborted!` (SIGINT)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: force_stop(signum)) for sig in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def store_clock(store: SqlStore) -> StoreClock:
    """The clock of everything this process shares through the store (lease deadlines, due
    times, its presence): the store's, so that machines whose clocks disagree agree on it.
    Taken again at every announcement of the process's presence."""
    clock = StoreClock(store.clock_ms)
    await clock.sync()
    return clock


async def announced(
    store: SqlStore,
    config: Config,
    *,
    delivers: bool,
    tasks: Tasks,
    clock: Clock,
    redis: Redis | None = None,
) -> Presence:
    """This process's presence, recorded before it serves or delivers anything: a delivery
    it stores for a destination only its configuration has is then never taken by a worker
    on an older file for one nobody configures (delivery/presence.py). `tasks` are the
    process's supervised tasks: whether its delivery task keeps crashing. With `redis` (the
    client of `[redis] url`), raises RedisKeyPrefixShared when another store's processes use
    `[redis] key_prefix` (redis_prefix.py)."""
    process_id = default_worker_id()
    presence = Presence(
        store,
        config,
        process_id=process_id,
        clock=clock,
        delivers=delivers,
        tasks=tasks,
        redis=None
        if redis is None
        else PrefixProcesses(redis, config.redis.key_prefix, process_id),
    )
    await presence.refuse_shared_prefix()
    await presence.announce()
    return presence


async def announced_on_store_time(
    store: SqlStore, config: Config, *, tasks: Tasks, redis: Redis | None
) -> Presence:
    """A worker process's presence, recorded, on the store's time (`store_clock`)."""
    clock = await store_clock(store)
    return await announced(store, config, delivers=True, tasks=tasks, clock=clock, redis=redis)


class GracefulServer(uvicorn.Server):
    """uvicorn, minus re-raising SIGTERM/SIGINT after its graceful shutdown, and with a
    start that failed raised as a ServeError.

    uvicorn re-raises a captured signal once it has stopped, so that an embedding program
    dies of it; estafeta owns the process, and a stop that finished cleanly exits 0.
    A start that fails (the address in use or not permitted) makes uvicorn log why and exit
    with status 3, which is estafeta's status for a store that cannot be reached: it is
    raised as a ServeError instead (status 2), naming the address.
    """

    def __init__(
        self, config: uvicorn.Config, *, on_started: Callable[[list[str]], None] | None
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop serving, for signals
        self.address = f"{config.host}:{config.port}"  # as bound (the first), once started
        self.addresses = [self.address]  # every one bound, once started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except SystemExit:
            where = f"{self.config.host}:{self.config.port}"
            raise ServeError(f"cannot serve on {where}: see the error above") from None
        if self.started:
            # As bound: the port the system chose when 0 was asked, for each address a name
            # resolved to (localhost: 127.0.0.1 and ::1, each on a port of its own).
            self.addresses = [
                joined_listen(*sock.getsockname()[:2])
                for server in self.servers
                for sock in server.sockets
            ]
            self.address = self.addresses[0]
            if self._on_started is not None:
                self._on_started(self.addresses)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._loop = asyncio.get_running_loop()
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """A Python signal handler (it may run between any two bytecodes of this thread):
        the first signal asks uvicorn to stop gracefully, a second one during that stop ends
        the process at once. (uvicorn's own second SIGINT only skips the application's
        shutdown, and its second SIGTERM does nothing.)"""
        if self.should_exit:
            force_stop(sig)
        super().handle_exit(sig, frame)
        if self._loop is not None:  # logged from the loop: a log call here could deadlock
            self._loop.call_soon_threadsafe(log_stopping, sig)


def uvicorn_server(
    app: Any,
    listen: str,
    *,
    max_concurrent_requests: int = 4096,
    client_timeout_s: float = 30,
    idle_timeout_s: int = 5,
    on_started: Callable[[list[str]], None] | None = None,
) -> GracefulServer:
    """The server of `app` on `listen`; `on_started` is called with the addresses bound once
    it listens. A connection that begins no request for `idle_timeout_s` is closed; a
    client gets `client_timeout_s` to send a request whole and to take an answer
    (http_protocol.py)."""
    host, port = split_listen(listen)
    settings = uvicorn.Config(
        app,
        host=host,
        port=port,
        # httptools, one write per response, and the clients' deadlines
        http=OneWriteHttpToolsProtocol.with_deadline(client_timeout_s),
        timeout_keep_alive=idle_timeout_s,
        loop="none",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=30,
        # Bounded memory under any load: past this many connections or requests at once,
        # answer 503.
        limit_concurrency=max_concurrent_requests,
    )
    # After uvicorn.Config, which (re)configures uvicorn's loggers.
    throttle_server_lines(logging.getLogger("uvicorn.error"))
    return GracefulServer(settings, on_started=on_started)


async def started_hub(
    config: Config, store: SqlStore, *, run_workers: bool
) -> tuple[Hub, Presence, Tasks]:
    """`serve`'s hub on the store's time, and its process's presence recorded: reads and
    writes of the store that may wait (the store slow, a lock held), hence run under
    `unless_stopped` as connecting is."""
    clock = await store_clock(store)
    try:
        spool = Spool(
            config.storage.spool_dir, max_bytes=config.storage.spool_max_bytes, clock=clock
        )
    except OSError as exc:  # a setting to correct: one line, exit 2
        where = config.storage.spool_dir
        raise ServeError(f"cannot use storage.spool_dir {where!r}: {exc.strerror}") from None
    hub = Hub(config, store, spool=spool, clock=clock)
    # Recorded once nothing is left that could fail before the server's own shutdown,
    # which retires it (delivery/presence.py).
    tasks = Tasks()
    try:
        presence = await announced(
            store, config, delivers=run_workers, tasks=tasks, clock=clock, redis=hub.redis
        )
    except BaseException:  # a stop signal's cancellation too
        await hub.close()  # its Redis client, which the app's shutdown closes otherwise
        raise
    return hub, presence, tasks


async def _closed(store: SqlStore) -> None:
    """Undo `prepared_store` (a stop signal came as it ended)."""
    await store.close()


async def _retired(presence: Presence) -> None:
    """Undo `announced_on_store_time` (a stop signal came as it ended)."""
    await presence.retire()


async def _hub_closed(started: tuple[Hub, Presence, Tasks]) -> None:
    """Undo `started_hub` (a stop signal came as it ended): as the app's shutdown would."""
    hub, presence, _ = started
    await presence.retire()
    await hub.close()


async def serve(config: Config, *, run_workers: bool = True, migrate: bool = True) -> None:
    store = await unless_stopped(prepared_store(config, migrate=migrate), undo=_closed)
    if store is None:
        return
    try:
        started = await unless_stopped(
            started_hub(config, store, run_workers=run_workers), undo=_hub_closed
        )
        if started is None:
            return
        hub, presence, tasks = started
        server = uvicorn_server(
            create_app(hub, run_workers=run_workers, presence=presence, tasks=tasks),
            config.server.listen,
            max_concurrent_requests=config.server.max_concurrent_requests,
            client_timeout_s=config.server.client_timeout_s,
            # Once it listens: the workers start before, and stop if it cannot.
            on_started=lambda addresses: log.info(
                "serving",
                listen=addresses[0],
                addresses=addresses,
                workers=run_workers,
                engine=store.dialect,
            ),
        )
        gc.collect()
        gc.freeze()  # the app, the store and the configuration live as long as the process
        await server.serve()  # uvicorn turns SIGTERM/SIGINT into a graceful shutdown
        log.info("server_stopped", listen=server.address, addresses=server.addresses)
    finally:
        with forced_by_signals():  # the server's handlers are gone: it is stopping anyway
            await store.close()


async def work(config: Config) -> None:
    """Delivery workers alone, for scale-out; the STOP_SIGNALS stop them gracefully."""
    store = await unless_stopped(prepared_store(config, migrate=False), undo=_closed)
    if store is None:
        return
    stop = asyncio.Event()

    def stop_signal(signum: int) -> None:
        if stop.is_set():  # a second one during the graceful stop
            force_stop(signum)
        log_stopping(signum)
        stop.set()

    tasks = Tasks()
    endpoint = None
    # The presence's own client: the worker's components each have theirs (a worker is
    # restarted with new ones after a crash).
    redis = connect_redis(config.redis.url) if config.redis.url else None
    try:
        if config.worker.metrics_listen is not None:
            endpoint = await start_worker_endpoint(config.worker.metrics_listen, tasks)
        # Still starting: the store's time and the first record of the presence may wait
        # for the store (slow, a lock held), and a stop signal ends the start there.
        presence = await unless_stopped(
            announced_on_store_time(store, config, tasks=tasks, redis=redis), undo=_retired
        )
        if presence is None:
            return
        clock = presence.clock
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop_signal, sig)

        def worker() -> Awaitable[None]:
            return Worker(
                store,
                config,
                clock=clock,
                worker_id=presence.process_id,
                started_ms=presence.started_ms,
            ).run(stop)

        await asyncio.gather(
            supervised(DELIVERY_TASK, worker, stop, tasks=tasks),
            supervised("presence", lambda: presence.run(stop), stop, tasks=tasks),
        )
    finally:
        if endpoint is not None:
            await endpoint.cleanup()
        if redis is not None:
            await redis.aclose()
        await store.close()

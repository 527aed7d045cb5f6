"""The `estafeta` command (DESIGN.md §3.1)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tomllib
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from pydantic import ValidationError

from estafeta import __version__
from estafeta.clock import SystemClock, iso_from_ms, ms_from_iso
from estafeta.config import Config, check_config, load_config, load_config_dict
from estafeta.config.models import ServerConfig, mask_url
from estafeta.errors import (
    ConfigError,
    EstafetaError,
    StoreError,
    StoreLoginRefused,
    StoreUnavailable,
)
from estafeta.observability.logging import configure_logging
from estafeta.store import open_store
from estafeta.store.records import DeadLetterFilter, DeliveryView
from estafeta.store.sqlstore import SqlStore

T = TypeVar("T")
DEFAULT_CONFIG = "estafeta.toml"
MAX_LIMIT = 1_000_000  # dead deliveries one `dlq` command takes at most

config_option = click.option(
    "--config",
    "config_path",
    envvar="ESTAFETA_CONFIG",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="the configuration file (a missing default file means: defaults and env only)",
)


def _load(config_path: str) -> Config:
    """The configuration, or exit 2 with every problem printed."""
    try:
        if config_path == DEFAULT_CONFIG and not Path(config_path).exists():
            return load_config_dict({})
        return load_config(config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)


def _exiting_on_errors(config: Config, command: Callable[[], T]) -> T:
    """Run a command; an estafeta error ends it with one line on stderr and the status of
    docs/cli.md: 3 when the store cannot be reached, else 2. A store's error names the
    database first (password masked, query left out), since the default file or
    ESTAFETA_DATABASE_URL may not lead where the operator meant."""
    try:
        return command()
    except EstafetaError as exc:
        of_store = isinstance(exc, StoreError)
        where = f"{mask_url(config.storage.url).split('?')[0]}: " if of_store else ""
        click.echo(f"error: {where}{exc}", err=True)
        refused = isinstance(exc, StoreLoginRefused)  # a setting to correct, not an outage
        sys.exit(3 if isinstance(exc, StoreUnavailable) and not refused else 2)


def _run(config: Config, make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return _exiting_on_errors(config, lambda: asyncio.run(main()))


def _run_service(config: Config, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a long-lived service on uvloop; the same exit codes as the other commands."""
    from estafeta.server import run

    _exiting_on_errors(config, lambda: run(main))


async def _with_store(
    config: Config, action: Callable[[SqlStore], Awaitable[T]], *, migrating: bool = False
) -> T:
    store = open_store(config.storage.url)
    try:
        if not migrating:
            await store.require_schema()
        return await action(store)
    finally:
        await store.close()


def _checked_log_level(value: str) -> str:
    if not isinstance(logging.getLevelName(value.upper()), int):  # else the level's name
        raise click.BadParameter(f"{value!r}: use debug, info, warning or error")
    return value


@click.group()
@click.version_option(__version__, prog_name="estafeta")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="ESTAFETA_LOG_LEVEL",
    callback=lambda _ctx, _param, value: _checked_log_level(value),
    help="debug, info, warning or error",
)
def main(log_level: str) -> None:
    """estafeta: receive webhooks, route them, deliver them, never lose one."""
    configure_logging(log_level)


@main.command()
@config_option
@click.option("--no-workers", is_flag=True, help="HTTP only; run `estafeta worker` elsewhere")
@click.option("--no-migrate", is_flag=True, help="do not upgrade the schema at start")
@click.option(
    "--listen",
    default=None,
    callback=lambda _ctx, _param, value: _checked_listen(value),
    help="host:port, overriding server.listen",
)
def serve(config_path: str, no_workers: bool, no_migrate: bool, listen: str | None) -> None:
    """The HTTP server: ingress, API, health; with delivery workers unless --no-workers."""
    from estafeta.server import serve as serve_hub

    config = _load(config_path)
    if listen:
        config = config.model_copy(
            update={"server": config.server.model_copy(update={"listen": listen})}
        )
    _run_service(
        config, lambda: serve_hub(config, run_workers=not no_workers, migrate=not no_migrate)
    )


def _checked_listen(value: str | None) -> str | None:
    """--listen, checked as server.listen is (the copy of the configuration is not)."""
    try:
        return value if value is None else ServerConfig(listen=value).listen
    except ValidationError as exc:
        raise click.BadParameter(str(exc.errors()[0]["ctx"]["error"])) from None


@main.command()
@config_option
def worker(config_path: str) -> None:
    """Delivery workers only (scale-out: run many against one PostgreSQL)."""
    from estafeta.server import work

    config = _load(config_path)
    _run_service(config, lambda: work(config))


@main.command()
@config_option
def migrate(config_path: str) -> None:
    """Create or upgrade the store's schema."""
    config = _load(config_path)

    async def action(store: SqlStore) -> None:
        await store.migrate()
        if config.tenants:
            await store.sync_config(config, SystemClock().now_ms())

    _run(config, lambda: _with_store(config, action, migrating=True))
    engine = "sqlite" if config.storage.url.startswith("sqlite") else "postgresql"
    click.echo(f"schema is up to date ({engine})")


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
def check_config_command(file: str) -> None:
    """Validate a configuration file; print every problem with its location."""
    from estafeta.connectors.registry import unavailable_kinds_of

    issues = check_config(file)
    reported = {issue.location for issue in issues}
    issues += [
        issue
        for issue in unavailable_kinds_of(_destination_kinds(file))
        if issue.location not in reported  # an invalid kind is reported as such already
    ]
    if issues:
        for issue in issues:
            # Syntax errors and a missing file are located in the file itself already.
            located = str(issue).startswith(file)
            click.echo(str(issue) if located else f"{file}: {issue}", err=True)
        click.echo(f"{len(issues)} problem(s) found", err=True)
        sys.exit(1)
    click.echo(f"{file}: ok")


def _destination_kinds(file: str) -> list[object]:
    """Each `[[destinations]]` table's `kind` as written ([] when the file does not parse:
    that is reported already)."""
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except (OSError, ValueError):  # unreadable, not UTF-8, not TOML: reported already
        return []
    destinations = data.get("destinations")
    if not isinstance(destinations, list):
        return []
    return [d.get("kind") if isinstance(d, dict) else None for d in destinations]


@main.group()
def keys() -> None:
    """Tenant API keys."""


@keys.command("create")
@config_option
@click.option("--tenant", required=True, help="the tenant the key belongs to")
@click.option("--label", default="", help="a note to recognise the key by")
def keys_create(config_path: str, tenant: str, label: str) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    from estafeta.api.auth import hash_key, new_api_key

    config = _load(config_path)
    key = new_api_key()

    async def action(store: SqlStore) -> str:
        if not await store.tenant_exists(tenant):
            raise EstafetaError(f"no tenant {tenant!r} in the store (run `estafeta migrate`)")
        return await store.create_api_key(
            tenant_id=tenant, key_hash=hash_key(key), label=label, now_ms=SystemClock().now_ms()
        )

    key_id = _run(config, lambda: _with_store(config, action))
    click.echo(key)
    click.echo(f"(key {key_id} for tenant {tenant}; store it now, it is not shown again)", err=True)


# -- the dead-letter queue ------------------------------------------------------------------


def _dlq_filter(
    tenant: str | None,
    destination: str | None,
    event_type: str | None,
    since: str | None,
    until: str | None,
    ids: tuple[str, ...],
    limit: int | None,
) -> DeadLetterFilter:
    try:
        return DeadLetterFilter(
            tenant_id=tenant,
            delivery_ids=ids,
            destination_id=destination,
            event_type=event_type,
            since=ms_from_iso(since) if since else None,
            until=ms_from_iso(until) if until else None,
            limit=limit,
        )
    except ValueError as exc:
        raise click.BadParameter(f"--since/--until must be ISO 8601 times ({exc})") from None


def dlq_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            config_option,
            click.option("--tenant", default=None, help="only this tenant's deliveries"),
            click.option("--destination", default=None, help="only to this destination"),
            click.option("--event-type", default=None, help="only events of this type"),
            click.option("--since", default=None, help="dead since (ISO 8601)"),
            click.option("--until", default=None, help="dead before (ISO 8601)"),
            click.option("--id", "ids", multiple=True, help="a delivery id (repeatable)"),
            click.option(
                "--limit",
                default=None,
                type=click.IntRange(1, MAX_LIMIT),  # past a bigint, the driver's traceback
                help="at most this many  [default: as many as --id names, else 1000]",
            ),
        ]
    ):
        function = option(function)
    return function


async def _require_known(store: SqlStore, chosen: DeadLetterFilter) -> None:
    """A tenant or destination the store does not know selects nothing, whatever the DLQ
    holds: a typo, which "0 dead deliveries" would hide."""
    named = (
        ("--tenant", "tenant", chosen.tenant_id, store.tenant_exists),
        ("--destination", "destination", chosen.destination_id, store.destination_exists),
    )
    for option, what, name, exists in named:
        if name is not None and not await exists(name):
            raise EstafetaError(f"{option} {name!r}: no such {what} in the store")


@main.group()
def dlq() -> None:
    """Operate the dead-letter queue."""


@dlq.command("list")
@dlq_options
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def dlq_list(config_path: str, as_json: bool, **selection: Any) -> None:
    """List dead deliveries."""
    config = _load(config_path)
    chosen = _dlq_filter(**selection)

    async def action(store: SqlStore) -> list[DeliveryView]:
        await _require_known(store, chosen)
        return await store.list_dead(chosen)

    found = _run(config, lambda: _with_store(config, action))
    for d in found:
        if as_json:
            from estafeta.api.views import delivery_json

            click.echo(orjson.dumps(delivery_json(d)).decode())
        else:
            click.echo(
                f"{d.id}  {d.tenant_id}  {d.destination_id}  {d.event_type}  "
                f"attempts={d.attempts}  dead_at={iso_from_ms(d.updated_at)}  {d.last_error or ''}"
            )
    click.echo(f"{len(found)} dead deliveries", err=True)


def _move(config_path: str, action_name: str, everything: bool, **selection: Any) -> None:
    config = _load(config_path)
    chosen = _dlq_filter(**selection)
    # Judged on the options as given: a filter's parsed value may be falsy (--since the epoch).
    named = [name for name, value in selection.items() if value and name != "limit"]
    if not (everything or named):
        raise click.UsageError("name --id, a filter, or --all")
    actor = f"cli:{os.environ.get('USER', 'operator')}"

    async def action(store: SqlStore) -> list[str]:
        await _require_known(store, chosen)
        operation = store.replay if action_name == "replay" else store.discard
        return await operation(chosen, actor=actor, now_ms=SystemClock().now_ms())

    moved = _run(config, lambda: _with_store(config, action))
    for delivery_id in moved:
        click.echo(delivery_id)
    past = "replayed" if action_name == "replay" else "discarded"
    click.echo(f"{len(moved)} deliveries {past}", err=True)


@dlq.command("replay")
@dlq_options
@click.option("--all", "everything", is_flag=True, help="every dead delivery")
def dlq_replay(config_path: str, everything: bool, **selection: Any) -> None:
    """Put dead deliveries back to pending with fresh attempts (recorded in the audit log)."""
    _move(config_path, "replay", everything, **selection)


@dlq.command("discard")
@dlq_options
@click.option("--all", "everything", is_flag=True, help="every dead delivery")
def dlq_discard(config_path: str, everything: bool, **selection: Any) -> None:
    """Give up on dead deliveries for good (recorded in the audit log)."""
    _move(config_path, "discard", everything, **selection)


@main.command()
@click.option(
    "--dir",
    "workdir",
    default=None,
    type=click.Path(file_okay=False),
    help="where the demo keeps its database (a new or empty directory)",
)
@click.option("--events", "event_count", default=20, show_default=True, type=click.IntRange(1))
@click.option(
    "--listen",
    default=None,
    callback=lambda _ctx, _param, value: _checked_listen(value),
    help="host:port for the demo's hub  [default: a free port on 127.0.0.1]",
)
def demo(workdir: str | None, event_count: int, listen: str | None) -> None:
    """An end-to-end demonstration on SQLite with local sinks."""
    from estafeta.demo.story import run_demo

    if workdir is not None:
        _demo_directory(Path(workdir))
    configure_logging("error")
    try:
        code = run_demo(workdir=workdir, event_count=event_count, listen=listen)
    except EstafetaError as exc:  # e.g. the address in use: one line, as `serve` says it
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


def _demo_directory(workdir: Path) -> None:
    """Make the demo's directory, refusing one that holds an installation: the demo writes
    its own estafeta.toml and fills estafeta.db, and its story fails on a database where it
    has run before (every webhook a duplicate)."""
    taken = [name for name in ("estafeta.toml", "estafeta.db") if (workdir / name).exists()]
    if taken:
        raise click.BadParameter(
            f"{workdir} already holds {' and '.join(taken)} (an earlier demo's, or an "
            "installation's): name a new or empty directory",
            param_hint="'--dir'",
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"{workdir}: {exc.strerror}", param_hint="'--dir'") from None

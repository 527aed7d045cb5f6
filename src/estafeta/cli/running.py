"""The commands that run estafeta or prepare it: serve, worker, migrate, check-config, demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from estafeta.cli.common import (
    TEXT,
    checked_address,
    config_option,
    counted,
    in_file,
    load,
    load_file,
    out,
    run,
    run_service,
    with_store,
)
from estafeta.clock import SystemClock
from estafeta.config.loader import read_config_file, resolve_env
from estafeta.errors import ConfigError, ConfigIssue, EstafetaError
from estafeta.observability.logging import configure_logging
from estafeta.store.sqlstore import SqlStore


@click.command()
@config_option
@click.option("--no-workers", is_flag=True, help="HTTP only; run `estafeta worker` elsewhere")
@click.option("--no-migrate", is_flag=True, help="do not upgrade the schema at start")
@click.option(
    "--listen",
    default=None,
    callback=lambda _ctx, _param, value: checked_address(value),
    help="host:port, overriding server.listen",
)
def serve(config_path: str, no_workers: bool, no_migrate: bool, listen: str | None) -> None:
    """The HTTP server: ingress, API, health; with delivery workers unless --no-workers."""
    from estafeta.server import serve as serve_hub

    options = {"--listen": ("server.listen", listen)} if listen else None
    config = load(config_path, delivers=True, options=options)
    run_service(
        config, lambda: serve_hub(config, run_workers=not no_workers, migrate=not no_migrate)
    )


@click.command()
@config_option
@click.option(
    "--metrics-listen",
    default=None,
    callback=lambda _ctx, _param, value: checked_address(value),
    help="host:port for this worker's /metrics and /health, overriding worker.metrics_listen",
)
def worker(config_path: str, metrics_listen: str | None) -> None:
    """Delivery workers only (scale-out: run many against one PostgreSQL)."""
    from estafeta.server import work

    options = (
        {"--metrics-listen": ("worker.metrics_listen", metrics_listen)} if metrics_listen else None
    )
    config = load(config_path, delivers=True, options=options)
    run_service(config, lambda: work(config))


@click.command()
@config_option
def migrate(config_path: str) -> None:
    """Create or upgrade the store's schema."""
    config = load(config_path)

    async def action(store: SqlStore) -> None:
        await store.migrate()
        if config.tenants:
            await store.sync_config(config, SystemClock().now_ms())

    run(config, lambda: with_store(config, action, migrating=True))
    engine = "sqlite" if config.storage.url.startswith("sqlite") else "postgresql"
    out(f"schema is up to date ({engine})")


@click.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
def check_config_command(file: str) -> None:
    """Validate a configuration file; print every problem with its location."""
    from estafeta.connectors.registry import unavailable_kinds_of

    try:
        load_file(file)
        issues: list[ConfigIssue] = []
    except ConfigError as exc:
        issues = exc.issues  # each located in the file
    reported = {issue.location for issue in issues}
    issues += [
        issue
        for issue in in_file(file, unavailable_kinds_of(_destination_kinds(file)))
        if issue.location not in reported  # an invalid kind is reported as such already
    ]
    if issues:
        for issue in issues:
            click.echo(str(issue), err=True)
        click.echo(f"{counted(len(issues), 'problem', 'problems')} found", err=True)
        sys.exit(1)
    out(f"{file}: ok")


def _destination_kinds(file: str) -> list[object]:
    """Each `[[destinations]]` table's `kind` as `serve` will read it, its `${VAR}`
    substituted ([] when the file cannot be read: that is reported already)."""
    try:
        data = resolve_env(read_config_file(file))
    except ConfigError:
        return []
    destinations = data.get("destinations")
    if not isinstance(destinations, list):
        return []
    return [d.get("kind") if isinstance(d, dict) else None for d in destinations]


@click.command()
@click.option(
    "--dir",
    "workdir",
    default=None,
    type=click.Path(file_okay=False),
    # Written into the demo's estafeta.toml (UTF-8): a path that is not ended the demo
    # with a traceback, after making the directory.
    callback=lambda ctx, param, value: value and TEXT.convert(value, param, ctx),
    help="where the demo keeps its database (a new or empty directory)",
)
@click.option("--events", "event_count", default=20, show_default=True, type=click.IntRange(1))
@click.option(
    "--listen",
    default=None,
    callback=lambda _ctx, _param, value: checked_address(value),
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
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)  # see run_demo
    except OSError as exc:
        raise click.BadParameter(f"{workdir}: {exc.strerror}", param_hint="'--dir'") from None

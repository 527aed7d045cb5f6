"""What every `estafeta` command shares: the --config option, loading the configuration,
running against the store, and the exit codes of docs/cli.md (2: a setting or input to
correct, 3: the store cannot be reached)."""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import unicodedata
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import parse_qsl

import click
from sqlalchemy import make_url

from estafeta.config import Config, load_config_dict
from estafeta.config.loader import read_config_file
from estafeta.config.models import check_address, mask_url
from estafeta.errors import (
    ConfigError,
    ConfigIssue,
    EstafetaError,
    StoreError,
    StoreLoginRefused,
    StoreUnavailable,
)
from estafeta.store import open_store
from estafeta.store.sqlstore import SqlStore

T = TypeVar("T")
DEFAULT_CONFIG = "estafeta.toml"

config_option = click.option(
    "--config",
    "config_path",
    envvar="ESTAFETA_CONFIG",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="the configuration file (a missing default file means: defaults and env only)",
)


def load(
    config_path: str,
    *,
    delivers: bool = False,
    options: Mapping[str, tuple[str, str]] | None = None,
) -> Config:
    """The configuration, or exit 2 with every problem printed. `delivers`: for a command
    that sends (serve, worker), a destination kind this version cannot deliver to is one.
    `options`: the command's options that replace a key (see `load_config_dict`)."""
    try:
        if config_path == DEFAULT_CONFIG and not Path(config_path).exists():
            return load_config_dict({}, options=options)  # no destinations but the file's
        config = load_file(config_path, options)
        if delivers:
            from estafeta.connectors.registry import unavailable_kinds

            issues = unavailable_kinds(config)
            if issues:
                raise ConfigError(in_file(config_path, issues))
        return config
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)


def load_file(file: str, options: Mapping[str, tuple[str, str]] | None = None) -> Config:
    """The configuration in `file`; a ConfigError's every problem is located in the file
    (`FILE: server.listen: …`, as check-config prints it): the file ESTAFETA_CONFIG or the
    working directory chose may not be the one the operator edited."""
    data = read_config_file(file)  # a file that cannot be read or parsed is named already
    try:
        return load_config_dict(data, options=options)
    except ConfigError as exc:
        raise ConfigError(in_file(file, exc.issues)) from None


def in_file(file: str, issues: list[ConfigIssue]) -> list[ConfigIssue]:
    """`issues` of the keys of `file`, each located in it."""
    return [
        ConfigIssue(f"{file}: {issue.location}" if issue.location else file, issue.message)
        for issue in issues
    ]


def exiting_on_errors(config: Config, command: Callable[[], T]) -> T:
    """Run a command; an estafeta error ends it with one line on stderr and the status of
    docs/cli.md: 3 when the store cannot be reached, else 2. A store's error names the
    database first (password masked, query left out), since the default file or
    ESTAFETA_DATABASE_URL may not lead where the operator meant."""
    try:
        return command()
    except ConfigError as exc:  # the store's setting, found wrong as the store opened
        if _url_from_env():
            exc = ConfigError(
                [
                    ConfigIssue(i.location, f"{i.message} (the value of {DATABASE_URL_ENV})")
                    if i.location == "storage.url"
                    else i
                    for i in exc.issues
                ]
            )
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except EstafetaError as exc:
        click.echo(f"error: {error_text(config, exc)}", err=True)
        refused = isinstance(exc, StoreLoginRefused)  # a setting to correct, not an outage
        sys.exit(3 if isinstance(exc, StoreUnavailable) and not refused else 2)


def error_text(config: Config, exc: EstafetaError) -> str:
    """`exc` as the commands say it: a store's error names the database first."""
    where = f"{database_named(config.storage.url)}: " if isinstance(exc, StoreError) else ""
    return f"{where}{exc}"


def database_named(url: str) -> str:
    """The database as an error names it: its URL, password masked, query left out but for
    its host and port, and for a SQLite file's relative path the file it leads to (from the
    working directory, which under a service manager is not where the operator stands),
    and whether ESTAFETA_DATABASE_URL set it."""
    where, _, query = mask_url(url).partition("?")
    # But where the server is: a socket directory (`?host=/var/run/postgresql`) or a port.
    place = [(key, value) for key, value in parse_qsl(query) if key in ("host", "port")]
    if place:
        where += "?" + "&".join(f"{key}={value}" for key, value in place)
    notes = []
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and not os.path.isabs(path):
            notes.append(os.path.abspath(path))
    if _url_from_env():  # not the file's: the operator would search the file for it
        notes.append(f"from {DATABASE_URL_ENV}")
    return f"{where} ({', '.join(notes)})" if notes else where


DATABASE_URL_ENV = "ESTAFETA_DATABASE_URL"


def _url_from_env() -> bool:
    """Whether storage.url is ESTAFETA_DATABASE_URL's (an empty one is unset: loader.py)."""
    return bool(os.environ.get(DATABASE_URL_ENV))


class OutputFailed(click.ClickException):
    """stdout cannot take a command's output (closed, a full disk): exit 2 saying why."""

    exit_code = 2
    done = ""  # what the command did all the same, said after why

    def show(self, file: IO[Any] | None = None) -> None:
        done = f": {self.done}" if self.done else ""
        click.echo(f"error: cannot write to stdout ({self.message}){done}", err=True)


def out(line: str) -> None:
    """A line of a command's result on stdout. A reader that has gone (`| head -1`) ends
    the command quietly, exit 0, as `cat` would; a stdout closed (`>&-`) or full is an
    error, exit 2. (click.echo drops lines written to a closed stdout without a word, lets
    a full disk out as a traceback, and ends at a gone reader with exit 1, unexplained.)"""
    try:
        if sys.stdout is None:
            raise OSError(errno.EBADF, "it is closed")
        click.echo(line)
    except OSError as exc:
        drain_stdout()
        if exc.errno == errno.EPIPE:
            raise click.exceptions.Exit(0) from None
        raise OutputFailed(exc.strerror or str(exc)) from None


def drain_stdout() -> None:
    """stdout's descriptor pointed at /dev/null: what its buffers still hold goes there at
    exit, not into a second error ("Exception ignored ... BrokenPipeError")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # closed, or not a file (a test's)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def run(config: Config, make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return exiting_on_errors(config, lambda: asyncio.run(main()))


def run_service(config: Config, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a long-lived service on uvloop; the same exit codes as the other commands."""
    from estafeta.server import run as run_on_uvloop

    exiting_on_errors(config, lambda: run_on_uvloop(main))


async def with_store(
    config: Config, action: Callable[[SqlStore], Awaitable[T]], *, migrating: bool = False
) -> T:
    store = open_store(config.storage.url)
    try:
        if not migrating:
            await store.require_schema()
        return await action(store)
    finally:
        await store.close()


def in_store(config: Config, action: Callable[[SqlStore], Awaitable[T]]) -> T:
    """`action` against the configured store (whose schema must be this version's)."""
    return run(config, lambda: with_store(config, action))


def checked_address(value: str | None) -> str | None:
    """--listen or --metrics-listen, checked as the configuration's addresses are, and
    refused as a usage error of the option (before the configuration is read)."""
    try:
        return value if value is None else check_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


class Utf8Text(click.types.StringParamType):
    """Text that must be UTF-8: a byte that is not (a Latin-1 terminal, a script's encoding)
    reaches Python as a lone surrogate, which neither SQLite nor PostgreSQL can store."""

    def __init__(self, *, empty: bool = True) -> None:
        self.empty = empty

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = super().convert(value, param, ctx)
        try:
            text.encode()
        except UnicodeEncodeError:
            self.fail(f"'{printable(text)}' is not valid UTF-8", param, ctx)
        if not text and not self.empty:
            # An id or a type is never empty: it would select nothing, said by no one.
            self.fail("must not be empty", param, ctx)
        return text


TEXT = Utf8Text()
NAME = Utf8Text(empty=False)  # what names something of the store: a tenant, an id, a type


class Label(Utf8Text):
    """A note to recognise something by: shown on one line, so bounded, with no control
    characters (a newline, ESC)."""

    MAX = 200

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = super().convert(value, param, ctx)
        if len(text) > self.MAX:
            self.fail(f"at most {self.MAX} characters, not {len(text)}", param, ctx)
        controls = [ch for ch in text if unicodedata.category(ch) in ("Cc", "Zl", "Zp")]
        if controls:
            self.fail(
                f"must not contain control characters ('{printable(controls[0])}')", param, ctx
            )
        return text


LABEL = Label()

# Characters a terminal acts on instead of showing: controls (ESC starts a sequence that can
# rewrite the screen), format characters (a right-to-left override reorders what follows),
# line or paragraph separators, and surrogates (bytes that were not UTF-8).
_UNPRINTABLE = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def printable(text: str) -> str:
    """`text` with every character a terminal would act on written as its escape (`\\x1b`,
    `\\u202e`); a label, an event's type or a destination's error is whatever someone else
    wrote, and is shown on the operator's terminal."""
    return "".join(
        ch.encode("unicode_escape").decode() if unicodedata.category(ch) in _UNPRINTABLE else ch
        for ch in text
    )


def operator() -> str:
    """Who runs the command, as the audit log names them."""
    return f"cli:{os.environ.get('USER', 'operator')}"


def counted(count: int, singular: str, plural: str) -> str:
    """'1 dead delivery', '2 dead deliveries': the totals the commands print."""
    return f"{count} {singular if count == 1 else plural}"

"""The `estafeta` command (DESIGN.md §3.1): one module per group of commands.

* `running.py`: serve, worker, migrate, check-config, demo;
* `dlq.py`: the dead-letter queue;
* `keys.py`: tenants' API keys;
* `common.py`: the --config option, the store, and the exit codes every command shares.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from collections.abc import Iterator
from typing import Any

import click

from estafeta import __version__
from estafeta.cli import dlq, keys, running
from estafeta.cli.common import OutputFailed, drain_stdout
from estafeta.observability.logging import configure_logging


@contextlib.contextmanager
def _reader_gone_is_the_end() -> Iterator[None]:
    """The reader of stdout gone (`estafeta --help | head -1`): the end, quietly, exit 0,
    as for the commands' own output (common.out). click ends with exit 1, unexplained."""
    try:
        yield
    except BrokenPipeError:
        drain_stdout()
        raise click.exceptions.Exit(0) from None


@contextlib.contextmanager
def _interrupted_is_130() -> Iterator[None]:
    """Ctrl-C where a command has no handler of its own (serve, worker, demo and a `dlq`
    move have theirs): one line and the shell's status for SIGINT, 130, where click said
    "Aborted!" with exit 1, the status of an unexpected failure. What the command had not
    committed is rolled back with its transaction; a command that undid more says so in the
    interrupt's text (`keys create`: the key it had made, revoked), in place of "stopped"."""
    try:
        yield
    except KeyboardInterrupt as exc:
        # What the interrupted work left behind (a connection attempt's future) would be
        # logged at exit as "Future exception was never retrieved": it was abandoned.
        logging.getLogger("asyncio").disabled = True
        with contextlib.suppress(OSError):  # stderr a terminal that hung up
            done = str(exc.args[0]) if exc.args else "stopped"
            click.echo(f"error: interrupted (Ctrl-C): {done}", err=True)
        raise click.exceptions.Exit(130) from None


def _in_echo(exc: BaseException) -> bool:
    """Whether `exc` was raised writing output (click.echo: --help, --version, a message):
    the innermost frame of its traceback is click's echo."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is click.utils.echo.__code__


class _Estafeta(click.Group):
    """The `estafeta` group, whose own output (--help, --version) is written as the
    commands' is: click lets a full stdout's error out as a traceback."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _reader_gone_is_the_end():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _reader_gone_is_the_end(), _interrupted_is_130():
            return super().invoke(ctx)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except OSError as exc:
            if exc.errno == errno.EPIPE or not _in_echo(exc):
                raise
            drain_stdout()
            OutputFailed(exc.strerror or str(exc)).show()
            sys.exit(OutputFailed.exit_code)


@click.group(cls=_Estafeta)
@click.version_option(__version__, prog_name="estafeta")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="ESTAFETA_LOG_LEVEL",
    # The documented levels only: Python's logging also knows critical, warn, fatal, notset.
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="the least severe level logged",
)
def main(log_level: str) -> None:
    """estafeta: receive webhooks, route them, deliver them, never lose one."""
    configure_logging(log_level)


for command in (
    running.serve,
    running.worker,
    running.migrate,
    running.check_config_command,
    running.demo,
    dlq.dlq,
    keys.keys,
):
    main.add_command(command)

__all__ = ["main"]

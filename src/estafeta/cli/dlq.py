"""`estafeta dlq list / replay / discard`: the dead-letter queue, from the command line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import click
import orjson

from estafeta.cli.common import (
    NAME,
    OutputFailed,
    config_option,
    counted,
    in_store,
    load,
    operator,
    out,
    printable,
)
from estafeta.clock import iso_from_ms, ms_from_iso
from estafeta.config import Config
from estafeta.delivery.attempts import attempt_limits
from estafeta.errors import EstafetaError
from estafeta.stopping import stop_signals
from estafeta.store.dead_letters import MoveProgress
from estafeta.store.records import DeadLetterFilter
from estafeta.store.sqlstore import SqlStore

T = TypeVar("T")

MAX_LIMIT = 1_000_000  # dead deliveries one `dlq` command takes at most
MAX_IDS = 10_000  # as POST /api/v1/dlq/replay: past 32767, more than PostgreSQL's parameters
LIST_PAGE = 1_000  # dead deliveries `dlq list` reads (and holds) at a time


def _dlq_filter(
    tenant: str | None,
    destination: str | None,
    event_type: str | None,
    since: str | None,
    until: str | None,
    ids: tuple[str, ...],
    limit: int | None,
) -> DeadLetterFilter:
    chosen = DeadLetterFilter(
        tenant_id=tenant,
        delivery_ids=ids,
        destination_id=destination,
        event_type=event_type,
        since=ms_from_iso(since) if since else None,  # checked by _iso_time
        until=ms_from_iso(until) if until else None,
        limit=limit,
    )
    if chosen.ends_before_it_begins:  # said, rather than answered "0 deliveries replayed"
        raise click.BadParameter(
            f"{until!r} is not after --since {since!r}: no delivery died between them",
            param_hint="'--until'",
        )
    return chosen


def _iso_time(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--since or --until, checked as given (kept as written: see _move), so that the error
    names the option and the value that is wrong."""
    if value is not None:
        try:
            ms_from_iso(value)
        except ValueError as exc:
            raise click.BadParameter(f"{value!r} is not an ISO 8601 time ({exc})") from None
    return value


def _at_most_max_ids(
    _ctx: click.Context, _param: click.Parameter, ids: tuple[str, ...]
) -> tuple[str, ...]:
    if len(ids) > MAX_IDS:
        raise click.BadParameter(f"at most {MAX_IDS} ids, not {len(ids)}: select by a filter")
    return ids


def dlq_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            config_option,
            click.option("--tenant", default=None, type=NAME, help="only this tenant's deliveries"),
            click.option("--destination", default=None, type=NAME, help="only to this destination"),
            click.option("--event-type", default=None, type=NAME, help="only events of this type"),
            click.option("--since", default=None, callback=_iso_time, help="dead since (ISO 8601)"),
            click.option(
                "--until", default=None, callback=_iso_time, help="dead before (ISO 8601)"
            ),
            click.option(
                "--id",
                "ids",
                multiple=True,
                type=NAME,
                callback=_at_most_max_ids,
                help=f"a delivery id (repeatable, up to {MAX_IDS:,} times)",
            ),
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


def in_selection(
    config: Config, chosen: DeadLetterFilter, action: Callable[[SqlStore], Awaitable[T]]
) -> T:
    """`action` against the store, once the tenant and destination `chosen` names are known
    there: a typo selects nothing, and is said so rather than answered with nothing."""

    async def checked(store: SqlStore) -> T:
        unknown = await store.unknown_in(chosen)
        if unknown is not None:
            what, name = unknown
            owner = chosen.tenant_id if what == "destination" else None
            of_tenant = f" of tenant {owner!r}" if owner is not None else ""
            raise EstafetaError(f"--{what} {name!r}: no such {what}{of_tenant} in the store")
        return await action(store)

    return in_store(config, checked)


@click.group()
def dlq() -> None:
    """Operate the dead-letter queue."""


@dlq.command("list")
@dlq_options
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.option(
    "--summary",
    is_flag=True,
    help="one line per tenant, destination and last error, with the count (all selected)",
)
def dlq_list(config_path: str, as_json: bool, summary: bool, **selection: Any) -> None:
    """List dead deliveries."""
    config = load(config_path)
    chosen = _dlq_filter(**selection)
    if summary:
        _summarize(config, chosen, as_json=as_json)
        return

    shown, more = in_selection(config, chosen, lambda store: _print_pages(store, chosen, as_json))
    total = counted(shown, "dead delivery", "dead deliveries")
    if more:  # else "1000 dead deliveries" reads as the whole queue
        total += " shown: more are dead (raise --limit, or count them with --summary)"
    click.echo(total, err=True)


async def _print_pages(
    store: SqlStore, chosen: DeadLetterFilter, as_json: bool
) -> tuple[int, bool]:
    """Print the selected dead deliveries a page at a time, each page read after the last
    (as GET /api/v1/dlq's cursor does); returns how many, and whether the limit left some
    of the selection out. Read at once, `--limit 1000000` held them all in memory (~1 GB)
    and printed nothing until the last was read."""
    shown = 0
    page = chosen
    while shown < chosen.batch:
        wanted = min(chosen.batch - shown, LIST_PAGE)
        found = await store.list_dead(replace(page, limit=wanted))
        for d in found:
            if as_json:
                from estafeta.api.views import delivery_json

                out(orjson.dumps(delivery_json(d)).decode())
            else:
                # The type is the sender's, the error the destination's words: escaped.
                out(
                    f"{d.id}  {d.tenant_id}  {d.destination_id}  {printable(d.event_type)}  "
                    f"attempts={d.attempts}  dead_at={iso_from_ms(d.updated_at)}  "
                    f"{printable(d.last_error or '')}"
                )
        shown += len(found)
        if len(found) < wanted:
            return shown, False
        page = replace(page, after=(found[-1].updated_at, found[-1].id))
    return shown, bool(await store.list_dead(replace(page, limit=1)))


def _summarize(config: Config, chosen: DeadLetterFilter, *, as_json: bool) -> None:
    groups = in_selection(config, chosen, lambda store: store.dead_summary(chosen))
    for g in groups:
        if as_json:
            line = {
                "tenant": g.tenant_id,
                "destination": g.destination_id,
                "last_error": g.last_error,
                "count": g.count,
                "first_dead_at": iso_from_ms(g.first_dead_at),
                "last_dead_at": iso_from_ms(g.last_dead_at),
            }
            out(orjson.dumps(line).decode())
        else:
            out(
                f"{g.count:>8}  {g.tenant_id}  {g.destination_id}  "
                f"dead {iso_from_ms(g.first_dead_at)} … {iso_from_ms(g.last_dead_at)}  "
                f"{printable(g.last_error or '')}"
            )
    total = sum(g.count for g in groups)
    click.echo(counted(total, "dead delivery", "dead deliveries"), err=True)


def _move(config_path: str, action_name: str, everything: bool, **selection: Any) -> None:
    config = load(config_path)
    chosen = _dlq_filter(**selection)
    # Judged on the options as given: a filter's parsed value may be falsy (--since the epoch).
    named = [name for name, value in selection.items() if value and name != "limit"]
    if not (everything or named):
        raise click.UsageError("name --id, a filter, or --all")
    actor = operator()
    progress = MoveProgress()
    signals: list[int] = []

    async def action(store: SqlStore) -> list[str]:
        # The store's time, as workers go by (clock.py): by a clock ahead of it (this
        # machine's), replayed deliveries would wait that much before a worker took them.
        now_ms = await store.clock_ms()
        with _stopping_between_batches(progress, signals):
            if action_name == "discard":
                return await store.discard(chosen, actor=actor, now_ms=now_ms, progress=progress)
            # Replayed, they take this configuration's max_attempts (raised, perhaps, to
            # outlast what killed them).
            return await store.replay(
                chosen,
                actor=actor,
                now_ms=now_ms,
                limits=attempt_limits(config),
                progress=progress,
            )

    past = "replayed" if action_name == "replay" else "discarded"
    try:
        in_selection(config, chosen, action)
    except SystemExit:
        # The store failed between batches (said above): those committed stay moved.
        if progress.moved:
            _report_stopped(progress.moved, past, " before the error")
        raise
    if progress.cut:
        name = signal.Signals(signals[0]).name
        _report_stopped(
            progress.moved, past, f" before {name}: the rest are still dead (run it again for them)"
        )
        sys.exit(1)
    # Else "1000 deliveries replayed" reads as the whole selection.
    more = ": more are still dead (run it again, or raise --limit)" if progress.more else ""
    _report(progress.moved, past, more)
    _report_unmoved(chosen.delivery_ids, progress.moved)


def _report(moved: list[str], past: str, then: str = "") -> None:
    """The ids moved on stdout, then their count on stderr, even when stdout fails (a
    reader gone, a full disk, a terminal hung up): the count says what the command did,
    and the error (exit 2) that it stays done."""
    try:
        for delivery_id in moved:
            out(delivery_id)
    except OutputFailed as exc:
        exc.done = f"not every id was printed, but the deliveries counted above stay {past}"
        raise
    finally:
        with contextlib.suppress(OSError):  # stderr gone too (`2>&1 | head`)
            click.echo(f"{counted(len(moved), 'delivery', 'deliveries')} {past}{then}", err=True)


def _report_stopped(moved: list[str], past: str, then: str) -> None:
    """`_report` of a move stopped short (a signal, the store's error), whose status stays
    the one of what stopped it: a reader gone (`| head`) ends the ids quietly, and a stdout
    that fails is said after the count, but neither takes that status's place (the rest are
    still dead: a script must know to run it again)."""
    try:
        _report(moved, past, then)
    except click.exceptions.Exit:
        pass
    except OutputFailed as exc:
        with contextlib.suppress(OSError):  # stderr gone too (`2>&1 | head`)
            exc.show()


def _report_unmoved(named: tuple[str, ...], moved: list[str]) -> None:
    """The ids named with --id that were not moved (a typo, one replayed already, one
    another filter left out), on stderr: a count alone did not say which, or why."""
    done = set(moved)
    unmoved = [i for i in dict.fromkeys(named) if i not in done]
    if not unmoved:
        return
    shown = ", ".join(printable(i) for i in unmoved[:_UNMOVED_SHOWN])
    if len(unmoved) > _UNMOVED_SHOWN:
        shown += f" and {len(unmoved) - _UNMOVED_SHOWN} more"
    with contextlib.suppress(OSError):  # stderr gone (`2>&1 | head`)
        click.echo(f"not moved, not dead or not in the selection: {shown}", err=True)


_UNMOVED_SHOWN = 20  # of 10,000 ids mistyped, a line, not a screenful


@contextlib.contextmanager
def _stopping_between_batches(progress: MoveProgress, signals: list[int]) -> Iterator[None]:
    """Ctrl-C, SIGTERM or SIGHUP (an SSH session closed; not under `nohup`) stop a move once
    its batch in progress is committed, so that what it moved can be said (they used to end
    it at once, saying nothing of the batches committed, and SIGHUP rolled back the batch in
    progress); a second one ends the process at once, killed by that signal."""
    loop = asyncio.get_running_loop()

    def stop(signum: int) -> None:
        if signals:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signals.append(signum)
        progress.stop = True
        with contextlib.suppress(OSError):  # stderr a terminal that hung up: stop all the same
            click.echo(
                f"{signal.Signals(signum).name}: stopping once the batch in progress is"
                " committed (again to stop at once, leaving what was moved unsaid)",
                err=True,
            )

    if threading.current_thread() is not threading.main_thread():  # no signals there
        yield
        return
    stopping = stop_signals()
    previous = {signum: signal.getsignal(signum) for signum in stopping}
    for signum in stopping:
        loop.add_signal_handler(signum, stop, signum)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)


@dlq.command("replay")
@dlq_options
@click.option("--all", "everything", is_flag=True, help="every dead delivery, up to --limit")
def dlq_replay(config_path: str, everything: bool, **selection: Any) -> None:
    """Put dead deliveries back to pending with fresh attempts (recorded in the audit log)."""
    _move(config_path, "replay", everything, **selection)


@dlq.command("discard")
@dlq_options
@click.option("--all", "everything", is_flag=True, help="every dead delivery, up to --limit")
def dlq_discard(config_path: str, everything: bool, **selection: Any) -> None:
    """Give up on dead deliveries for good (recorded in the audit log)."""
    _move(config_path, "discard", everything, **selection)

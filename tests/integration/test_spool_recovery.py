"""The spool recovers by itself from what a crash or a bad disk leaves in its directory:
a segment file a crash left before it was named, and bytes of a segment that no longer read
back. Nothing acknowledged is dropped: what cannot be imported is kept in quarantine/."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import msgspec
import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

from estafeta.errors import HttpError, StoreUnavailable
from estafeta.ingress.journal import encode
from estafeta.ingress.spool import Spool
from estafeta.observability.metrics import REGISTRY
from estafeta.store import engine_url, open_store
from estafeta.store.postgres import PostgresStore
from estafeta.store.records import NewDelivery, NewEvent
from estafeta.store.sqlstore import SqlStore
from tests.clocks import ManualClock
from tests.events import new_event as event_named
from tests.integration.test_spool import UNREACHABLE

SEGMENT = "0000000000001-host-1-000000001.journal"
PERSONAL = "Maria da Silva, +5511999990000"  # must never reach a log line


def new_event(n: int) -> NewEvent:
    event = event_named(
        f"evt_{n:026d}",
        NewDelivery(id=f"dlv_{n:026d}", destination_id="crm", priority=1, max_attempts=3),
    )
    return msgspec.structs.replace(event, payload=f'{{"n":{n},"from":"{PERSONAL}"}}')


async def stored(store: SqlStore, *numbers: int) -> list[int]:
    return [n for n in numbers if await store.get_event(f"evt_{n:026d}", None) is not None]


def quarantined_total() -> float:
    return REGISTRY.get_sample_value("estafeta_spool_quarantined_total") or 0


def flip_bit(record: bytes, at: int) -> bytes:
    return record[:at] + bytes([record[at] ^ 0x04]) + record[at + 1 :]


# -- a record damaged on disk ---------------------------------------------------------------


def damaged(kind: str, records: list[bytes]) -> tuple[bytes, bytes]:
    """The segment with the records 1..5, damaged as `kind` says, and the bytes that no
    longer read back (what quarantine/ must then hold, exactly)."""
    two, three = records[1], records[2]
    if kind == "a bit flipped in a payload":
        bad = flip_bit(two, len(two) // 2)
        return records[0] + bad + b"".join(records[2:]), bad
    if kind == "a bit flipped in a length":  # it now claims more bytes than the file has
        bad = flip_bit(two, 0)
        return records[0] + bad + b"".join(records[2:]), bad
    # A zeroed run (a bad sector) from inside record 2 to inside record 3.
    bad = two[:20] + bytes(len(two) - 20 + 30) + three[30:]
    return records[0] + bad + b"".join(records[3:]), bad


@pytest.mark.parametrize(
    "kind", ["a bit flipped in a payload", "a bit flipped in a length", "a zeroed sector"]
)
async def test_a_corrupt_record_is_quarantined_and_every_record_after_it_drains(
    store: SqlStore, tmp_path: Path, kind: str
) -> None:
    """Bit rot in the middle of a segment used to end its read there: the drain imported the
    records before it and deleted the segment, so the acknowledged events after it were lost
    with only a `spool_torn_record` warning."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    segment = spool_dir / SEGMENT
    data, bad = damaged(kind, [encode(new_event(n)) for n in range(1, 6)])
    segment.write_bytes(data)
    before = quarantined_total()
    spool = Spool(spool_dir, max_bytes=10**6)
    with capture_logs() as logs:
        drained = await spool.drain(store)
    intact = [1, 3, 4, 5] if kind != "a zeroed sector" else [1, 4, 5]
    assert drained == len(intact)
    assert await stored(store, 1, 2, 3, 4, 5) == intact
    assert spool.stats().segments == 0
    [kept] = (spool_dir / "quarantine").iterdir()
    offset = len(encode(new_event(1)))
    assert (kept.name, kept.read_bytes()) == (f"{segment.stem}-offset{offset:010d}.unreadable", bad)
    [line] = [entry for entry in logs if entry["event"] == "spool_event_quarantined"]
    assert (line["segment"], line["offset"], line["bytes"]) == (segment.name, offset, len(bad))
    assert (line["error"], line["file"]) == ("CorruptRecord", f"quarantine/{kept.name}")
    assert PERSONAL not in str(logs)
    assert quarantined_total() == before + 1
    assert await spool.drain(store) == 0  # and nothing is left to trip over
    await spool.close()


@pytest.mark.parametrize("tail", ["a corrupt last record", "a record cut short"])
async def test_unreadable_bytes_at_the_end_of_a_segment_are_kept_not_deleted(
    store: SqlStore, tmp_path: Path, tail: str
) -> None:
    """The last record of a segment may be bit rot in an acknowledged event as well as the
    torn append of a crash, whose request was never answered: the drain cannot tell, so it
    keeps those bytes in quarantine/ rather than delete them with the segment."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    last = encode(new_event(3))
    bad = flip_bit(last, len(last) - 5) if tail == "a corrupt last record" else last[:-7]
    whole = encode(new_event(1)) + encode(new_event(2))
    (spool_dir / SEGMENT).write_bytes(whole + bad)
    before = quarantined_total()
    spool = Spool(spool_dir, max_bytes=10**6)
    with capture_logs() as logs:
        assert await spool.drain(store) == 2
    assert await stored(store, 1, 2, 3) == [1, 2]
    assert spool.stats().segments == 0
    [kept] = (spool_dir / "quarantine").iterdir()
    assert kept.read_bytes() == bad
    [line] = [entry for entry in logs if entry["event"] == "spool_event_quarantined"]
    assert (line["error"], line["offset"]) == ("TornRecord", len(whole))
    assert PERSONAL not in str(logs)
    assert quarantined_total() == before + 1
    await spool.close()


async def test_a_segment_that_cannot_be_read_is_kept_and_the_others_drain(
    store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment the drain cannot read (EIO from a bad sector, EACCES for one written by
    another user) crashed the drainer on every round, before any later segment: every
    event spooled after it waited for as long as the file could not be read."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    bad = spool_dir / SEGMENT
    bad.write_bytes(encode(new_event(1)))
    (spool_dir / "0000000000002-host-1-000000002.journal").write_bytes(encode(new_event(2)))
    read_bytes = Path.read_bytes

    def failing(path: Path) -> bytes:
        if path.name == bad.name:
            raise OSError(errno.EIO, "Input/output error")
        return read_bytes(path)

    clock = ManualClock()
    spool = Spool(spool_dir, max_bytes=10**6, clock=clock)
    with monkeypatch.context() as faults, capture_logs() as logs:
        faults.setattr(Path, "read_bytes", failing)
        assert await spool.drain(store) == 1
        drained_at = clock.now
        clock.now += 60_000
        assert await spool.drain(store) == 0
    assert await stored(store, 1, 2) == [2]
    assert [p.name for p in spool_dir.glob("*.journal")] == [bad.name]  # kept, whole
    lines = [entry for entry in logs if entry["event"] == "spool_segment_unreadable"]
    # Once, not every round: a drain runs each second while anything is spooled.
    assert [(line["segment"], line["error"]) for line in lines] == [(bad.name, "EIO")]
    assert spool.progress_at == drained_at  # not through: `spool_stalled` tells the operator
    assert await spool.drain(store) == 1  # once it reads again
    assert await stored(store, 1, 2) == [1, 2]
    await spool.close()


@pytest.mark.parametrize("fault", ["quarantine/ refused", "deletion refused"])
async def test_a_segment_the_disk_will_not_let_go_is_kept_and_the_others_drain(
    store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A full disk refusing the quarantine of a segment's torn tail (or one remounted
    read-only refusing its deletion) crashed the drainer on every round, before any later
    segment: the events spooled after it waited, and on a full disk the segments whose
    deletion would free it stayed too. Now the segment is kept, its events imported once,
    and the others drain."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    first = spool_dir / SEGMENT
    first.write_bytes(encode(new_event(1)) + encode(new_event(2))[:-7])  # a crash's torn tail
    (spool_dir / "0000000000002-host-1-000000002.journal").write_bytes(encode(new_event(3)))
    clock = ManualClock()
    spool = Spool(spool_dir, max_bytes=10**6, clock=clock)
    error = errno.ENOSPC if fault == "quarantine/ refused" else errno.EROFS
    unlink = Path.unlink

    def refused(*_: object) -> NoReturn:
        raise OSError(error, os.strerror(error))

    def refused_for_first(path: Path, missing_ok: bool = False) -> None:
        if path == first:
            refused()
        unlink(path, missing_ok)

    with monkeypatch.context() as disk, capture_logs() as logs:
        if fault == "quarantine/ refused":
            disk.setattr(Spool, "_write_quarantined", refused)
        else:
            disk.setattr(Path, "unlink", refused_for_first)
        # Both segments' events are stored, the kept one's too, and said so.
        assert await spool.drain(store) == 2
        [drained] = [entry for entry in logs if entry["event"] == "spool_drained"]
        assert drained["events"] == 2
        drained_at = clock.now
        clock.now += 60_000
        imports: list[int] = []
        insert = store.insert_events

        async def counted(events: Sequence[NewEvent], *, by_id: bool = False) -> Any:
            imports.append(len(events))
            return await insert(events, by_id=by_id)

        disk.setattr(store, "insert_events", counted)
        assert await spool.drain(store) == 0
        assert imports == []  # kept, and not imported again on every round
    assert await stored(store, 1, 2, 3) == [1, 3]
    assert [path.name for path in spool_dir.glob("*.journal")] == [first.name]
    assert spool.progress_at == drained_at  # not through: `spool_stalled` tells the operator
    lines = [entry for entry in logs if entry["event"] == "spool_segment_not_deleted"]
    # Once, not every round: a drain runs each second while anything is spooled.
    assert [(line["segment"], line["error"]) for line in lines] == [
        (first.name, errno.errorcode[error])
    ]
    with capture_logs() as logs:
        assert await spool.drain(store) == 0  # once the disk lets it go
    assert spool.stats().segments == 0
    assert len(list((spool_dir / "quarantine").iterdir())) == 1
    quarantined = [entry for entry in logs if entry["event"] == "spool_event_quarantined"]
    assert len(quarantined) == (1 if fault == "quarantine/ refused" else 0)  # not twice
    await spool.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("limit", ["statement_timeout", "lock_timeout"])
async def test_a_drain_the_database_cuts_short_keeps_its_events_for_the_next_round(
    store: SqlStore, database_url: str, tmp_path: Path, limit: str
) -> None:
    """A statement cancelled by the database's own time limit (a role's `statement_timeout`,
    as hosted PostgreSQL sets them; `lock_timeout` behind a migration's lock) failed the
    chunk and then each event: every acknowledged event went to quarantine/, delivered
    only once an operator moved it back. A deadlock or serialization failure did the same."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / SEGMENT).write_bytes(encode(new_event(1)) + encode(new_event(2)))
    limited = PostgresStore(
        create_async_engine(
            engine_url(database_url), connect_args={"server_settings": {limit: "200"}}
        )
    )
    blocker = await asyncpg.connect(database_url)
    spool = Spool(spool_dir, max_bytes=10**6)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(StoreUnavailable):
                await spool.drain(limited)
        assert not (spool_dir / "quarantine").exists()
        assert [p.name for p in spool_dir.glob("*.journal")] == [SEGMENT]  # kept, whole
        assert await spool.drain(limited) == 2  # once the lock is gone
        assert await stored(store, 1, 2) == [1, 2]
    finally:
        await blocker.close()
        await limited.close()
        await spool.close()


# -- a segment a crash left before it was named ---------------------------------------------


def leftover(spool_dir: Path, data: bytes = b"") -> Path:
    """A `.journal.creating` file as a process that died while creating a segment leaves it."""
    spool_dir.mkdir(exist_ok=True)
    path = spool_dir / f"{SEGMENT}.creating"
    path.write_bytes(data)
    return path


async def test_an_empty_segment_left_by_a_crash_is_removed_at_start_and_at_drain(
    store: SqlStore, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    at_start = leftover(spool_dir)
    spool = Spool(spool_dir, max_bytes=10**6)
    assert not at_start.exists()
    later = leftover(spool_dir)  # e.g. a rename that failed (EIO) while this one runs
    assert await spool.drain(store) == 0
    assert not later.exists()
    assert list(spool_dir.iterdir()) == []
    await spool.close()


async def test_a_segment_whose_first_write_failed_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk full, the first write to a new segment fails and is cut back: the segment
    holds nothing. Before: closed (or its process stopped), it stayed in the directory for
    good, one more at every such outage, as the drainer comes only for segments that hold
    something."""
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, max_bytes=10**6)

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as faults:
        faults.setattr(os, "write", disk_full)
        with pytest.raises(HttpError):
            await spool.append(new_event(1))
    assert [p.stat().st_size for p in spool_dir.glob("*.journal")] == [0]  # open, held
    await spool.close()
    assert list(spool_dir.iterdir()) == []


async def test_an_empty_segment_of_a_dead_process_is_removed_at_start(tmp_path: Path) -> None:
    """As the one above leaves it when its process is killed; one a live writer holds (its
    open segment, which it may write to yet) stays."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    dead = spool_dir / SEGMENT
    dead.touch()
    live = spool_dir / "0000000000002-host-2-000000001.journal"
    live.touch()
    with open(live, "ab") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)  # another open file: as another process
        spool = Spool(spool_dir, max_bytes=10**6)
        assert sorted(p.name for p in spool_dir.iterdir()) == [live.name]
    await spool.close()


async def test_a_left_segment_that_holds_records_is_drained_not_deleted(
    store: SqlStore, tmp_path: Path
) -> None:
    """No estafeta writes into a segment before naming it, but if such a file held records
    they could be acknowledged events: they are imported like any segment's."""
    spool_dir = tmp_path / "spool"
    leftover(spool_dir, encode(new_event(1)) + encode(new_event(2)))
    spool = Spool(spool_dir, max_bytes=10**6)
    assert await spool.drain(store) == 2
    assert await stored(store, 1, 2) == [1, 2]
    assert list(spool_dir.iterdir()) == []
    await spool.close()


@pytest.fixture
def held_by_another_process(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """An empty `.journal.creating` file that another live process holds locked, as its
    creator does; the process lets go when its stdin closes."""
    path = leftover(tmp_path / "spool")
    script = (
        "import fcntl, sys\n"
        "f = open(sys.argv[1], 'ab')\n"
        "fcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        try:
            yield path, holder
        finally:
            holder.kill()  # if the test did not end it


async def test_a_segment_another_live_process_is_creating_is_left_alone(
    store: SqlStore, held_by_another_process: tuple[Path, subprocess.Popen[str]]
) -> None:
    path, holder = held_by_another_process
    spool = Spool(path.parent, max_bytes=10**6)
    assert await spool.drain(store) == 0
    assert path.exists()
    assert holder.stdin is not None
    holder.stdin.close()  # the creator dies without naming it
    assert holder.wait() == 0
    assert await spool.drain(store) == 0
    assert not path.exists()
    await spool.close()


async def test_a_segment_being_created_is_not_removed_before_its_writer_locks_it(
    store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another `serve` process's drainer that runs between the writer's creating a segment
    and locking it finds it unlocked and empty, as a crash would leave it: removed then,
    the writer's append failed with a 503."""
    spool_dir = tmp_path / "spool"
    writer = Spool(spool_dir, max_bytes=10**9)
    other = Spool(spool_dir, max_bytes=10**9)
    real_flock = fcntl.flock

    def drain_first(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX:  # the writer's lock on its new segment
            assert list(spool_dir.glob("*.journal.creating"))  # it exists, unlocked
            asyncio.run(other.drain(store))  # from the writer's thread: no event loop here
        real_flock(fd, operation)

    with monkeypatch.context() as race:
        race.setattr(fcntl, "flock", drain_first)
        await writer.append(new_event(1))
    assert await writer.drain(store) == 1
    assert await stored(store, 1) == [1]
    await writer.close()


async def test_while_the_store_is_down_damaged_bytes_are_quarantined_once_not_every_round(
    store: SqlStore, tmp_path: Path
) -> None:
    """The drainer tries every second during an outage; quarantining before the import
    logged and counted the same damaged bytes again on every try, firing the alert on
    `estafeta_spool_quarantined_total` while nothing new had happened."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    data, bad = damaged("a bit flipped in a payload", [encode(new_event(n)) for n in (1, 2, 3)])
    (spool_dir / SEGMENT).write_bytes(data)
    spool = Spool(spool_dir, max_bytes=10**6)
    unreachable = open_store(UNREACHABLE)
    before = quarantined_total()
    try:
        with capture_logs() as logs:
            for _ in range(3):
                with pytest.raises(StoreUnavailable):
                    await spool.drain(unreachable)
        assert [e for e in logs if e["event"] == "spool_event_quarantined"] == []
        assert quarantined_total() == before
        assert spool.stats().segments == 1  # kept, whole, for when the store is back
        assert await spool.drain(store) == 2
    finally:
        await unreachable.close()
    assert await stored(store, 1, 2, 3) == [1, 3]
    [kept] = (spool_dir / "quarantine").iterdir()
    assert kept.read_bytes() == bad
    assert quarantined_total() == before + 1
    await spool.close()


async def test_a_write_check_file_left_by_a_crash_is_removed_at_start(tmp_path: Path) -> None:
    """The health check makes and removes a `.write-check-*` file; a process killed in
    between (typically on a hung disk, the case the check is for) leaves it behind. A check
    that another process sharing the directory may be making now is left alone."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    crashed = spool_dir / ".write-check-k2j4h1ab"
    crashed.write_bytes(b"\0")
    an_hour_ago = time.time() - 3600
    os.utime(crashed, (an_hour_ago, an_hour_ago))
    in_progress = spool_dir / ".write-check-q9x8w7vu"
    in_progress.write_bytes(b"")
    spool = Spool(spool_dir, max_bytes=10**6)
    try:
        # Before: every crash in a check left one more such file, for ever.
        assert sorted(p.name for p in spool_dir.iterdir()) == [in_progress.name]
    finally:
        await spool.close()

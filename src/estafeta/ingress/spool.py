"""The spool: where accepted events wait, durably, while the store cannot be reached.

Ingress appends each event to a local journal and fsyncs before it answers 2xx; a drainer
imports the journal into the store once the store is back. No acknowledged event is lost,
and a crash at any point loses nothing either:

* A journal is a sequence of segments `<writer>-<seq>.journal` of records framed as
  `journal.py` says. A torn tail (a crash mid-append) fails its CRC: that request was never
  answered, because the answer waits for the fsync.
* A failed write or fsync (disk full, EIO) is cut off the segment before anything else is
  appended, so nothing acknowledged lands after a torn record and the refused events are not
  imported; if even the cut fails, the writer leaves that segment for a new one.
* The writer holds an exclusive `flock` on its open segment, taken before the segment gets
  its `.journal` name (`segments.py`); a drainer imports only the segments it can lock, in
  order, then deletes each. A crash mid-drain leaves the segment to be imported again: the
  store treats an event id it already has as a duplicate. One it cannot read (EACCES, EIO)
  is kept and logged, and the others drain; so is one it cannot finish (quarantine/ or the
  directory cannot be written: ENOSPC, EROFS), its events not imported again meanwhile.
* A request's events are one write: a failed one refuses them all, so no event of a request
  answered 503 is imported (its sender sends it again).
* Concurrent requests share one write and one fsync (group commit), as the store does.
* A segment is deleted only once every byte of it is in the store or in `quarantine/`: an
  event the store refuses for its data (not its own state: unreachable, or refusing the
  role's writes, when every event waits in the spool), a record that no longer
  decodes, and bytes that are no whole record (damaged on disk, or a torn tail: the drain
  cannot tell which) are moved there and logged, and the records after them drain.
* A crash between creating a segment and naming it leaves a `.journal.creating` file;
  `segments.py` clears it at start and before each drain, once no live process holds it.
  A segment that holds nothing (its first write failed) is removed as it is closed, or at
  start when its process died first: no drain comes for an empty one.
  A crash during the write check leaves a `.write-check-*` file: cleared at start, once old.
* `unwritable()` tells whether a segment could be made now, `listed()` what the directory
  holds (both in a thread, within the read bound: a hung disk must not hold the event loop),
  `progress_at` when the drain last got through, and `outage_seen_at` when this process
  last found the store unreachable: what `/health/detailed` and the alerts judge the spool
  by (observability/spool_watch.py).
* The open segment is written to only while it is still the file at its name: one removed
  with its directory would take acknowledged events that no drain can find.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import msgspec
import structlog

from estafeta.clock import Clock, SystemClock
from estafeta.errors import HttpError, StoreError, StoreRejected, StoreUnavailable
from estafeta.ingress import segments
from estafeta.ingress.journal import Unreadable, decode, encode, framed, records
from estafeta.observability.log_throttle import LogThrottle
from estafeta.observability.metrics import SPOOL_QUARANTINED
from estafeta.observability.reads import within
from estafeta.store.base import in_chunks
from estafeta.store.group_commit import GroupCommitter
from estafeta.store.records import NewEvent
from estafeta.store.sqlstore import SqlStore

log = structlog.get_logger("estafeta.spool")

SEGMENT_BYTES = 16 * 1024 * 1024
DRAIN_CHUNK = 500
REMEMBERED_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class SpoolStats:
    bytes: int
    segments: int
    oldest_at: int | None  # Unix ms of the oldest segment's creation, None when empty


@dataclass(frozen=True, slots=True)
class _Kept:
    """What the drain moves to quarantine/ instead of importing, and how it says so."""

    data: bytes
    name: str  # its file's
    error: str  # the error class, or what is wrong with the bytes
    identity: Mapping[str, str | int]  # the ids or the place, for the log line


class Spool:
    def __init__(
        self, directory: str | Path, *, max_bytes: int, clock: Clock | None = None
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.clock: Clock = clock or SystemClock()  # names segments by their creation time
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # its owner's only
        # A name no other process shares.
        self._writer = f"{socket.gethostname()}-{os.getpid()}"
        self._seq = 0
        self._file: IO[bytes] | None = None  # unbuffered: no failed write waits in a buffer
        self._size = 0  # bytes of the open segment written and fsync'ed
        self._segment = ""  # the open segment's name
        self._gone: list[str] = []  # segments found gone by a write (its thread), to forget
        self._lock = asyncio.Lock()  # one writer or rotator at a time in this process
        self._unreadable_segments: dict[str, str] = {}  # name → the error last logged
        self._not_deleted_segments: dict[str, str] = {}  # name → the error last logged
        # Segments kept after every event of them was imported (`_not_deleted`): name → the
        # bytes imported; and the quarantine/ files written for segments not yet deleted
        # (kept, or cut short by a stop: not written again when the segment is read again).
        self._imported: dict[str, int] = {}
        self._kept_files: set[tuple[str, str]] = set()  # (segment, file)
        # `events_spooled` and `spool_write_failed` lines: an outage spools every request,
        # and a failing disk refuses every one (observability/log_throttle.py).
        self._logged = LogThrottle()
        # Why the latest events were spooled (`append_all`): their `events_spooled` line
        # says it, or nothing in the log would until `store_down` fires.
        self._reason: str | None = None
        # One item per request: a failed write refuses whole requests (the committer retries
        # a failed batch item by item), so no request is both answered 503 and spooled.
        self._appends: GroupCommitter[Sequence[NewEvent], None] = GroupCommitter(
            self._append_batch, max_batch=1000
        )
        # Idempotency keys journaled by this process, so that a provider's redelivery during
        # the outage gets the original id back instead of a new one that the drain would
        # drop as a duplicate. Bounded: the oldest are forgotten first, which only matters
        # once drained (`_undrained` answers for the others, however many), as when a later
        # outage repeats a key of an earlier one.
        self._keys: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        # The message id of each keyed message send journaled (event id → message id), so
        # that a repeated POST /api/v1/messages during the outage gets the original message
        # without asking the unreachable store. Bounded with `_keys`.
        self._messages: dict[str, str] = {}
        # The ordering keys (tenant, key) of deliveries journaled by this process and not yet
        # imported, each with the segment holding its latest: the key's next events are
        # spooled behind them (Hub.accept_all), or they would be sent before them.
        self._ordered: dict[tuple[str, str], str] = {}
        # The idempotency keys of events journaled by this process and not yet imported:
        # key → (event id, segment, message id of a message send). Stored or spooled anew
        # before the drain imports its original, a repeat would get an id of its own, and
        # the drain would drop it, so the id answered would never exist (Hub.accept_all and
        # `spooled_id` answer the repeat as the original). Not bounded: the drain empties it.
        self._undrained: dict[tuple[str, str, str], tuple[str, str, str | None]] = {}
        # When the drain last got through: a round that ended, or a segment imported. From
        # start-up until the first round, events left by an earlier process are not late.
        self.progress_at = self.clock.now_ms()
        # When the health check or the alerts (every 5 s) last found the store unreachable:
        # until then, events waited for the store, not for the drain.
        self.outage_seen_at = 0
        self._write_check: asyncio.Future[str | None] | None = None
        self._listing: asyncio.Future[SpoolStats] | None = None  # see `listed()`
        self._listed = SpoolStats(bytes=0, segments=0, oldest_at=None)  # the last `stats()`
        segments.clear_leftovers(self.directory)
        segments.clear_empty(self.directory)
        _clear_write_checks(self.directory)

    # -- writing ----------------------------------------------------------------------------

    def spooled_id(self, tenant_id: str, source_id: str, key: str | None) -> str | None:
        """The id of an event this process spooled with the same idempotency key, if any:
        always while the drain has not imported it, and among those it has, recent ones."""
        if key is None:
            return None
        idem = (tenant_id, source_id, key)
        waiting = self._undrained.get(idem)
        return waiting[0] if waiting is not None else self._keys.get(idem)

    def spooled_message_id(self, tenant_id: str, source_id: str, key: str | None) -> str | None:
        """The message id of the message send this process spooled with this key, if any
        (as `spooled_id`)."""
        if key is None:
            return None
        idem = (tenant_id, source_id, key)
        waiting = self._undrained.get(idem)
        if waiting is not None:
            return waiting[2]
        event_id = self._keys.get(idem)
        return None if event_id is None else self._messages.get(event_id)

    def undrained_id(self, tenant_id: str, source_id: str, key: str | None) -> str | None:
        """The id of an event this process spooled with this idempotency key and the drain
        has not imported yet, if any."""
        if key is None or not self._undrained:
            return None
        found = self._undrained.get((tenant_id, source_id, key))
        return None if found is None else found[0]

    @property
    def holds_keys(self) -> bool:
        """Whether events this process spooled with idempotency keys wait for the drain."""
        return bool(self._undrained)

    def holds_order_of(self, events: Sequence[NewEvent]) -> bool:
        """Whether a delivery of `events` has an ordering key of which this process spooled
        deliveries the drain has not imported yet: they must go after those."""
        if not self._ordered:  # the store answers and the spool is drained: at once
            return False
        return any(
            (e.tenant_id, d.ordering_key) in self._ordered
            for e in events
            for d in e.deliveries
            if d.ordering_key is not None
        )

    async def append(self, event: NewEvent, *, reason: str | None = None) -> None:
        """Journal one event durably (fsync'ed) before returning; 503 when the spool is full."""
        await self.append_all((event,), reason=reason)

    async def append_all(self, events: Sequence[NewEvent], *, reason: str | None = None) -> None:
        """Journal the events of one request durably, all of them or, with a 503, none.
        `reason`: why they are not stored (the store's error), for `events_spooled`."""
        if self.stats().bytes >= self.max_bytes:
            raise HttpError(
                503,
                "spool_full",
                "the store is unreachable and the local spool is full; retry later",
                {"Retry-After": "30"},
            )
        self._reason = reason
        await self._appends.submit(events)
        for event in events:
            if event.idempotency_key is None:
                continue
            self._keys[(event.tenant_id, event.source_id, event.idempotency_key)] = event.id
            if event.message is not None:
                self._messages[event.id] = event.message.id
            if len(self._keys) > REMEMBERED_KEYS:
                _, forgotten = self._keys.popitem(last=False)
                self._messages.pop(forgotten, None)

    async def _append_batch(self, requests: Sequence[Sequence[NewEvent]]) -> list[None]:
        data = b"".join(encode(e) for events in requests for e in events)
        count = sum(len(events) for events in requests)
        async with self._lock:
            try:
                await asyncio.to_thread(self._write, data)
            except OSError as exc:
                self._forget_gone()
                error = _error_name(exc)
                unlogged = self._logged.due(("spool_write_failed", error), count)
                if unlogged is not None:
                    log.error("spool_write_failed", count=unlogged, error=error)
                raise HttpError(
                    503,
                    "spool_unavailable",
                    "the store is unreachable and the local spool cannot be written; retry later",
                    {"Retry-After": "30"},
                ) from exc
            self._forget_gone()
            # Under the lock: the drain closes this segment only after it takes the lock.
            for events in requests:
                for event in events:
                    if event.idempotency_key is not None:
                        idem = (event.tenant_id, event.source_id, event.idempotency_key)
                        message_id = None if event.message is None else event.message.id
                        self._undrained[idem] = (event.id, self._segment, message_id)
                    for delivery in event.deliveries:
                        if delivery.ordering_key is not None:
                            key = (event.tenant_id, delivery.ordering_key)
                            self._ordered[key] = self._segment
        unlogged = self._logged.due("events_spooled", count)
        if unlogged is not None:
            log.warning("events_spooled", count=unlogged, error=self._reason)
        return [None] * len(requests)

    def _write(self, data: bytes) -> None:
        if self._file is not None and not self._still_named():
            # Removed (or moved) out of the directory: written there, events would be
            # answered 2xx from a file no drain can ever find (a directory removed and made
            # again, as the `spool_unwritable` alert says to, kept taking them for good).
            log.error("spool_segment_gone", segment=self._segment)
            self._gone.append(self._segment)  # forgotten by the event loop, which reads them
            self._close_segment()
        if self._file is None or self._size >= SEGMENT_BYTES:
            self._close_segment()
            self._open_segment()
        assert self._file is not None  # noqa: S101 - just opened
        fd = self._file.fileno()
        try:
            written = 0
            while written < len(data):  # a write may be partial (disk full)
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError:
            self._cut_back()
            raise
        self._size += len(data)

    def _still_named(self) -> bool:
        """Whether the open segment is still the file at its name in the directory: one
        `stat`, no descriptor (none may be free). Another error than its absence (EACCES,
        EIO) says nothing of that: written, it stays the drain's to find, as before."""
        assert self._file is not None  # noqa: S101 - callers check
        try:
            named = os.stat(self.directory / self._segment)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError:
            return True
        held = os.fstat(self._file.fileno())
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def _forget_gone(self) -> None:
        """Forget the keys of the events of segments gone without being drained: their
        repeats are new events again (answered as a lost original, a redelivery would be
        lost too), and their ordering keys wait behind nothing."""
        while self._gone:
            segment = self._gone.pop()
            for idem, (event_id, name, _) in list(self._undrained.items()):
                if name != segment:
                    continue
                del self._undrained[idem]
                if self._keys.get(idem) == event_id:
                    del self._keys[idem]
                    self._messages.pop(event_id, None)
            self._ordered = {k: name for k, name in self._ordered.items() if name != segment}

    def _cut_back(self) -> None:
        """Truncate the open segment to its last acknowledged record: a torn record would
        hide every later one from the drain, and records whose fsync failed were refused."""
        assert self._file is not None  # noqa: S101 - only after a write to it
        try:
            os.ftruncate(self._file.fileno(), self._size)
            os.fsync(self._file.fileno())
        except OSError as exc:
            # The tail stays; appending after it would hide what follows, so write no more here.
            log.error(
                "spool_segment_abandoned",
                segment=self._segment,
                error=_error_name(exc),
            )
            self._close_segment()

    def _open_segment(self) -> None:
        self._seq += 1
        # Named by creation time first: sorted names are the order to drain in.
        created = self.clock.now_ms()
        name = f"{created:013d}-{self._writer}-{self._seq:09d}.journal"
        self._file = segments.create(self.directory, name)  # locked, lives until rotated
        self._size = 0
        self._segment = name

    def _close_segment(self) -> None:
        if self._file is not None:
            # One that holds nothing (its first write failed and was cut back) is removed
            # while still locked: no drain comes for an empty segment, so it stayed for good.
            with contextlib.suppress(OSError):
                if os.fstat(self._file.fileno()).st_size == 0:
                    (self.directory / self._segment).unlink()
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    async def unwritable(self) -> str | None:
        """Why no segment could be made in the directory now (`ENOENT`, `EACCES`, `ENOSPC`
        …), or None when one could. Checked in a thread, within the read bound: a hung disk
        must not hold the event loop or the caller. Concurrent callers share one check, so a
        hung disk holds one thread, not one per health probe."""
        if self._write_check is None or self._write_check.done():
            self._write_check = asyncio.ensure_future(asyncio.to_thread(self._probe_write))
        try:
            return await within(asyncio.shield(self._write_check))
        except TimeoutError as exc:
            return f"the disk gave {exc}"

    def _probe_write(self) -> str | None:
        """Make, write one byte to and remove a file no drain globs (`.write-check-*`)."""
        try:
            if not os.access(self.directory, os.W_OK | os.X_OK):
                os.stat(self.directory)  # ENOENT when it is gone
                return "EACCES" if self.directory.is_dir() else "ENOTDIR"
            fd, name = tempfile.mkstemp(prefix=".write-check-", dir=self.directory)
            try:
                os.write(fd, b"\0")  # a full disk may still make an empty file
            finally:
                os.close(fd)
                os.unlink(name)
        except OSError as exc:
            return _error_name(exc)
        return None

    # -- reading ----------------------------------------------------------------------------

    def stats(self) -> SpoolStats:
        """What the directory holds; as last listed when it cannot be listed now (EMFILE:
        client connections took every descriptor; EIO). Raised, that failed the webhook
        with a 500, though the open segment would take it, /health/detailed and /metrics
        with a 500, and crashed the drainer; `unwritable()` reports the condition."""
        sizes: list[tuple[int, int]] = []  # (created ms, size) of each
        try:
            for path in self.directory.glob("*.journal"):
                try:
                    found = path.stat()
                except FileNotFoundError:  # drained meanwhile
                    continue
                sizes.append((_created_ms(path.name, found), found.st_size))
        except OSError:
            return self._listed
        self._listed = SpoolStats(
            bytes=sum(size for _, size in sizes),
            segments=sum(1 for _, size in sizes if size),
            oldest_at=min((created for created, size in sizes if size), default=None),
        )
        return self._listed

    async def listed(self) -> SpoolStats:
        """`stats()` listed in a thread, within the read bound, or as last listed past it.
        A hung disk (an NFS server gone) holds a listing as it holds the write check: on the
        event loop, the drainer's (each second) stopped every request of the process, the
        webhooks the store takes too, and /health/detailed with them. Concurrent callers
        share one listing, so a hung disk holds one thread."""
        if self._listing is None or self._listing.done():
            self._listing = asyncio.ensure_future(asyncio.to_thread(self.stats))
        try:
            return await within(asyncio.shield(self._listing))
        except TimeoutError:
            return self._listed

    async def drain(self, store: SqlStore, stop: asyncio.Event | None = None) -> int:
        """Import every segment this process can lock into the store, oldest first, and
        delete each once imported; returns how many events were imported (duplicates of
        what the store already has included, quarantined ones not). Stops, keeping the rest,
        when the store is unreachable, or between two chunks once `stop` is set (the process
        is stopping: a large spool must not hold its shutdown for minutes; the segment cut
        short stays, and what of it was imported is a duplicate at the next drain)."""
        if self._file is not None:  # our own open segment drains too, closed first
            # Only once the store answers: closed for a drain that fails, it makes the next
            # write open another, a file more every round (each second) of an outage, which
            # `stats()` (on every spooled webhook) then stats one by one.
            await store.ping()
            # Out of descriptors, the directory cannot be listed and the round fails: it
            # fails before closing the segment, which takes webhooks without a new one.
            await asyncio.to_thread(_listable, self.directory)
            async with self._lock:
                await asyncio.to_thread(self._close_segment)
        await asyncio.to_thread(segments.clear_leftovers, self.directory)
        imported = 0
        held = False  # a segment was left in place (locked, unreadable, kept)
        try:
            for path in sorted(self.directory.glob("*.journal")):
                if stop is not None and stop.is_set():
                    return imported
                # A segment kept after its import still counts what it imported.
                drained, went = await self._drain_segment(store, path, stop)
                imported += drained
                held = held or not went
        finally:
            if imported:  # a round cut short too, by a stop or an outage: they are stored
                log.info("spool_drained", events=imported)
        if stop is not None and stop.is_set():
            return imported
        if self._ordered:  # a segment another process drained (one sharing the directory)
            left = {path.name for path in self.directory.glob("*.journal")}
            self._ordered = {k: name for k, name in self._ordered.items() if name in left}
        if self._undrained:
            left = {path.name for path in self.directory.glob("*.journal")}
            self._undrained = {k: v for k, v in self._undrained.items() if v[1] in left}
        if self._imported or self._not_deleted_segments:  # one deleted by someone else
            left = {path.name for path in self.directory.glob("*.journal")}
            self._forget_kept((set(self._imported) | set(self._not_deleted_segments)) - left)
        if not held:  # a round that left a segment behind did not get through
            self.progress_at = self.clock.now_ms()  # StoreUnavailable skips this too
        return imported

    async def _drain_segment(
        self, store: SqlStore, path: Path, stop: asyncio.Event | None = None
    ) -> tuple[int, bool]:
        """How many of its events were imported, and whether it is gone from the spool (a
        segment locked by another process, unreadable, or kept, is not)."""
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed in finally
        except FileNotFoundError:
            return 0, True
        except OSError as exc:
            self._unreadable(path, exc)
            return 0, False
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0, False  # another process writes or drains it: not drained here
            if not path.exists():
                return 0, True  # drained by another process between glob and lock
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except OSError as exc:
                self._unreadable(path, exc)
                return 0, False
            self._unreadable_segments.pop(path.name, None)
            events, unimportable = _decoded(path.name, data)
            imported = 0
            try:
                # Once: a segment kept after its import (below) is not imported every round.
                if self._imported.get(path.name) != len(data):
                    for chunk in in_chunks(events, DRAIN_CHUNK):
                        if stop is not None and stop.is_set():
                            # The segment stays, whole, for the next drain.
                            return imported, False
                        imported += await self._import(store, chunk, path)
                    self._imported[path.name] = len(data)
                # Only now: while the store is down, every round would quarantine them again.
                for kept in unimportable:
                    if (path.name, kept.name) not in self._kept_files:  # by an earlier round
                        await self._quarantine(kept)
                        self._kept_files.add((path.name, kept.name))
                path.unlink()
                segments.fsync_directory(self.directory)
            except OSError as exc:
                # quarantine/ or the directory cannot be written (ENOSPC, EROFS): raised, it
                # crashed the drainer on every round, and the segments after this one never
                # drained, though deleting them is what frees a full disk.
                self._not_deleted(path, exc)
                return imported, False
            self._forget_kept({path.name})
            self._ordered = {k: name for k, name in self._ordered.items() if name != path.name}
            self._undrained = {k: v for k, v in self._undrained.items() if v[1] != path.name}
            self.progress_at = self.clock.now_ms()  # a long drain is progress, not a stall
            return imported, True
        finally:
            handle.close()

    def _forget_kept(self, names: set[str]) -> None:
        """Forget what `_not_deleted` kept of these segments, deleted now."""
        for name in names:
            self._imported.pop(name, None)
            self._not_deleted_segments.pop(name, None)
        self._kept_files = {kept for kept in self._kept_files if kept[0] not in names}

    def _not_deleted(self, segment: Path, exc: OSError) -> None:
        """A segment whose unreadable bytes or refused events cannot be moved to quarantine/,
        or that cannot be deleted, is kept and tried again every round, its imported events
        not imported again; not drained, so `spool_stalled` fires while it lasts. Logged once
        for each error."""
        error = _error_name(exc)
        if self._not_deleted_segments.get(segment.name) != error:
            self._not_deleted_segments[segment.name] = error
            log.error("spool_segment_not_deleted", segment=segment.name, error=error)

    def _unreadable(self, segment: Path, exc: OSError) -> None:
        """A segment that cannot be read now (EACCES, EIO) is kept, whole, and the drain goes
        on with the others: raising stopped every later segment behind it. Not drained, so
        the round does not get through and `spool_stalled` fires while it lasts. Logged once
        for each error, not every round (each second)."""
        error = _error_name(exc)
        if self._unreadable_segments.get(segment.name) != error:
            self._unreadable_segments[segment.name] = error
            log.error("spool_segment_unreadable", segment=segment.name, error=error)

    async def _import(self, store: SqlStore, events: Sequence[NewEvent], segment: Path) -> int:
        """Import a chunk; if the store refuses it, import its events one by one and
        quarantine those it still refuses. Returns how many were imported."""
        try:
            await store.insert_events(events, by_id=True)
        except Exception as exc:
            if not _the_events_fault(exc):
                raise  # keep everything for the next round
            return await self._import_each(store, events, segment)  # find out which
        return len(events)

    async def _import_each(self, store: SqlStore, events: Sequence[NewEvent], segment: Path) -> int:
        imported = 0
        for event in events:
            try:
                await store.insert_events([event], by_id=True)
                imported += 1
            except Exception as exc:  # refused: it would block the spool on every round
                if not _the_events_fault(exc):
                    raise
                identity = {
                    "event_id": event.id,
                    "tenant_id": event.tenant_id,
                    "source_id": event.source_id,
                }
                name = f"{segment.stem}-{event.id}.journal"
                if (segment.name, name) in self._kept_files:
                    continue  # by an earlier round cut short: its segment was kept whole
                await self._quarantine(_Kept(encode(event), name, type(exc).__name__, identity))
                self._kept_files.add((segment.name, name))
        return imported

    async def _quarantine(self, kept: _Kept) -> None:
        """Keep what the drain cannot import, durably, where an operator can inspect and
        re-import it: named after its segment first, a `.journal` drains again once moved
        back into the spool. Logged with ids, offsets and the error class only: the payload
        is personal data."""
        target = await asyncio.to_thread(self._write_quarantined, kept.data, kept.name)
        log.error(
            "spool_event_quarantined",
            **kept.identity,
            error=kept.error,
            file=f"quarantine/{target.name}",
        )
        SPOOL_QUARANTINED.inc()

    def _write_quarantined(self, record: bytes, name: str) -> Path:
        directory = self.directory / "quarantine"
        directory.mkdir(mode=0o700, exist_ok=True)
        target = directory / name
        creating = target.with_name(target.name + ".creating")
        with open(creating, "wb", opener=segments.private) as file:
            file.write(record)
            file.flush()
            os.fsync(file.fileno())
        creating.rename(target)
        segments.fsync_directory(directory)
        segments.fsync_directory(self.directory)  # quarantine/ itself, when just made
        return target

    async def close(self) -> None:
        await self._appends.close()
        async with self._lock:
            self._close_segment()


# A write check takes microseconds, or at most as long as a hung disk holds it: one this old
# is a dead process's, not one another process sharing the directory is making now.
WRITE_CHECK_LEFTOVER_S = 600


def _listable(directory: Path) -> None:
    """Raises what listing `directory` would (EMFILE: no descriptor is free)."""
    with os.scandir(directory):
        pass


def _clear_write_checks(directory: Path) -> None:
    """Remove the `.write-check-*` files of processes killed during the check (on a hung
    disk, the check's own case): nothing else would, one more at every such crash."""
    old = time.time() - WRITE_CHECK_LEFTOVER_S
    for path in directory.glob(".write-check-*"):
        with contextlib.suppress(OSError):  # gone meanwhile, or the disk refuses: next start
            if path.stat().st_mtime < old:
                path.unlink()


def _the_events_fault(exc: Exception) -> bool:
    """Whether the store refused an import for what it carried (quarantined, or it would
    block the spool every round), not for its own state: unreachable, or refusing whatever
    it is sent (a role without INSERT, 42501: every event was quarantined, a file and an
    error line each, for an operator to move back by hand)."""
    return isinstance(exc, StoreRejected) or not isinstance(exc, StoreError)


def _created_ms(name: str, found: os.stat_result) -> int:
    """When a segment was created: its name's first 13 digits, or for a `.journal` not named
    so (one an operator saved, as a repaired record), when it was last written. Read from
    any name, such a file failed every spooled webhook with a 500, /health/detailed and
    /metrics too, and crashed the drainer on every round."""
    prefix = name[:13]
    if len(prefix) == 13 and prefix.isdigit() and prefix.isascii():
        return int(prefix)
    return found.st_mtime_ns // 1_000_000


def _error_name(exc: OSError) -> str:
    """`ENOSPC`, `EIO` …: what went wrong, without the path."""
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _decoded(segment: str, data: bytes) -> tuple[list[NewEvent], list[_Kept]]:
    """The segment's events, and what to quarantine of it, or it would stop the drain on
    every round, or go with the segment: a whole record that no longer decodes (written
    by another version) as it was written, bytes that are no whole record as they are
    on disk."""
    stem = segment.removesuffix(".journal")
    events: list[NewEvent] = []
    unimportable: list[_Kept] = []
    index = 0  # of the whole records
    for item in records(data):
        if isinstance(item, Unreadable):
            unimportable.append(
                _Kept(
                    item.data,
                    f"{stem}-offset{item.offset:010d}.unreadable",
                    "TornRecord" if item.at_end else "CorruptRecord",
                    {"segment": segment, "offset": item.offset, "bytes": len(item.data)},
                )
            )
            continue
        try:
            events.append(decode(item))
        except msgspec.MsgspecError as exc:
            name = f"{stem}-record{index:06d}.journal"
            unimportable.append(_Kept(framed(item), name, type(exc).__name__, {"segment": segment}))
        index += 1
    return events, unimportable


class SpoolDrainer:
    """Drains the spool whenever it holds anything and the store answers."""

    def __init__(self, spool: Spool, store: SqlStore, *, interval_s: float = 1.0) -> None:
        self.spool = spool
        self.store = store
        self.interval_s = interval_s
        self._failures = LogThrottle()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if (await self.spool.listed()).segments:
                try:
                    await self.spool.drain(self.store, stop)
                except StoreUnavailable:  # still down: next round
                    pass
                except StoreError as exc:  # it answers but refuses (a role without INSERT)
                    # Kept for the next round, as in an outage; said once a minute (the
                    # drain is stuck: `spool_stalled` fires), not a crashed task each round.
                    unlogged = self._failures.due(str(exc))
                    if unlogged is not None:
                        log.error("spool_drain_failed", error=str(exc), count=unlogged)
                except OSError as exc:
                    # Out of descriptors (stats() reports the spool as last listed, and
                    # listing it here failed): next round too, not a crashed task.
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                continue

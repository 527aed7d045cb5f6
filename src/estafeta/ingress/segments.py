"""Segment files in the spool directory: how one comes to exist, and what a crash leaves.

Locks are `flock`s, which the kernel drops when their process dies, so a lock held means a
live process:

* A writer holds an exclusive lock on its open segment; a drainer imports only the segments
  it can lock.
* A segment is made as `<name>.creating`, a name no drainer globs, locked, and only then
  renamed to `<name>`: a drainer that found it unlocked and empty would delete it under the
  writer. A crash (or a failed rename) in between leaves the `.creating` file behind.
* Creators hold the directory's own lock, shared, from making the file to naming it; the
  leftovers are cleared under that lock taken exclusively. So a `.creating` file found then,
  and not locked either (a creator that takes no directory lock: an older estafeta), is a
  dead process's: removed when empty, named and so drained when it holds anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger("estafeta.spool")

_CREATING = ".creating"


def create(directory: Path, name: str) -> IO[bytes]:
    """The new segment `directory/name`, locked by this process before it has its name, open
    for appending and unbuffered: a write that failed must not be retried from a buffer by
    a later one."""
    path = directory / name
    creating = path.with_name(name + _CREATING)
    with _directory_locked(directory, fcntl.LOCK_SH):
        handle = open(creating, "ab", buffering=0, opener=private)  # noqa: SIM115 - the caller's to close
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            creating.rename(path)
            fsync_directory(directory)  # the new name itself must survive a crash
        except OSError:
            handle.close()
            raise
    return handle


def clear_leftovers(directory: Path) -> None:
    """Deal with the `.journal.creating` files of dead processes; skipped (until the next
    call) while a segment is being created."""
    try:
        with _directory_locked(directory, fcntl.LOCK_EX | fcntl.LOCK_NB):
            for path in sorted(directory.glob(f"*.journal{_CREATING}")):
                _clear(path)
    except BlockingIOError:
        return


def clear_empty(directory: Path) -> None:
    """Remove the empty segments no live process holds: a dead process's whose first write
    to it failed (disk full) and was cut back. The drainer comes only for segments that hold
    something, so nothing else would, one more at every such crash."""
    for path in sorted(directory.glob("*.journal")):
        with contextlib.suppress(OSError):  # gone meanwhile, or the disk refuses: next start
            if path.stat().st_size == 0:
                _remove_if_empty(path)


def _remove_if_empty(path: Path) -> None:
    with open(path, "rb") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its writer lives, and may write there yet
        # Once locked: its writer may have written and closed it since the size was read.
        if os.fstat(handle.fileno()).st_size == 0:
            path.unlink()
            log.info("spool_leftover_removed", file=path.name)


def _clear(path: Path) -> None:
    """Remove an empty leftover no one holds; name one that holds anything, so that it drains.
    No estafeta writes into a segment before naming it, but records there could be
    acknowledged events, and the name orders the segment among the others."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its creator lives
        if os.fstat(handle.fileno()).st_size == 0:
            path.unlink()
            log.info("spool_leftover_removed", file=path.name)
        else:
            path.rename(path.with_suffix(""))  # <segment>.journal
            log.warning("spool_leftover_recovered", file=path.name)
    fsync_directory(path.parent)


@contextlib.contextmanager
def _directory_locked(directory: Path, operation: int) -> Iterator[None]:
    """`flock` on the directory itself; with LOCK_NB, BlockingIOError when it is taken."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # and the lock with it


def private(path: str, flags: int) -> int:
    """`open`'s opener for a file only its owner may read: segments and quarantined events
    hold message text and phone numbers, whatever the process's umask allows."""
    return os.open(path, flags, 0o600)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

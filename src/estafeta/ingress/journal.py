"""The spool's record format: how an event is framed in a segment file and read back.

A segment is a sequence of records `[length u32][crc32 u32][JSON]`, big-endian, the JSON
being the `NewEvent` as msgspec encodes it (older versions wrote the same fields with
orjson; both decode).

Reading never stops at damage. Bytes that are not a whole record (a bit flipped on disk, a
bad sector, the torn append of a crash) come back as `Unreadable`, and reading resumes at
the next offset where a whole record starts: a length that fits, then that many bytes whose
CRC-32 matches. The format has no record marker, but it needs none: damaged bytes pass for a
record's header by chance with odds of 1 in 2^32, and a record cannot hide inside another's
JSON, which never holds the raw 0x00 bytes a length below 16 MiB starts with. So spool
files written before this reader drain the same way.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec

from estafeta.store.records import NewEvent

_HEADER = struct.Struct(">II")  # length, crc32


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Bytes of a segment that are no whole record, as they are on disk."""

    offset: int
    data: bytes
    at_end: bool  # no record follows: the torn append of a crash looks like this too


def encode(event: NewEvent) -> bytes:
    return framed(msgspec.json.encode(event))


def framed(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> NewEvent:
    """An event as `encode` wrote it, its deliveries (and message, escalation) typed too."""
    return msgspec.json.decode(payload, type=NewEvent)


def records(data: bytes) -> Iterator[bytes | Unreadable]:
    """In order, the payload of each whole record (its checksum right) of a segment's bytes,
    and each run of bytes between them that is not one."""
    view = memoryview(data)
    offset = 0
    while offset < len(data):
        end = _record_end(view, offset)
        if end is not None:
            yield data[offset + _HEADER.size : end]
            offset = end
            continue
        resume = _next_record(view, data, offset + 1)
        yield Unreadable(offset, data[offset:resume], at_end=resume == len(data))
        offset = resume


def _record_end(view: memoryview, offset: int) -> int | None:
    """Where the whole record at `offset` ends, or None if none starts there. An empty
    payload is none: every record holds a JSON object, and zeroed bytes would otherwise
    read as a run of empty records (a zero length has a zero CRC)."""
    if offset + _HEADER.size >= len(view):
        return None
    length: int
    crc: int
    length, crc = _HEADER.unpack_from(view, offset)
    start = offset + _HEADER.size
    end = start + length
    if length == 0 or end > len(view) or zlib.crc32(view[start:end]) != crc:
        return None
    return end


def _next_record(view: memoryview, data: bytes, offset: int) -> int:
    """The first offset from `offset` where a whole record starts, or the end of `data`.
    Every record's JSON is an object, so only the offsets a header's length before a `{`
    are tried: inside JSON text, the 4 bytes read as a length are far past the end."""
    while (brace := data.find(b"{", offset + _HEADER.size)) >= 0:
        candidate = brace - _HEADER.size
        if _record_end(view, candidate) is not None:
            return candidate
        offset = candidate + 1
    return len(data)

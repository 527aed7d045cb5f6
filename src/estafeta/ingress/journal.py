"""The spool's record format: how an event is framed in a segment file and read back.

A segment is a sequence of records `[length u32][crc32 u32][JSON]`, big-endian, the JSON
being the `NewEvent` as msgspec encodes it (older versions wrote the same fields with
orjson; both decode).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import structlog

from estafeta.store.records import NewEvent

log = structlog.get_logger("estafeta.spool")

_HEADER = struct.Struct(">II")  # length, crc32


def encode(event: NewEvent) -> bytes:
    return framed(msgspec.json.encode(event))


def framed(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> NewEvent:
    """An event as `encode` wrote it, its deliveries (and message, escalation) typed too."""
    return msgspec.json.decode(payload, type=NewEvent)


def read_segment(path: Path) -> Iterator[NewEvent]:
    """The events of a segment, stopping at the first torn or corrupt record."""
    for payload in read_records(path):
        yield decode(payload)


def read_records(path: Path) -> Iterator[bytes]:
    """The payload of each whole record of a segment (its checksum right), stopping at the
    first torn or corrupt one."""
    data = path.read_bytes()
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            log.warning("spool_torn_record", segment=path.name, offset=offset)
            return
        yield payload
        offset = start + length

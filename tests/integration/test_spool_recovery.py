"""The spool recovers by itself from what a bad disk leaves in its directory: bytes of a
segment that no longer read back. Nothing acknowledged is dropped: what cannot be imported
is kept in quarantine/."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from estafeta.ingress.journal import encode
from estafeta.ingress.spool import Spool
from estafeta.observability.metrics import REGISTRY
from estafeta.store.records import NewDelivery, NewEvent
from estafeta.store.sqlstore import SqlStore
from tests.events import new_event as event_named

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

"""The receiver docs/how-to/add-a-destination.md tells a business to copy, run as written:
it takes what estafeta sends once per `webhook-id` and refuses whatever is not signed right
with a 4xx (no retries), not with a crash."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from estafeta.connectors.http import sign_webhook
from tests.acceptance.conftest import free_port

HOW_TO = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "add-a-destination.md"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the how-to's


def documented_receiver() -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", HOW_TO.read_text(), re.S)
    [code] = [block for block in blocks if "serve_forever" in block]
    assert f'SECRET = "{SECRET}"' in code and '("127.0.0.1", 9000)' in code
    return code


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    script = tmp_path / "receiver.py"
    script.write_text(documented_receiver().replace("9000", str(port)))
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}/hooks/agenda"
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
        except urllib.error.HTTPError:
            break  # it answers (501: no GET)
        except OSError:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the receiver did not start"
            time.sleep(0.05)
    try:
        yield url, process
    finally:
        process.terminate()
        process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return refused.code


def signed(body: bytes, msg_id: str, signature: str | None = None) -> dict[str, str]:
    now = int(time.time())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(now),
        "webhook-signature": signature or sign_webhook(SECRET, msg_id, now, body),
    }


def test_the_documented_receiver_takes_each_event_once_and_refuses_bad_signatures(
    receiver: tuple[str, subprocess.Popen[str]],
) -> None:
    url, process = receiver
    event = {"id": "evt_1", "type": "appointment.booked", "data": {"status": "confirmed"}}
    body = orjson.dumps(event)
    assert post(url, body, signed(body, "evt_1")) == 204
    assert post(url, body, signed(body, "evt_1")) == 204  # a redelivery: answered, not redone
    # Before: a signature that is not `v1,<base64>` made `verify` raise a ValueError the
    # receiver did not catch: a dropped connection, which a sender retries.
    for malformed in ("garbage", "v1,x", "v1,AAAA"):
        assert post(url, body, signed(body, "evt_2", malformed)) == 401, malformed
    assert post(url, body, {"content-type": "application/json"}) == 401  # unsigned
    process.terminate()
    printed, _ = process.communicate(timeout=10)
    assert printed.splitlines() == ["appointment.booked {'status': 'confirmed'}"]

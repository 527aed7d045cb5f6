"""`estafeta demo`, the first thing a new user runs, tells the whole story and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_demo_runs_the_whole_story(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "estafeta", "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "subscription handshake: challenge echoed" in out
    assert "1 redelivered webhook answered as a duplicate" in out
    assert "queued → sent → delivered → read" in out
    assert "wait in the dead-letter queue" in out
    assert "0 dead, 0 pending" in out
    assert (tmp_path / "estafeta.toml").exists()

"""Every alert the monitor can fire is in each place an operator looks it up: a section of
the runbook (docs/operations.md) with what to do, the runbook's lists, the log table's
`alert_fired` and `alert_resolved` rows, and docs/http-api.md's `/health/detailed` and
`estafeta_alert_firing`."""

from __future__ import annotations

import re
from pathlib import Path

from estafeta.observability.monitor import EVERY_ALERT

DOCS = Path(__file__).resolve().parents[2] / "docs"
RUNBOOK = (DOCS / "operations.md").read_text(encoding="utf-8")
HTTP_API = (DOCS / "http-api.md").read_text(encoding="utf-8")
NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def names_in(text: str) -> list[str]:
    return re.findall(r"`([a-z_]+)`", text)


def line_of(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_the_runbook_has_a_section_for_each_alert_in_its_order() -> None:
    sections = re.findall(r"^### `([a-z_]+)`$", RUNBOOK, re.M)
    alerts = [name for name in sections if name in EVERY_ALERT]
    assert alerts == list(EVERY_ALERT)
    count = NUMBERS[len(EVERY_ALERT)].capitalize()
    assert f"{count} alerts exist, checked by every `serve` process" in RUNBOOK


def test_every_list_of_the_alerts_names_each_one() -> None:
    # The paragraph of estafeta_alert_firing's values in the runbook's metrics section.
    gauge = RUNBOOK[RUNBOOK.index("* `estafeta_alert_firing == 1`") :].split("\n* ")[0]
    health = HTTP_API[HTTP_API.index("* `alerts.firing`") :].split("\n* ")[0]
    metric = line_of(HTTP_API, "| `estafeta_alert_firing` |")
    fired = line_of(RUNBOOK, "| `alert_fired` |")
    resolved = line_of(RUNBOOK, "| `alert_resolved` |")
    for where, text in [
        ("the runbook's metrics", gauge),
        ("http-api.md's alerts.firing", health),
        ("http-api.md's estafeta_alert_firing", metric),
        ("the runbook's alert_fired row", fired),
        ("the runbook's alert_resolved row", resolved),
    ]:
        missing = [alert for alert in EVERY_ALERT if alert not in names_in(text)]
        assert not missing, f"{where} does not name {missing}"

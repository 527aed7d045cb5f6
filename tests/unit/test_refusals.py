"""Refused webhooks are counted exactly and logged at most once a minute per source and
error, with how many there were: a provider whose every webhook is refused is seen."""

from __future__ import annotations

from structlog.testing import capture_logs

from estafeta.observability.metrics import REGISTRY
from estafeta.observability.refusals import LOG_EVERY_S, Refusals


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(source: str, error: str) -> float:
    found = REGISTRY.get_sample_value(
        "estafeta_ingest_refused_total", {"source": source, "error": error}
    )
    return found or 0.0


def test_a_steady_refusal_is_logged_once_a_minute_with_its_count() -> None:
    ticks = Ticks()
    refusals = Refusals(ticks)
    before = refused("wa-rotated", "invalid_signature")
    with capture_logs() as logs:
        refusals.note("wa-rotated", known=True, status=401, error="invalid_signature")
        for _ in range(4):  # the provider's retries within the minute: counted, not logged
            ticks.now += 10
            refusals.note("wa-rotated", known=True, status=401, error="invalid_signature")
        refusals.note("wa-rotated", known=True, status=429, error="rate_limited")  # its own line
        ticks.now += LOG_EVERY_S
        refusals.note("wa-rotated", known=True, status=401, error="invalid_signature")
    assert refused("wa-rotated", "invalid_signature") - before == 6
    lines = [(e["source"], e["status"], e["error"], e["count"]) for e in logs]
    assert lines == [
        ("wa-rotated", 401, "invalid_signature", 1),
        ("wa-rotated", 429, "rate_limited", 1),
        ("wa-rotated", 401, "invalid_signature", 5),  # the four held back and this one
    ]
    assert {e["event"] for e in logs} == {"ingest_refused"}
    assert {e["log_level"] for e in logs} == {"warning"}


def test_unknown_sources_share_one_series_and_the_log_names_the_path() -> None:
    # A typo in the URL configured at the provider answers 404 on every webhook.
    ticks = Ticks()
    refusals = Refusals(ticks)
    before = refused("", "unknown_source")
    with capture_logs() as logs:
        refusals.note("wa-sool", known=False, status=404, error="unknown_source")
        ticks.now += LOG_EVERY_S
        refusals.note("x" * 500, known=False, status=404, error="unknown_source")
    assert refused("", "unknown_source") - before == 2  # not a series per path anyone sends
    assert [(e["source"], e["unknown_source"]) for e in logs] == [
        (None, "wa-sool"),
        (None, "x" * 63),  # as long as a source id may be
    ]

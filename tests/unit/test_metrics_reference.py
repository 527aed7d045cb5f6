"""docs/http-api.md's table of metrics, what an operator builds dashboards and alerts from,
names every metric `GET /metrics` exports, with its type and labels."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from estafeta.config.models import WorkerConfig
from estafeta.observability import metrics

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"


def exported() -> dict[str, tuple[str, list[str]]]:
    """Each metric the module defines: its exported name, type and labels."""
    found: dict[str, tuple[str, list[str]]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = str(value._type)
            name = str(value._name) + ("_total" if kind == "counter" else "")
            found[name] = (kind, [str(label) for label in value._labelnames])
    return found


def documented() -> dict[str, tuple[str, list[str]]]:
    text = REFERENCE.read_text(encoding="utf-8")
    table = text[text.index("## `GET /metrics`") :]
    found: dict[str, tuple[str, list[str]]] = {}
    for names, kind, labels in re.findall(
        r"^\| (`estafeta_[^|]+) \| (\w+) \| ([^|]+) \|", table, re.M
    ):
        # The labels, not the values listed in parentheses after them.
        label_names = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labels))
        for name in re.findall(r"`(estafeta_\w+)`", names):
            found[name] = (kind, label_names)
    return found


def test_every_exported_metric_is_documented_with_its_type_and_labels() -> None:
    assert len(exported()) > 10  # the scan finds the module's metrics at all
    assert documented() == exported()


def test_the_longest_attempt_allowed_lands_in_a_bucket_of_its_own() -> None:
    """Attempts run up to `worker.max_attempt_s` (at most 600 s): with buckets ending at 30 s,
    every attempt of a slow destination (timeout_s 60 … 300) was one count in +Inf."""
    [bound] = [m for m in WorkerConfig.model_fields["max_attempt_s"].metadata if hasattr(m, "le")]
    finite = [b for b in metrics.ATTEMPT_SECONDS._upper_bounds if b != float("inf")]
    assert max(finite) >= bound.le
    assert {60, 120, 300} <= set(finite)  # the timeouts slow destinations are given

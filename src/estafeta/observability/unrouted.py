"""Events that no route sends anywhere, made visible.

An event that matches no route of its tenant is stored (the API shows it, a message status
still updates its message) and goes to no destination. That is often on purpose (many hubs
route no `message.status`), and sometimes a mistake nothing else would show: a route's
glob that matches nothing the provider sends (`messages.*` for `message.received`), a
filter naming a field the events lack. Each is counted (`estafeta_events_unrouted_total`, by
source and type), and the first of each tenant, source and type is logged once per process
(`event_unrouted`): a kind of event nobody routes is seen once, not on every event. The
tenant counts because every tenant's published events share the source `api`: one
tenant's unrouted type must not hide another's, whose route may be the wrong one. At
most `MAX_NAMED` kinds are named; the events of any other are counted under type "other".
"""

from __future__ import annotations

import structlog

from estafeta.observability.metrics import EVENTS_UNROUTED, series

log = structlog.get_logger("estafeta.routing")

MAX_NAMED = 200  # (tenant, source, type): a metric's series and a log's lines stay few
OTHER = "other"


class Unrouted:
    """Counts and logs this process's unrouted events (see the module's docstring)."""

    def __init__(self, max_named: int = MAX_NAMED) -> None:
        self._max_named = max_named
        self._named: set[tuple[str, str, str]] = set()

    def note(self, tenant_id: str, source_id: str, event_type: str) -> None:
        key = (tenant_id, source_id, event_type)
        if key not in self._named:
            if len(self._named) >= self._max_named:
                series(EVENTS_UNROUTED, source_id, OTHER).inc()
                return
            self._named.add(key)
            log.info("event_unrouted", tenant=tenant_id, source=source_id, type=event_type)
        series(EVENTS_UNROUTED, source_id, event_type).inc()

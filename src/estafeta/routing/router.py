"""Routing: one event → the deliveries it needs, decided purely from the configuration.

A route matches an event when the event's type matches one of its globs (`message.*`) and
its filter, if any, holds. Each destination of each matching route gets one delivery; a
destination reached by several routes gets one delivery (a receiver should not get the same
`webhook-id` twice), at the most urgent of their priorities, keyed as the most urgent of
them that gives an ordering key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import translate
from typing import Any

from estafeta.config import Config
from estafeta.messaging.facts import fitted
from estafeta.record import Record
from estafeta.routing.filter import Filter, lookup, parse


class Target(Record, frozen=True):
    """One delivery that routing asks for."""

    destination_id: str
    priority: int
    max_attempts: int
    ordering_key: str | None


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    id: str
    types: re.Pattern[str]
    filter: Filter | None
    destinations: tuple[str, ...]
    priority: int
    ordering_key: str | None


class Router:
    """Routes of every tenant, compiled once; `targets` is called on the ingest hot path."""

    def __init__(self, config: Config) -> None:
        self._routes: dict[str, list[_CompiledRoute]] = {}
        for route_id, route in zip(config.route_ids(), config.routes, strict=True):
            pattern = "|".join(f"(?:{translate(glob)})" for glob in route.events)
            self._routes.setdefault(route.tenant, []).append(
                _CompiledRoute(
                    id=route_id,
                    types=re.compile(pattern),
                    filter=parse(route.filter) if route.filter else None,
                    destinations=tuple(route.destinations),
                    priority=route.priority,
                    ordering_key=route.ordering_key,
                )
            )
        self._max_attempts = {d.id: d.max_attempts for d in config.destinations}
        # Which routes a (tenant, type) can match never changes: computed once per pair.
        self._by_type: dict[tuple[str, str], list[_CompiledRoute]] = {}

    def _candidates(self, tenant_id: str, event_type: str) -> list[_CompiledRoute]:
        key = (tenant_id, event_type)
        found = self._by_type.get(key)
        if found is None:
            found = [r for r in self._routes.get(tenant_id, ()) if r.types.fullmatch(event_type)]
            if len(self._by_type) < 10_000:  # bound the cache against type explosions
                self._by_type[key] = found
        return found

    def targets(
        self,
        tenant_id: str,
        event: Mapping[str, Any],
        *,
        priority: int | None = None,
        ordering_key: str | None = None,
    ) -> list[Target]:
        """The deliveries an event (the canonical dict) needs; `priority`/`ordering_key`
        given by a publisher override the routes'."""
        # Per destination: the most urgent priority, and the key of the most urgent route
        # that gives one with that route's priority (ties go to the earlier route). The key's
        # own priority is kept apart: after a merge the target's priority may be another
        # route's, and comparing a third route's key against it would pick the wrong key.
        chosen: dict[str, tuple[int, str | None, int | None]] = {}
        for route in self._candidates(tenant_id, str(event["type"])):
            if route.filter is not None and not route.filter.matches(event):
                continue
            key = ordering_key
            if key is None and route.ordering_key:
                value = lookup(event, route.ordering_key)
                # "" names nothing to keep in order (the API refuses it as a key): as one
                # key shared by every such event, they all waited behind each other.
                key = None if value is None or value == "" else fitted(str(value), MAX_ORDERING_KEY)
            level = route.priority if priority is None else priority
            for destination_id in route.destinations:
                previous = chosen.get(destination_id)
                if previous is None:
                    chosen[destination_id] = (level, key, None if key is None else level)
                    continue
                best, best_key, key_level = previous
                if key is not None and (key_level is None or level < key_level):
                    best_key, key_level = key, level
                chosen[destination_id] = (min(best, level), best_key, key_level)
        return [
            Target(
                destination_id=destination_id,
                priority=level,
                max_attempts=self._max_attempts[destination_id],
                ordering_key=key,
            )
            for destination_id, (level, key, _) in chosen.items()
        ]


#: The longest ordering key kept as it is, and the API's limit of `ordering_key`. A longer value
#: from an event (a route's path) would fail the event on PostgreSQL, whose index on
#: deliveries.ordering_key takes no row over ~2.7 KB: it is kept as its digest instead (equal
#: values still give equal keys, so their order holds), as a provider's long ids are.
MAX_ORDERING_KEY = 255

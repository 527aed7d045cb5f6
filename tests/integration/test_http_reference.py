"""docs/http-api.md's table of routes, the reference an integrator codes against, is the
set of routes `estafeta serve` answers: none missing from it, none it names that is gone."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from estafeta.api.app import create_app
from estafeta.config import Config
from estafeta.hub import Hub
from estafeta.store.sqlstore import SqlStore

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"
# Served, and kept out of the OpenAPI document (it is for Prometheus, not integrators).
UNLISTED = {"GET /metrics"}
# The webhook endpoint is its own ASGI app in front of the API (ingress/endpoint.py).
INGEST = {"GET /in/{}", "POST /in/{}"}


def unnamed(path: str) -> str:
    return re.sub(r"\{\w+\}", "{}", path)


def documented_routes() -> set[str]:
    text = REFERENCE.read_text(encoding="utf-8")
    table = text[: text.index("\n## ")]
    return {
        f"{method} {unnamed(path)}"
        for method, path in re.findall(r"^\| `([A-Z]+) (/[^`]*)` \|", table, re.M)
    }


async def test_the_reference_lists_exactly_the_routes_served(
    store: SqlStore, config: Config
) -> None:
    hub = Hub(config, store)
    try:
        # Routers are included lazily by FastAPI; its OpenAPI document lists them all.
        paths = create_app(hub).api.openapi()["paths"]
    finally:
        await hub.close()
    served = {
        f"{method.upper()} {unnamed(path)}" for path, item in paths.items() for method in item
    }
    assert len(served) > 10  # the scan finds the API's routes at all
    assert documented_routes() == served | INGEST | UNLISTED


async def test_the_docs_page_loads_everything_from_the_hub_itself(
    http: httpx.AsyncClient,
) -> None:
    # A clinic's network may keep browsers off the internet: the interactive page must not
    # need a CDN (FastAPI's own page loads Swagger UI from cdn.jsdelivr.net).
    page = await http.get("/docs")
    assert page.status_code == 200
    linked = re.findall(r"""(?:src=|href=|url: )["']([^"']+)""", page.text)
    assert set(linked) == {
        "/docs/assets/swagger-ui.css",
        "/docs/assets/favicon.png",
        "/docs/assets/swagger-ui-bundle.js",
        "/openapi.json",
    }
    assert "//" not in page.text.replace("window.location.origin", "")
    for url in linked:
        answer = await http.get(url)
        assert (answer.status_code, bool(answer.content)) == (200, True), url
    script = await http.get("/docs/assets/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in script.text

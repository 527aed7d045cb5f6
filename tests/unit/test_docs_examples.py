"""The examples a reader copies from the docs work as written: every configuration snippet of
the README and the how-tos passes `estafeta check-config`, every page cursor shown is one the
API would take back, and every link between the documents leads to a file and a heading that
exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from estafeta.api.cursors import CursorKind, read_cursor
from estafeta.cli import main
from estafeta.errors import HttpError

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
HOW_TOS = sorted((ROOT / "docs" / "how-to").glob("*.md"))
DOCUMENTS = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(document: Path, language: str) -> list[str]:
    # A block inside a quote (`> ```toml`, a how-to's warning) counts too: a reader copies it.
    text = re.sub(r"^> ?", "", document.read_text(encoding="utf-8"), flags=re.M)
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def documented_environment() -> dict[str, str | None]:
    """Every `${NAME}` the snippets use, set: as the docs export it where they do, else to a
    stand-in (the docs leave those values to the reader); and no `ESTAFETA_*` override."""
    text = "\n".join(document.read_text(encoding="utf-8") for document in [README, *HOW_TOS])
    used = set(re.findall(r"\$\{(\w+)\}", text))
    exported = dict(re.findall(r"^\$ export (\w+)=(\S+)$", text, re.M))
    env: dict[str, str | None] = {name: exported.get(name, "docs-example-value") for name in used}
    overrides = ("DATABASE_URL", "LISTEN", "ADMIN_KEY", "REDIS_URL", "MASTER_KEY", "CONFIG")
    env.update({f"ESTAFETA_{name}": None for name in overrides})
    return env


README_CONFIG = blocks(README, "toml")[0]
SNIPPETS = [
    pytest.param(snippet, id=f"{document.name}-{n}")
    for document in HOW_TOS
    for n, snippet in enumerate(blocks(document, "toml"), 1)
]


def check_config(tmp_path: Path, text: str) -> tuple[int, str]:
    path = tmp_path / "estafeta.toml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner(env=documented_environment()).invoke(main, ["check-config", str(path)])
    return result.exit_code, result.output


def test_the_readme_configuration_passes_check_config(tmp_path: Path) -> None:
    assert check_config(tmp_path, README_CONFIG) == (0, f"{tmp_path / 'estafeta.toml'}: ok\n")


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_each_how_to_configuration_passes_check_config(tmp_path: Path, snippet: str) -> None:
    # A snippet that declares its own tenant, or a table such as `[server]` (which the README's
    # file has already), is a whole file; the others are added to the README's file, whose
    # tenant, source and `crm` destination they name.
    alone = "[[tenants]]" in snippet or re.search(r"^\[\w+\]", snippet, re.M)
    whole = snippet if alone else f"{README_CONFIG}\n{snippet}"
    assert check_config(tmp_path, whole) == (0, f"{tmp_path / 'estafeta.toml'}: ok\n")


def test_every_cursor_the_docs_show_is_one_the_api_gives() -> None:
    text = "\n".join(document.read_text(encoding="utf-8") for document in DOCUMENTS)
    cursors = re.findall(r'"next": ?"([\w-]+)"', text)
    assert cursors  # http-api.md pages through a conversation

    def taken(cursor: str) -> bool:
        pages: list[tuple[CursorKind, int]] = [("conversations", 2), ("messages", 2), ("dead", 1)]
        for kind, ties in pages:
            try:
                read_cursor(kind, cursor, ties)
            except HttpError:
                continue
            return True
        return False

    assert [cursor for cursor in cursors if not taken(cursor)] == []


def anchors(document: Path) -> set[str]:
    """The anchors GitHub gives the document's headings."""
    text = re.sub(r"^```.*?^```", "", document.read_text(encoding="utf-8"), flags=re.M | re.S)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = 0
        while (f"{slug}-{n}" if n else slug) in found:
            n += 1
        found.add(f"{slug}-{n}" if n else slug)
    return found


def test_every_link_between_the_documents_leads_somewhere() -> None:
    links = [
        (document, target)
        for document in DOCUMENTS
        for target in re.findall(
            r"\]\(([^)\s]+)\)",
            re.sub(r"^```.*?^```", "", document.read_text(encoding="utf-8"), flags=re.M | re.S),
        )
        if not re.match(r"[a-z]+:", target)
    ]
    assert len(links) > 100
    broken = []
    for document, target in links:
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in anchors(linked)
        ):
            broken.append(f"{document.relative_to(ROOT)}: {target}")
    assert broken == []

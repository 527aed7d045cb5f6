"""The docs prove their promises by naming tests (docs/guarantees.md names one per
guarantee): every test they name exists, so a renamed or deleted test cannot leave a
guarantee pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
REFERENCE = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")


def test_every_test_the_docs_name_exists() -> None:
    named = [
        (document.relative_to(ROOT), path, test)
        for document in DOCUMENTS
        for path, test in REFERENCE.findall(document.read_text(encoding="utf-8"))
    ]
    assert len(named) > 30  # the guarantees alone name dozens
    missing = [
        (str(document), path, test)
        for document, path, test in named
        if not (ROOT / path).is_file()
        or (test and not re.search(rf"^\s*(async )?def {test}\(", (ROOT / path).read_text(), re.M))
    ]
    assert missing == []

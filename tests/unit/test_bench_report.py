"""The benchmark's report names the parts of a profile by the functions py-spy shows; a
renamed class or method must not make a part silently vanish from "where the CPU goes"
(the store's mixins once took the ingest batch write and the lease out of every line)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH_REPORT = Path(__file__).resolve().parents[2] / "bench" / "report.py"

# The modules whose classes the report's parts name.
HOT_MODULES = (
    "estafeta.api.app",
    "estafeta.connectors.http",
    "estafeta.delivery.attempts",
    "estafeta.delivery.worker",
    "estafeta.ingress.endpoint",
    "estafeta.store.postgres",
    "uvicorn.protocols.http.httptools_impl",
)


def _report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", BENCH_REPORT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exists(qualname: str) -> bool:
    """Whether some class of the loaded estafeta or uvicorn modules has this `Class.method`
    (a class found through a subclass's base counts: py-spy names the defining class)."""
    owner, _, method = qualname.partition(".")
    for name, module in list(sys.modules.items()):
        if not name.startswith(("estafeta", "uvicorn")):
            continue
        for value in vars(module).values():
            if not isinstance(value, type):
                continue
            for cls in value.__mro__:
                if cls.__name__ == owner and method in vars(cls):
                    return True
    return False


def test_every_part_of_the_report_names_a_function_of_todays_code() -> None:
    for module in HOT_MODULES:
        importlib.import_module(module)
    parts: dict[str, list[str]] = {}
    for label, qualname in _report()._PARTS:
        parts.setdefault(label, []).append(qualname)
    missing = {label: names for label, names in parts.items() if not any(map(_exists, names))}
    assert missing == {}

"""scripts/draw_imports.py draws the import graph from the source: it must see the imports the code has."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _edges(*args: str) -> set[tuple[str, str]]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/draw_imports.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.startswith("digraph imports {") and out.rstrip().endswith("}")
    return set(re.findall(r'^  "([\w.]+)" -> "([\w.]+)";$', out, re.M))


def test_the_graph_has_the_codes_imports_and_keeps_the_layers() -> None:
    edges = _edges()
    assert {
        ("loragate.service.gateway", "loragate.service.routing"),  # from loragate.service.routing import ...
        ("loragate.service.forwarding", "loragate.common.sse"),  # from loragate.common import sse
        ("loragate.service.requestlog.columns", "loragate.service.requestlog._lognative"),  # a C extension
        ("loragate.cli", "loragate.monitoring.commands"),  # inside a function
    } <= edges
    assert not [(a, b) for a, b in edges if a.startswith("loragate.service") and b.startswith("loragate.monitoring")]
    assert not [(a, b) for a, b in edges if a.startswith("loragate.monitoring") and b.startswith("loragate.service")]


def test_one_package_draws_its_modules_and_what_they_import() -> None:
    edges = _edges("--package", "monitoring")
    assert edges and all(a.startswith("loragate.monitoring") for a, _ in edges)

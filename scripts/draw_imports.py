"""Draw the house from the code: every module of the shipped package and who imports whom, as Graphviz DOT.

    .venv/bin/python scripts/draw_imports.py > /tmp/imports.dot && dot -Tsvg /tmp/imports.dot -o /tmp/imports.svg
    .venv/bin/python scripts/draw_imports.py --package service   # one room: its modules and what they import

Modules are grouped by layer (loragate.common, the gateway in service/, the monitor in monitoring/, the
pipeline, the command line); an arrow A -> B means A imports B (at the top or inside a function). Read
from the source with ast: nothing is imported or run. The layer rules themselves are contracts in
pyproject.toml [tool.importlinter], checked by tests/test_package.py.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package name it ships as (pyproject.toml [tool.setuptools] package-dir).
FOLDERS = {"loragate": "loragate", "service": "loragate.service", "monitoring": "loragate.monitoring"}
COLOURS = {
    "loragate.common": "#f1f1f1",
    "loragate.service": "#e8f1fb",
    "loragate.monitoring": "#eaf6ea",
    "loragate.pipeline": "#f5ecf8",
    "loragate": "#fdf1e3",
}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        # .pyi: a C extension's stub stands for the extension (service/_lognative.c ...)
        for path in sorted([*(ROOT / folder).rglob("*.py"), *(ROOT / folder).rglob("*.pyi")]):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if folder == "loragate" and parts[0] in ("service", "monitoring"):
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up node.level - 1 packages from this one
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            # ``from pkg import module`` names the module; ``from module import name`` the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer(name: str) -> str:
    for prefix in ("loragate.common", "loragate.service", "loragate.monitoring", "loragate.pipeline"):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return "loragate"


def dot(package: str | None = None) -> str:
    found = modules()
    known = set(found)
    edges = {(a, b) for a, path in found.items() for b in imports(a, path, known)}
    if package:
        prefix = FOLDERS.get(package, package)
        inside = {m for m in known if m == prefix or m.startswith(prefix + ".")}
        edges = {(a, b) for a, b in edges if a in inside}
        known = inside | {b for _, b in edges}
    lines = [
        "digraph imports {",
        '  graph [rankdir=LR, fontname="Helvetica", ranksep=1.2, nodesep=0.15];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, fillcolor="#ffffff"];',
        '  edge [color="#00000055", arrowsize=0.5];',
    ]
    for group in COLOURS:
        members = sorted(m for m in known if layer(m) == group)
        if not members:
            continue
        lines.append(
            f'  subgraph "cluster_{group}" {{ label="{group}"; style="rounded,filled"; fillcolor="{COLOURS[group]}";'
        )
        lines += [f'    "{m}" [label="{m.removeprefix(group + ".") if m != group else m}"];' for m in members]
        lines.append("  }")
    lines += [f'  "{a}" -> "{b}";' for a, b in sorted(edges)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", help="one folder or package (service, monitoring, loragate.common, ...)")
    args = parser.parse_args()
    sys.stdout.write(dot(args.package))
    return 0


if __name__ == "__main__":
    sys.exit(main())

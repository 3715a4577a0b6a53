"""Every third-party import in the tree comes from a package pyproject.toml declares (directly or through
a declared package's own requirements), so a clean machine that installs the extras can run it.

A local venv hides the mistake: a package installed by hand (or left behind after a merge dropped it from
an extra) imports fine here and fails only in CI on a fresh machine.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("loragate", "service", "monitoring", "tests", "bench", "scripts")
LOCAL = {"loragate", "tests", "bench", "service", "monitoring"}


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [Requirement(text) for text in project["dependencies"] + [r for group in extras.values() for r in group]]


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate(default_environment() | {"extra": extra}) for extra in extras | {""})


def _closure(roots: list[Requirement]) -> set[str]:
    """The declared distributions and everything they pull in (with the extras asked for), as installed here."""
    seen: dict[str, set[str]] = {}
    queue = [(canonicalize_name(r.name), set(r.extras)) for r in roots if _applies(r, set())]
    while queue:
        name, extras = queue.pop()
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if _applies(requirement, extras):
                queue.append((canonicalize_name(requirement.name), set(requirement.extras)))
    return set(seen)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_declared() -> None:
    files = [path for folder in SCANNED for path in (ROOT / folder).rglob("*.py")]
    local = LOCAL | {path.stem for path in files} | {path.parent.name for path in files}
    providers = metadata.packages_distributions()
    declared = _closure(_declared())
    undeclared: dict[str, set[str]] = {}
    for path in files:
        for module in _imports(path) - local - set(sys.stdlib_module_names):
            dists = {canonicalize_name(d) for d in providers.get(module, [])}
            if dists and not dists & declared:  # not installed here: CI's own import error will say so
                undeclared.setdefault(f"{module} ({', '.join(sorted(dists))})", set()).add(str(path.relative_to(ROOT)))
    assert not undeclared, "imported but in no extra of pyproject.toml:\n" + "\n".join(
        f"  {module}: {', '.join(sorted(paths)[:3])}" for module, paths in sorted(undeclared.items())
    )

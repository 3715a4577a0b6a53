"""Another git ref of loragate, importable beside this checkout: a bench measures it in the same run.

``overlay(ref, work)`` lays the ref's ``loragate``, ``service`` and ``monitoring`` out as one importable
``loragate`` package under ``work`` (the layout the wheel has) and copies in this checkout's built C extensions,
which is right only while the ref's C sources and setup.py are this checkout's (checked: else ValueError).
``command(pkg, argv)`` runs ``python -m loragate ARGV`` with that package first on sys.path (ahead of the
editable install's finder). ``module_at(ref, path, name)`` loads one file of the ref as a module.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True).stdout


def overlay(ref: str, work: Path) -> Path:
    changed = _git("diff", "--name-only", ref, "--", "*.c", "*.h", "setup.py").decode().split()
    if changed:
        raise ValueError(f"{ref} has other C sources than this checkout ({', '.join(changed)}): build it apart")
    source = work / "src"
    source.mkdir(parents=True)
    with tempfile.TemporaryFile() as archive:
        archive.write(_git("archive", "--format=tar", ref, "loragate", "service", "monitoring"))
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(source, filter="data")
    package = work / "pkg" / "loragate"
    shutil.move(source / "loragate", package)
    shutil.move(source / "service", package / "service")
    shutil.move(source / "monitoring", package / "monitoring")
    for folder, inside in (("loragate", ""), ("service", "service"), ("monitoring", "monitoring")):
        for built in (ROOT / folder).rglob("*.so"):
            target = package / inside / built.relative_to(ROOT / folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, target)
    return package.parent


def command(pkg: Path, argv: list[str]) -> list[str]:
    launcher = (
        "import sys, runpy; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'loragate'; "
        "runpy.run_module('loragate', run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", launcher, str(pkg), *argv]


def module_at(ref: str, path: str, name: str) -> ModuleType:
    """One module file of ``ref``, loaded under ``name`` (its imports resolve as this checkout's)."""
    work = Path(tempfile.mkdtemp(prefix="loragate-ref-"))
    file = work / f"{name}.py"
    file.write_bytes(_git("show", f"{ref}:{path}"))
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

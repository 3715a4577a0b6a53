"""What is shipped: the wheel installs one import name, `loragate`, holding every module of the three source
folders; on the unpacked wheel, the layer contracts hold (import-linter) and the types check (mypy).

The checks run on the wheel, not the source tree: `loragate.service` and `loragate.monitoring` live in
`service/` and `monitoring/` (setuptools package-dir), which only the built package shows as one folder.
Config for both tools: pyproject.toml [tool.importlinter] and [tool.mypy].
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> where its modules land in the wheel.
FOLDERS = {"loragate": "loragate", "service": "loragate/service", "monitoring": "loragate/monitoring"}


@dataclass(frozen=True)
class Built:
    src: Path  # the snapshot of the source the wheel was built from
    wheel: Path
    unpacked: Path  # the wheel's contents, as pip would install them into site-packages


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH", "PYTHONSTARTUP")}
    return env | extra


def _repo_paths(text: str) -> str:
    """Shipped paths back to repository folders: loragate/service/x.py -> service/x.py."""
    for folder, shipped in sorted(FOLDERS.items(), key=lambda kv: -len(kv[1])):
        if folder != shipped:
            text = re.sub(rf"(?m)^{re.escape(shipped)}/", f"{folder}/", text)
    return text


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    # Build from a snapshot, not in place: an in-tree build keeps build/lib between runs (a deleted module
    # would still ship) and would race other builds of the same tree.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = dist.glob("loragate-*.whl")
    unpacked = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    return Built(src, wheel, unpacked)


def _top_level_names(members: list[str]) -> set[str]:
    names = set()
    for member in members:
        parts = member.split("/")
        if parts[0].endswith(".dist-info"):
            continue
        if parts[0].endswith(".data"):  # {name}.data/purelib|platlib/... installs at the top of site-packages too
            if parts[1] not in ("purelib", "platlib") or len(parts) < 3:
                continue
            parts = parts[2:]
        names.add(parts[0].removesuffix(".py"))
    return names


def test_wheel_installs_only_loragate(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as zf:
        members = zf.namelist()
        top_level = [zf.read(m).decode().split() for m in members if m.endswith(".dist-info/top_level.txt")]
    assert _top_level_names(members) == {"loragate"}
    assert top_level in ([], [["loragate"]])  # setuptools' own record of the same, where it writes one


def test_wheel_ships_every_module(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as zf:
        shipped = set(zf.namelist())
    expected = {
        f"{shipped_as}/{path.relative_to(built.src / folder).as_posix()}"
        for folder, shipped_as in FOLDERS.items()
        for path in (built.src / folder).rglob("*.py")
    }
    assert len(expected) > 30
    missing = sorted(expected - shipped)
    packages = sorted({m.rsplit("/", 1)[0].replace("/", ".") for m in missing})
    assert not missing, (
        f"not in the wheel: {_repo_paths(chr(10).join(missing))}\n"
        f"add {packages} to [tool.setuptools] packages in pyproject.toml"
    )
    # The C modules, compiled for this platform (setup.py; scripts/setup.sh installs what they need): the
    # scrubber's native rules, the request log's JSON reading and its queue.
    for module in (
        r"loragate/common/_scrubnative",
        r"loragate/service/requestlog/_lognative",
        r"loragate/service/requestlog/_logqueue",
    ):
        assert [m for m in shipped if re.fullmatch(module + r"\.cpython-311-.+\.so", m)], (module, shipped)


def test_layer_contracts_hold(built: Built) -> None:
    # grimp finds `loragate` through the import system: run from the unpacked wheel, check that is what it
    # found (not the editable install, whose finder maps service/ and monitoring/ out of sight), then lint.
    lint = (
        "import importlib.util, sys\n"
        "for name in ('loragate', 'loragate.service', 'loragate.monitoring'):\n"
        "    origin = importlib.util.find_spec(name).origin\n"
        "    if not origin.startswith(sys.argv[1]):\n"
        "        sys.exit(f'{name} found at {origin}, not in the unpacked wheel')\n"
        "from importlinter.cli import lint_imports_command\n"
        "lint_imports_command.main([sys.argv[2], '--no-cache'], prog_name='lint-imports')\n"
    )
    unpacked = str(built.unpacked.resolve()) + os.sep
    result = subprocess.run(
        [sys.executable, "-c", lint, unpacked, str(built.src / "pyproject.toml")],
        cwd=built.unpacked,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(PYTHONPATH=unpacked),
    )
    assert result.returncode == 0, (
        "import-linter (loragate.service = service/, loragate.monitoring = monitoring/):\n"
        + result.stdout
        + result.stderr
    )


def test_types_check(built: Built) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "-p",
            "loragate",
            "--config-file",
            str(built.src / "pyproject.toml"),
            "--cache-dir",
            os.devnull,
            "--no-color-output",
            "--hide-error-context",
        ],
        cwd=built.unpacked,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(MYPYPATH=str(built.unpacked)),
    )
    output = _repo_paths(result.stdout + result.stderr)
    # It checked the shipped copy, every module of it (not an installed or editable loragate elsewhere).
    checked = re.search(r"(?:in|checked) (\d+) source files?", output)
    shipped = [path for path in (built.unpacked / "loragate").rglob("*.py*") if path.suffix in (".py", ".pyi")]
    assert checked and int(checked.group(1)) == len(shipped), output
    assert result.returncode == 0, output

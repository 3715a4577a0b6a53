"""Static checks over the whole tree: no undefined names, unused imports or syntax errors (ruff's F and E9),
no line over 120 columns (E501), and every file as `ruff format` writes it (pyproject.toml [tool.ruff])."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["loragate", "service", "monitoring", "tests", "bench", "deploy", "scripts"]


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *FOLDERS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_finds_nothing():
    result = _ruff("check", "--select", "F,E9,E501", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_file_is_formatted():
    result = _ruff("format", "--check")
    assert result.returncode == 0, "run `.venv/bin/ruff format .`:\n" + result.stdout + result.stderr

"""Static checks over the whole tree: no undefined names, unused imports or syntax errors (ruff's F and E9),
and no line over 120 columns (E501; pyproject.toml lists the files not yet reflowed)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E9,E501",
                             "--output-format", "concise",
                             "loragate", "service", "monitoring", "tests", "bench", "deploy"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

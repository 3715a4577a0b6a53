"""Regenerate the deploy artifacts that are derived from a single source.

* deploy/grafana/dashboards/*.json  <- deploy/grafana/dashboards.py (dashboards as code)
* helm/loragate/dashboards/*.json   <- copies of the above (Helm's .Files cannot reach outside the chart)
* helm/loragate/rules/*.yml         <- copies of deploy/prometheus/rules/*.yml (for the PrometheusRule)

    python deploy/build.py           # write
    python deploy/build.py --check   # exit 1 and name the stale files (the tests run this)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana" / "dashboards"
RULES = ROOT / "deploy" / "prometheus" / "rules"
CHART = ROOT / "helm" / "loragate"


def _dashboard_module():
    spec = importlib.util.spec_from_file_location("loragate_dashboards", ROOT / "deploy" / "grafana" / "dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_files() -> dict[Path, str]:
    files: dict[Path, str] = {}
    for name, build in _dashboard_module().DASHBOARDS.items():
        text = json.dumps(build(), indent=2) + "\n"
        files[GRAFANA / name] = text
        files[CHART / "dashboards" / name] = text
    for rule_file in sorted(RULES.glob("*.yml")):
        files[CHART / "rules" / rule_file.name] = rule_file.read_text()
    return files


def stale_files() -> list[Path]:
    expected = expected_files()
    stale = [path for path, text in expected.items() if not path.exists() or path.read_text() != text]
    for directory in (GRAFANA, CHART / "dashboards", CHART / "rules"):
        stale += [path for path in directory.glob("*") if path.is_file() and path not in expected]
    return stale


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run: python deploy/build.py)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in expected_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for directory in (GRAFANA, CHART / "dashboards", CHART / "rules"):
        for path in directory.glob("*"):
            if path.is_file() and path not in expected_files():
                path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

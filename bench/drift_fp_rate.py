"""False-positive rate of the drift check: repeated pairs of windows from one distribution.

    python bench/drift_fp_rate.py [--pairs 50] [--rows 300 2000]

Prints, per window size, how often each column is flagged and how often the dataset
would be called drifted at several drift-share thresholds. Nothing changed between the
two windows, so every flag is a false positive.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/synthetic.py, tests/topics.py: the test fixtures


def measure(rows: int, pairs: int, shares=(0.2, 0.3, 0.4, 0.5)) -> dict:
    from loragate.monitoring.drift import DriftConfig, run_drift
    from tests.synthetic import requests_frame

    column_flags: Counter = Counter()
    share_values = []
    columns = 0
    for i in range(pairs):
        ref = requests_frame(rows, seed=10_000 + 2 * i)
        cur = requests_frame(rows, seed=10_001 + 2 * i)
        result = run_drift(ref, cur, route="r", config=DriftConfig(drift_share=1.0))
        columns = len(result.features)
        column_flags.update(result.drifted_features)
        share_values.append(result.share)
    return {
        "rows": rows,
        "pairs": pairs,
        "columns": columns,
        "column_fp_rate": sum(column_flags.values()) / (pairs * columns),
        "per_column": {c: n / pairs for c, n in sorted(column_flags.items())},
        "any_column_flagged": sum(s > 0 for s in share_values) / pairs,
        "dataset_fp_rate": {s: sum(v >= s for v in share_values) / pairs for s in shares},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--rows", type=int, nargs="+", default=[300, 2000])
    args = parser.parse_args()
    for rows in args.rows:
        started = time.perf_counter()
        out = measure(rows, args.pairs)
        print(f"rows={rows} pairs={out['pairs']} columns={out['columns']} ({time.perf_counter() - started:.0f} s)")
        print(f"  per-column false-positive rate: {out['column_fp_rate']:.3f}")
        print(f"  runs with any column flagged:   {out['any_column_flagged']:.2f}")
        print(f"  per column: {out['per_column']}")
        print(
            "  dataset drift false-positive rate by drift_share: "
            + ", ".join(f">={s}: {r:.2f}" for s, r in out["dataset_fp_rate"].items())
        )


if __name__ == "__main__":
    main()

"""How long one drift report takes at 10k and 100k rows a window, text descriptors included.

    python bench/drift_time.py [--rows 10000 100000] [--target-s 30]

Times run_drift end to end (features, Evidently descriptors and report, HTML and JSON
written), after one small warm-up run so imports are not counted. The target is 100k
rows a side in under 30 s on the 2-core reference machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/synthetic.py, tests/topics.py: the test fixtures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--target-s", type=float, default=30.0)
    args = parser.parse_args()

    started = time.perf_counter()
    from loragate.monitoring.drift import run_drift
    from tests.synthetic import requests_frame

    print(f"import: {time.perf_counter() - started:.1f} s")
    with tempfile.TemporaryDirectory() as out:
        run_drift(requests_frame(200, seed=1), requests_frame(200, seed=2), route="warm-up", out_dir=out)
        for rows in args.rows:
            reference = requests_frame(rows, seed=1)
            current = requests_frame(rows, seed=2, prompt_words=20, new_vocabulary=0.2, latency_scale=1.3)
            started = time.perf_counter()
            result = run_drift(reference, current, route="bench", out_dir=out)
            took = time.perf_counter() - started
            print(
                f"rows={rows:>7} a side: {took:6.1f} s  ({took / args.target_s:.2f} x the {args.target_s:g} s target)"
                f"  features={len(result.features)} drifted={len(result.drifted_features)} status={result.status}"
            )


if __name__ == "__main__":
    main()

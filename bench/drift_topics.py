"""Semantic drift on real questions: false positives, detection of a change of topic, time at 100k rows.

    python bench/drift_topics.py [--pairs 50] [--rows 150 1000] [--shifts 0 0.2 0.5 1] [--time-rows 100000]
                                 [--out bench/results/drift_topics.json]

Text: the English ChatterBot corpus (PyPI chatterbot-corpus, the dev extra), human-written
dialogs by topic (tests/topics.py). Reference windows are questions about coding,
AI and computers; a current window has a share ``shift`` of trivia, psychology and small-talk
questions instead, each drawn with the word count of the question it replaces, so lengths
do not change. Shift 0 is two independent windows of one population: every flag is a false
positive. For each pair, run_drift (the whole report on ``prompt_text``) gives the inputs
group's verdict; the text-content test's verdict and AUC are recorded on their own too.

Targets (issue 9): input drift on <= 5% of same-population pairs, >= 95% of full-shift pairs;
the rate at 20% / 50% is reported. Time per report at 100k rows a side (the whole report:
request-log columns plus real prompts) under 30 s on the 2-core reference machine; the ratio
to a report without the text-content test, measured in the same run, is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/synthetic.py, tests/topics.py: the test fixtures


def pairs_run(rows: int, shift: float, pairs: int) -> dict:
    import pandas as pd

    from loragate.monitoring.drift import run_drift
    from tests.topics import window

    inputs = content = 0
    aucs, flagged = [], Counter()
    started = time.perf_counter()
    for i in range(pairs):
        seed = 1_000_003 * rows + 10_007 * int(shift * 100) + 2 * i
        ref = pd.DataFrame({"prompt_text": window(rows, seed=seed)})
        cur = pd.DataFrame({"prompt_text": window(rows, seed=seed + 1, shifted=shift)})
        result = run_drift(ref, cur, route="bench")
        group = result.group("inputs")
        inputs += group.status == "drift"
        feature = result.feature("prompt_content")
        content += feature.drifted
        aucs.append(feature.score)
        flagged.update(f for f in group.drifted_features if f != "prompt_content")
    return {
        "rows": rows,
        "shift": shift,
        "pairs": pairs,
        "input_drift_rate": inputs / pairs,
        "content_drift_rate": content / pairs,
        "content_auc_mean": round(statistics.mean(aucs), 4),
        "content_auc_min": round(min(aucs), 4),
        "content_auc_max": round(max(aucs), 4),
        "other_input_features_flagged": {f: n / pairs for f, n in sorted(flagged.items())},
        "seconds_per_pair": round((time.perf_counter() - started) / pairs, 3),
    }


def time_report(rows: int) -> dict:
    from loragate.monitoring.drift import DriftConfig, run_drift
    from tests.synthetic import requests_frame
    from tests.topics import window

    reference = requests_frame(rows, seed=1)
    current = requests_frame(rows, seed=2)
    reference["prompt_text"] = window(rows, seed=1)
    current["prompt_text"] = window(rows, seed=2, shifted=0.5)
    out = {"rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        run_drift(reference.head(200), current.head(200), route="warm-up", out_dir=tmp)
        for name, config in (("without_content_s", DriftConfig(text_content=False)), ("report_s", DriftConfig())):
            started = time.perf_counter()
            result = run_drift(reference, current, route="bench", out_dir=tmp, config=config)
            out[name] = round(time.perf_counter() - started, 2)
        out["drifted_groups"] = result.drifted_groups
        out["content_auc"] = round(result.feature("prompt_content").score, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--rows", type=int, nargs="+", default=[150, 1000])
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.2, 0.5, 1.0])
    parser.add_argument("--time-rows", type=int, default=100_000, help="0: skip the timing")
    parser.add_argument("--target-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    from tests.topics import TOPICS, prompts

    pools = {topic: len(prompts(topic)) for topic in TOPICS}
    print(f"pools (distinct prompts): {pools}")
    cells = []
    for rows in args.rows if args.pairs else []:  # --pairs 0: the timing only
        for shift in args.shifts:
            cell = pairs_run(rows, shift, args.pairs)
            cells.append(cell)
            target = "target <= 0.05" if shift == 0 else ("target >= 0.95" if shift == 1 else "reported")
            print(
                f"rows={rows:>5} shift={shift:<4g} input drift {cell['input_drift_rate']:.2f} ({target})  "
                f"content test {cell['content_drift_rate']:.2f}  AUC mean {cell['content_auc_mean']:.3f} "
                f"[{cell['content_auc_min']:.3f}, {cell['content_auc_max']:.3f}]  "
                f"other features {cell['other_input_features_flagged']}  {cell['seconds_per_pair']:.2f} s/pair"
            )
    timing = None
    if args.time_rows:
        timing = time_report(args.time_rows)
        print(
            f"rows={timing['rows']} a side: report {timing['report_s']:.1f} s "
            f"({timing['report_s'] / args.target_s:.2f} x the {args.target_s:g} s target); without the content test "
            f"{timing['without_content_s']:.1f} s (ratio {timing['report_s'] / timing['without_content_s']:.2f}); "
            f"drifted groups {timing['drifted_groups']}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "corpus": "chatterbot-corpus (English): tech = coding, ai, computers; "
                    "everyday = trivia, psychology, "
                    "conversations, greetings, emotion; user-side turns; windows drawn with replacement",
                    "pools": pools,
                    "cells": cells,
                    "timing": timing,
                    "machine": platform.platform(),
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

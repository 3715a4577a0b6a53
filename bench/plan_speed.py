"""How long a rollout's plan takes (monitoring/rollout/plan.py), next to the per-step search it replaced.

    python bench/plan_speed.py [--repeats 3]

The plan asks the judge (``judge_many``) at which canary sample size an A/A canary passes, for every
step below 100 %, for a median and a slow rollout, over a coarse grid of sizes then a fine one; a plan that
cannot finish searches for settings that would let it (many more plans). ``judge_many`` costs far more
per call than per size, so ``plan.needs`` judges all of a plan's steps and both rollouts in one call per grid.
The baseline, re-implemented here (``per_step_needs``), is the search before: one step and one rollout at
a time, the coarse grid judged again with the fine one (two calls per step and rollout).

Cases: the routes of tests/unit/test_rollout.py (lognormal latency, 1 % 5xx) at 20, 4 and 2.67 requests a
second (busy: feasible; edge: infeasible, no suggestions; small: infeasible, with the suggestion search), 5
steps instead of 3, and a judge with feedback. Each is planned with both searches in the same run (CPU time,
best of ``--repeats``), and the two plans must be equal. Prints the seconds and the ratio; saves
bench/results/plan_speed.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import ndtr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loragate.monitoring.judge import judge_many  # noqa: E402
from loragate.monitoring.judgeresult import judged_steps  # noqa: E402
from loragate.monitoring.rollout import plan as plan_module  # noqa: E402
from loragate.monitoring.rollout.config import CanaryConfig  # noqa: E402
from loragate.monitoring.rollout.plan import COARSE, FINE, RouteTraffic, plan  # noqa: E402


def per_step_needs(judge, steps, rows, traffic):
    """The search before: each (weight, z) alone, the coarse grid then coarse + fine judged again."""
    return [_one(judge, steps, weight, traffic, z) for weight, z in rows]


def _one(judge, steps, weight, traffic, z):
    coarse = _judged(judge, steps, weight, traffic, COARSE, z)
    fine = [np.linspace(COARSE[i - 1], COARSE[i], FINE + 1)[1:-1] for i in set(coarse.values()) if i is not None and i]
    sizes = np.unique(np.concatenate([COARSE, *fine])) if fine else COARSE
    first = _judged(judge, steps, weight, traffic, sizes, z)
    return {name: None if i is None else float(sizes[i]) for name, i in first.items()}


def _judged(judge, steps, weight, traffic, sizes, z):
    stable_sizes = sizes * (100 - weight) / weight
    score_range = judge.feedback.score_range if judge.feedback is not None else (0.0, 1.0)
    canary = traffic.unlucky(sizes, stable_sizes, z, score_range) if z else traffic.expected(sizes)
    stable = traffic.expected(stable_sizes)
    codes = judge_many(judge, (canary, stable), tuple(traffic.latency), steps=judged_steps(steps))
    found = {}
    for name, decided in codes.items():
        passed = np.flatnonzero(decided == 1)
        found[name] = int(passed[0]) if passed.size else None
    return found


def route_traffic(rps: float, feedback: bool = False) -> RouteTraffic:
    bounds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
    below = ndtr((np.log(bounds) - math.log(0.6)) / 0.5)
    return RouteTraffic(
        rps,
        0.01,
        0.0,
        dict(zip(bounds, below)),
        feedback_per_request=0.3 if feedback else 0.0,
        feedback_mean=0.8 if feedback else None,
        window_s=3600,
    )


def spec(**overrides) -> CanaryConfig:
    return CanaryConfig(
        **{
            "route": "support",
            "stable": "v1",
            "canary": "v2",
            "steps": [5, 25, 50, 100],
            "interval_s": 300,
            **overrides,
        }
    )


CASES = {
    "busy (20 req/s, feasible)": (spec(), route_traffic(20), True),
    "edge (4 req/s, infeasible, no suggestions)": (spec(), route_traffic(4), False),
    "small (2.67 req/s, infeasible, suggestions)": (spec(), route_traffic(2.67), True),
    "5 steps (2.67 req/s, suggestions)": (spec(steps=[1, 5, 25, 50, 75, 100]), route_traffic(2.67), True),
    "feedback judged (20 req/s)": (spec(judge={"feedback": {}}), route_traffic(20, feedback=True), True),
}


def timed(spec_: CanaryConfig, traffic: RouteTraffic, suggest: bool, repeats: int) -> tuple[float, dict]:
    best, result = math.inf, {}
    for _ in range(repeats):
        started = time.process_time()
        result = plan(spec_, traffic, suggest=suggest).as_dict()
        best = min(best, time.process_time() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batched = plan_module.needs
    plan(spec(), route_traffic(20))  # imports and first-call costs out of the figures
    rows = []
    for name, (spec_, traffic, suggest) in CASES.items():
        plan_module.needs = per_step_needs
        try:
            before, expected = timed(spec_, traffic, suggest, args.repeats)
        finally:
            plan_module.needs = batched
        after, got = timed(spec_, traffic, suggest, args.repeats)
        assert got == expected, name  # the same plan, suggestions included
        rows.append(
            {
                "case": name,
                "per_step_s": round(before, 4),
                "batched_s": round(after, 4),
                "speedup": round(before / after, 2),
                "feasible": got["feasible"],
                "suggestions": [s["change"] for s in got["suggestions"]],
            }
        )
        print(
            f"{name:48s} per-step {before:6.3f} s  batched {after:6.3f} s  x{before / after:4.1f} faster"
            f"  (same plan: feasible={got['feasible']}, {len(got['suggestions'])} suggestions)"
        )
    total_before, total_after = sum(r["per_step_s"] for r in rows), sum(r["batched_s"] for r in rows)
    print(
        f"{'all cases':48s} per-step {total_before:6.3f} s  batched {total_after:6.3f} s  "
        f"x{total_before / total_after:4.1f} faster (CPU time, best of {args.repeats}, same run)"
    )
    out = ROOT / "bench" / "results" / "plan_speed.json"
    out.write_text(
        json.dumps(
            {
                "measured": "CPU seconds per plan(), best of repeats, both searches in one run",
                "repeats": args.repeats,
                "cases": rows,
                "total": {
                    "per_step_s": round(total_before, 3),
                    "batched_s": round(total_after, 3),
                    "speedup": round(total_before / total_after, 2),
                },
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

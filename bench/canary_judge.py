"""The canary judge against simulated rollouts with known truth, next to the threshold judge it replaced.

    python bench/canary_judge.py [--rollouts 500] [--requests 300] [--seed 1]

Each rollout: steps 5, 25, 50 (% canary) then 100; an analysis every interval over the step's
traffic so far (``--requests`` new canary requests per analysis, the stable gets the rest of the
traffic at that weight: 19x at 5 %, 3x at 25 %, 1x at 50 %); fail -> rolled back, pass -> next step,
inconclusive -> hold; ``--max-holds`` holds on one step -> stalled (hold and alert, never promote).

Traffic: 5xx 1 %, fallbacks 0 %, latency lognormal (median 0.6 s, sigma 0.5: p95 1.37 s) binned
into the gateway's own buckets (service/metrics.py LATENCY_BUCKETS), thumbs-up/down feedback on
``--feedback-share`` of the requests with mean 0.8. Bad canaries change one thing: 5xx 4 %,
fallbacks 3 %, every latency x1.5 (p95 x1.5), mean feedback 0.6, or 8 % of its requests 4x
slower (a slow tail: p99 ~1.9 s -> ~4 s; also judged without the latency_tail check, the judge
before it). One more canary is worse by less than the min effect (5xx 1 % -> 2 %): what the judge
does with a regression it was told does not matter; and one is better than the stable (5xx 0.5 %,
latency x0.8): it must be promoted. A small route: 40 canary requests an analysis at every step.

The plan (monitoring/rollout/plan.py) against simulation: for routes of ``--plan-rps`` requests a
second (the canary gets its weight's share: rps x 300 s x weight an analysis), the plan's predicted
analyses to promote an A/A canary next to the median of simulated A/A rollouts (target: within
30 %), and, where the plan says the rollout cannot finish, the share of simulated rollouts that
stall (target: at least half). ``--sigma`` changes the latency's spread (a heavier tail),
``--feedback-share 0`` turns the feedback check off (the judge's own defaults), ``--no-tail`` the
tail check.

Printed per scenario and judge: rolled back (A/A: false rollbacks), caught before 50 % weight
(rolled back at 5 or 25 %), promoted, stalled, and the analyses a good canary needs to be
promoted. The statistical judge is monitoring/judge.py, vectorised over rollouts with its own
primitives (and cross-checked against ``judge()`` on a sample of analyses); the threshold judge
is the rule loragate used before it (gone from the package), re-implemented here as the baseline
(threshold_decisions: its default thresholds, plus min_feedback_score 0.7 so that it judges feedback at all).
Saves bench/results/canary_judge.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

from loragate.monitoring.judge import Counts, Observed, judge, judge_many
from loragate.monitoring.judgeconfig import JudgeConfig
from loragate.monitoring.judgeresult import judged_steps
from loragate.monitoring.rollout.config import CanaryConfig
from loragate.monitoring.rollout.plan import RouteTraffic, plan

MEDIAN_S, SIGMA = 0.6, 0.5
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)  # service/metrics.py
STEPS = [5, 25, 50, 100]
INTERVAL_S = 300
GOOD = {
    "error": 0.01,
    "fallback": 0.0,
    "latency_scale": 1.0,
    "feedback": 0.8,
    "tail_share": 0.0,
    "tail_scale": 1.0,
    "sigma": SIGMA,
}
SCENARIOS = {
    "A/A (canary = stable)": {},
    "5xx 1% -> 4%": {"error": 0.04},
    "fallback 0% -> 3%": {"fallback": 0.03},
    "p95 latency x1.5": {"latency_scale": 1.5},
    "mean feedback 0.8 -> 0.6": {"feedback": 0.6},
    "5xx 1% -> 2% (under min effect)": {"error": 0.02},  # a regression the judge is told does not matter
    "8% of requests x4 slower (tail)": {"tail_share": 0.08, "tail_scale": 4.0},
    "better canary (5xx 0.5%, latency x0.8)": {"error": 0.005, "latency_scale": 0.8},
}


def bucket_probabilities(
    scale: float, tail_share: float = 0.0, tail_scale: float = 1.0, sigma: float = SIGMA
) -> np.ndarray:
    """P(latency in each bucket, +Inf last) for lognormal(MEDIAN_S * scale, SIGMA), with ``tail_share`` of the
    requests ``tail_scale`` times slower still."""

    def cdf(factor: float) -> np.ndarray:
        return norm.cdf((np.log(np.array(BUCKETS)) - math.log(MEDIAN_S * scale * factor)) / sigma)

    mixed = (1 - tail_share) * cdf(1.0) + tail_share * cdf(tail_scale)
    return np.diff(np.concatenate([[0.0], mixed, [1.0]]))


class Traffic:
    """Per-rollout cumulative counts of one variant over the current step (vectorised over rollouts)."""

    def __init__(self, rng: np.random.Generator, rollouts: int, truth: dict, feedback_share: float) -> None:
        self.rng, self.truth, self.feedback_share = rng, truth, feedback_share
        self.probabilities = bucket_probabilities(
            truth["latency_scale"], truth["tail_share"], truth["tail_scale"], truth["sigma"]
        )
        self.reset(np.ones(rollouts, dtype=bool))
        self.rollouts = rollouts

    def reset(self, which: np.ndarray) -> None:
        if not hasattr(self, "n"):
            r = which.size
            self.n, self.errors, self.fallbacks = np.zeros(r), np.zeros(r), np.zeros(r)
            self.buckets = np.zeros((r, len(BUCKETS) + 1))
            self.scores, self.score_sum = np.zeros(r), np.zeros(r)
        for array in (self.n, self.errors, self.fallbacks, self.scores, self.score_sum):
            array[which] = 0
        self.buckets[which] = 0

    def add(self, requests: np.ndarray) -> None:
        rng, t = self.rng, self.truth
        self.n += requests
        self.errors += rng.binomial(requests, t["error"])
        self.fallbacks += rng.binomial(requests, t["fallback"])
        self.buckets += rng.multinomial(requests, self.probabilities)
        scored = rng.binomial(requests, self.feedback_share)
        self.scores += scored
        self.score_sum += rng.binomial(scored, t["feedback"])  # thumbs up (1) / down (0)

    def cumulative(self) -> np.ndarray:
        return np.cumsum(self.buckets, axis=1)  # at BUCKETS..., +Inf


def counts(traffic: "Traffic") -> Counts:
    return Counts(
        n=traffic.n,
        errors=traffic.errors,
        fallbacks=traffic.fallbacks,
        below=traffic.cumulative()[:, :-1],
        feedback_count=traffic.scores,
        feedback_sum=traffic.score_sum,
    )


def statistical_decisions(config: JudgeConfig, canary: Traffic, stable: Traffic, steps: list[float]) -> np.ndarray:
    """monitoring/judge.py's decision for every rollout at once: 2 fail, 1 pass, 0 inconclusive."""
    return judge_many(config, (counts(canary), counts(stable)), BUCKETS, steps=judged_steps(steps))["analysis"]


def observed(canary: Traffic, stable: Traffic, i: int) -> Observed:
    bounds = [*BUCKETS, math.inf]
    return Observed(
        canary_routed=canary.n[i],
        canary_errors=canary.errors[i],
        canary_fallbacks=canary.fallbacks[i],
        stable_routed=stable.n[i],
        stable_errors=stable.errors[i],
        stable_fallbacks=stable.fallbacks[i],
        canary_latency=dict(zip(bounds, canary.cumulative()[i])),
        stable_latency=dict(zip(bounds, stable.cumulative()[i])),
        canary_feedback_sum=canary.score_sum[i],
        canary_feedback_count=canary.scores[i],
        stable_feedback_sum=stable.score_sum[i],
        stable_feedback_count=stable.scores[i],
    )


def histogram_p95(cumulative: np.ndarray) -> np.ndarray:
    """Prometheus' histogram_quantile(0.95) per row of cumulative counts (finite bounds, then +Inf)."""
    bounds = np.array(BUCKETS)
    total = cumulative[:, -1]
    rank = 0.95 * total
    i = np.array([np.searchsorted(row, r, side="left") for row, r in zip(cumulative, rank)])
    in_inf = i >= len(BUCKETS)
    i = np.minimum(i, len(BUCKETS) - 1)
    low_bound = np.where(i > 0, bounds[np.maximum(i - 1, 0)], 0.0)
    rows = np.arange(len(i))
    low_count = np.where(i > 0, cumulative[rows, np.maximum(i - 1, 0)], 0.0)
    width = cumulative[rows, i] - low_count
    value = low_bound + (bounds[i] - low_bound) * np.divide(
        rank - low_count, width, out=np.ones_like(width), where=width > 0
    )
    value = np.where(in_inf, bounds[-1], value)
    return np.where(total > 0, value, np.nan)


def threshold_decisions(
    canary: Traffic,
    stable: Traffic,
    *,
    min_requests: int = 50,
    max_error_increase: float = 0.01,
    max_p95_ratio: float = 1.5,
    floor_s: float = 0.1,
    max_fallback_rate: float = 0.05,
    min_feedback_score: float = 0.7,
    min_feedback: int = 20,
) -> np.ndarray:
    """Today's rule (loragate.monitoring.rollout.judge.judge with its default thresholds), vectorised."""
    routed = canary.n
    error_increase = canary.errors / routed - np.divide(
        stable.errors, stable.n, out=np.zeros_like(stable.n), where=stable.n > 0
    )
    ratio = np.maximum(histogram_p95(canary.cumulative()), floor_s) / np.maximum(
        histogram_p95(stable.cumulative()), floor_s
    )
    feedback = np.divide(
        canary.score_sum, canary.scores, out=np.full_like(routed, np.inf), where=canary.scores >= min_feedback
    )
    fail = (
        (error_increase > max_error_increase)
        | (np.nan_to_num(ratio) > max_p95_ratio)
        | (canary.fallbacks / routed > max_fallback_rate)
        | (feedback < min_feedback_score)
    )
    return np.where(routed < min_requests, 0, np.where(fail, 2, 1))


def simulate(
    name: str,
    truth_change: dict,
    judge_kind: str,
    config: JudgeConfig,
    args,
    seed: int,
    route_rps: float | None = None,
    steps: list[float] = STEPS,
    interval_s: float = INTERVAL_S,
) -> dict:
    """Rollouts of one scenario. ``route_rps``: the canary gets its weight's share of a route of that many
    requests a second (per analysis: rps x INTERVAL_S x weight); else ``--requests`` at every step."""
    rng = np.random.default_rng(seed)
    r = args.rollouts
    good = {**GOOD, "sigma": args.sigma}
    canary = Traffic(rng, r, {**good, **truth_change}, args.feedback_share)
    stable = Traffic(rng, r, good, args.feedback_share)
    step = np.zeros(r, dtype=int)
    holds = np.zeros(r, dtype=int)
    analyses = np.zeros(r, dtype=int)
    outcome = np.array(["progressing"] * r, dtype=object)
    rolled_back_at = np.full(r, -1)
    checked = mismatches = 0
    while (outcome == "progressing").any():
        live = outcome == "progressing"
        weight = np.array([steps[s] for s in step], dtype=float)
        per_analysis = (
            np.rint(route_rps * interval_s * weight / 100).astype(int)
            if route_rps is not None
            else np.full(r, args.requests)
        )
        canary.add(np.where(live, per_analysis, 0))
        stable.add(np.where(live, np.rint(per_analysis * (100 - weight) / weight), 0).astype(int))
        analyses += live
        if judge_kind == "statistical":
            codes = statistical_decisions(config, canary, stable, steps)
            for i in np.flatnonzero(live)[: args.cross_check]:  # the vectorised rule is judge()'s rule
                verdict = judge(config, observed(canary, stable, i), steps=judged_steps(steps))
                checked += 1
                mismatches += {"inconclusive": 0, "pass": 1, "fail": 2}[verdict.decision] != codes[i]
        else:
            codes = threshold_decisions(canary, stable)
        fail, passed, hold = live & (codes == 2), live & (codes == 1), live & (codes == 0)
        outcome[fail] = "rolled_back"
        rolled_back_at[fail] = step[fail]
        following = step + 1
        promote = passed & (
            (following >= len(steps)) | (np.array([*steps, 100])[np.minimum(following, len(steps))] >= 100)
        )
        outcome[promote] = "promoted"
        moved = passed & ~promote
        step[moved] += 1
        holds[moved] = 0
        holds[hold] += 1
        outcome[hold & (holds >= args.max_holds)] = "stalled"
        fresh = moved
        canary.reset(fresh)
        stable.reset(fresh)
    promoted = outcome == "promoted"
    result = {
        "scenario": name,
        "judge": judge_kind,
        "rollouts": r,
        "rolled_back": float(np.mean(outcome == "rolled_back")),
        "caught_before_50": float(np.mean((outcome == "rolled_back") & (rolled_back_at <= 1))),
        "promoted": float(np.mean(promoted)),
        "stalled": float(np.mean(outcome == "stalled")),
        "analyses_to_promote_median": float(np.median(analyses[promoted])) if promoted.any() else None,
        "analyses_to_promote_p90": float(np.percentile(analyses[promoted], 90)) if promoted.any() else None,
        "analyses_median": float(np.median(analyses)),
    }
    if judge_kind == "statistical":
        result["cross_checked"], result["cross_check_mismatches"] = checked, int(mismatches)
    return result


def plan_against_simulation(config: JudgeConfig, args, route_rps: float, seed: int) -> dict:
    """The plan's predicted analyses to promote an A/A canary, next to simulated rollouts on that route."""
    spec = CanaryConfig(
        route="bench",
        stable="stable",
        canary="canary",
        steps=STEPS,
        interval_s=INTERVAL_S,
        max_holds=args.max_holds,
        max_window_s=max(3600, args.max_holds * INTERVAL_S),
        judge=config,
    )
    below = np.cumsum(bucket_probabilities(1.0, sigma=args.sigma))[:-1]
    traffic = RouteTraffic(
        route_rps,
        GOOD["error"],
        GOOD["fallback"],
        dict(zip(BUCKETS, below)),
        feedback_per_request=args.feedback_share,
        feedback_mean=GOOD["feedback"],
        window_s=3600,
    )
    planned = plan(spec, traffic)
    simulated = simulate(f"A/A at {route_rps:g} req/s", {}, "statistical", config, args, seed, route_rps=route_rps)
    median = simulated["analyses_to_promote_median"]
    fixed = []  # each setting the plan suggests, simulated: does the rollout then finish?
    for number, suggestion in enumerate(planned.suggestions):
        changed = CanaryConfig.model_validate({**spec.model_dump(), **suggestion["update"]})
        run = simulate(
            f"A/A at {route_rps:g} req/s with {suggestion['change']}",
            {},
            "statistical",
            changed.judge,
            args,
            seed + 50 + number,
            route_rps=route_rps,
            steps=changed.steps,
            interval_s=changed.interval_s,
        )
        fixed.append(
            {"change": suggestion["change"], "planned_analyses": plan(changed, traffic).analyses, "simulated": run}
        )
    return {
        "route_rps": route_rps,
        "canary_per_analysis_at_first_step": route_rps * INTERVAL_S * STEPS[0] / 100,
        "plan_analyses": planned.analyses,
        "plan_feasible": planned.feasible,
        "plan_steps": [
            {
                "weight": s.weight,
                "samples": s.samples,
                "analyses": s.analyses,
                "slow_analyses": s.slow_analyses,
                "bottleneck": s.bottleneck,
            }
            for s in planned.steps
        ],
        "suggestions": planned.suggestions,
        "simulated": simulated,
        "suggestions_simulated": fixed,
        "ratio": planned.analyses / median if planned.analyses and median else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=500)
    parser.add_argument("--requests", type=int, default=300, help="new canary requests per analysis")
    parser.add_argument("--feedback-share", type=float, default=1.0, help="share of requests that get a score")
    parser.add_argument("--max-holds", type=int, default=12)
    parser.add_argument("--cross-check", type=int, default=5, help="analyses per round re-judged by judge()")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--alpha", type=float, help="judge alpha (default: the judge's)")
    parser.add_argument("--beta", type=float, help="judge beta (default: the judge's)")
    parser.add_argument("--sigma", type=float, default=SIGMA, help="the latency lognormal's sigma (median 0.6 s)")
    parser.add_argument(
        "--plan-rps",
        type=float,
        nargs="*",
        default=[20.0, 6.67, 4.0, 2.67],
        help="route rates (req/s) whose plan is checked against simulated A/A rollouts",
    )
    parser.add_argument("--no-tail", action="store_true", help="without the latency_tail check (the judge before it)")
    for check in ("error_rate", "fallback_rate", "latency", "feedback"):
        parser.add_argument(f"--{check.replace('_', '-')}-effect", type=float, help=f"{check} min_effect")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "canary_judge.json")
    args = parser.parse_args()
    knobs: dict = {k: v for k, v in (("alpha", args.alpha), ("beta", args.beta)) if v is not None}
    for check in ("error_rate", "fallback_rate", "latency", "feedback"):
        effect = getattr(args, f"{check}_effect")
        knobs[check] = {} if effect is None else {"min_effect": effect}
    if args.feedback_share <= 0:
        knobs["feedback"] = None  # the judge's defaults: no feedback check
    if args.no_tail:
        knobs["latency_tail"] = None
    config = JudgeConfig.model_validate(knobs)  # the judge's defaults, feedback switched on
    began = time.perf_counter()
    rows = []
    for index, (name, change) in enumerate(SCENARIOS.items()):
        for kind in ("statistical", "threshold"):
            rows.append(simulate(name, change, kind, config, args, args.seed * 1000 + index))
    tail = "8% of requests x4 slower (tail)"
    blind = simulate(
        tail,
        SCENARIOS[tail],
        "statistical",
        config.model_copy(update={"latency_tail": None}),
        args,
        args.seed * 1000 + list(SCENARIOS).index(tail),
    )
    rows.insert([r["scenario"] for r in rows].index(tail) + 1, {**blind, "judge": "stat., no tail"})
    small = simulate(
        "A/A, small route (40 canary requests per analysis at every step)",
        {},
        "statistical",
        config,
        argparse.Namespace(**{**vars(args), "requests": 40}),
        args.seed * 1000 + 99,
    )
    plans = [
        plan_against_simulation(config, args, rps, args.seed * 1000 + 200 + i) for i, rps in enumerate(args.plan_rps)
    ]
    elapsed = time.perf_counter() - began

    def pct(v):
        return "-" if v is None else f"{100 * v:5.1f}%"

    print(
        f"{args.rollouts} rollouts per row, {args.requests} canary requests per analysis, steps {STEPS}, "
        f"max {args.max_holds} holds per step, feedback on {args.feedback_share:.0%} of requests"
    )
    header = (
        f"{'scenario':<40} {'judge':<14} {'rolled back':>11} {'caught <50%':>11} {'promoted':>9} {'stalled':>8} "
        f"{'analyses (median)':>17} {'to promote (median/p90)':>24}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        to_promote = (
            "-"
            if row["analyses_to_promote_median"] is None
            else f"{row['analyses_to_promote_median']:.0f} / {row['analyses_to_promote_p90']:.0f}"
        )
        print(
            f"{row['scenario']:<40} {row['judge']:<14} {pct(row['rolled_back']):>11} "
            f"{pct(row['caught_before_50']):>11} "
            f"{pct(row['promoted']):>9} {pct(row['stalled']):>8} {row['analyses_median']:>17.0f} {to_promote:>24}"
        )
    stat = {row["scenario"]: row for row in rows if row["judge"] == "statistical"}
    # the statistical rows are cross-checked against judge(); so is the row without the tail check
    targets = {"A/A false rollbacks <= 5%": stat["A/A (canary = stable)"]["rolled_back"] <= 0.05}
    for name in list(SCENARIOS)[1:5]:
        targets[f"{name} caught before 50% >= 90%"] = stat[name]["caught_before_50"] >= 0.90
    targets["8% of requests x4 slower (tail) rolled back >= 90%"] = (
        stat["8% of requests x4 slower (tail)"]["rolled_back"] >= 0.90
    )
    better = "better canary (5xx 0.5%, latency x0.8)"
    targets[f"{better} promoted >= 95%"] = stat[better]["promoted"] >= 0.95
    print(
        f"\n{small['scenario']}: promoted {pct(small['promoted'])}, stalled {pct(small['stalled'])}, "
        f"rolled back {pct(small['rolled_back'])}"
    )
    print(
        f"\nthe plan (monitoring/rollout/plan.py) against simulated A/A rollouts, a route of N req/s, "
        f"an analysis every {INTERVAL_S} s:"
    )
    for row in plans:
        base = row["simulated"]
        print(
            f"  {row['route_rps']:5.2f} req/s ({row['canary_per_analysis_at_first_step']:.0f} canary requests an "
            f"analysis at {STEPS[0]}%): plan {row['plan_analyses']} analyses "
            f"({'feasible' if row['plan_feasible'] else 'CANNOT FINISH'}); simulated median "
            f"{base['analyses_to_promote_median']} (promoted {pct(base['promoted'])}, stalled {pct(base['stalled'])})"
            + (f"; plan / simulated {row['ratio']:.2f}" if row["ratio"] is not None else "")
        )
        for fix in row["suggestions_simulated"]:
            sim = fix["simulated"]
            print(
                f"      feasible with: {fix['change']}: plan {fix['planned_analyses']} analyses; simulated: "
                f"promoted {pct(sim['promoted'])}, stalled {pct(sim['stalled'])}, median "
                f"{sim['analyses_to_promote_median']} analyses"
            )
            targets[f"{row['route_rps']:g} req/s with {fix['change'].split(':')[0]}: simulated stalls <= 15%"] = (
                sim["stalled"] <= 0.15
            )
        if row["plan_feasible"]:  # feasible: about 1 rollout in 10 or fewer stalls
            targets[f"plan within 30% of simulated A/A at {row['route_rps']:g} req/s"] = (
                row["ratio"] is not None and abs(row["ratio"] - 1) <= 0.3
            )
            targets[f"plan feasible at {row['route_rps']:g} req/s: simulated stalls <= 15%"] = base["stalled"] <= 0.15
        else:  # cannot finish: 1 rollout in 10 or more stalls
            targets[f"plan flags {row['route_rps']:g} req/s: simulated stalls >= 10%"] = base["stalled"] >= 0.10
    print()
    for target, met in targets.items():
        print(f"{'met ' if met else 'MISSED'} {target}")
    mismatches = sum(r.get("cross_check_mismatches", 0) for r in rows)
    checked = sum(r.get("cross_checked", 0) for r in rows)
    print(f"vectorised rule vs judge(): {mismatches} mismatches in {checked} analyses; {elapsed:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "settings": {
                    "rollouts": args.rollouts,
                    "requests_per_analysis": args.requests,
                    "steps": STEPS,
                    "max_holds": args.max_holds,
                    "feedback_share": args.feedback_share,
                    "seed": args.seed,
                    "traffic": {**GOOD, "latency_median_s": MEDIAN_S, "latency_sigma": SIGMA},
                    "judge": config.model_dump(),
                },
                "rows": rows,
                "small_route": small,
                "plans": plans,
                "targets": targets,
                "cross_check_mismatches": mismatches,
                "elapsed_s": round(elapsed, 1),
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

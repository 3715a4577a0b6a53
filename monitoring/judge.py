"""The canary judge: tests that know their sample size, valid however often the rollout looks.

Pure (numpy, scipy; no I/O). Each analysis compares the canary with the stable variant over the
step's traffic so far, check by check, and each check answers **pass**, **fail** or
**inconclusive** ("not enough data yet": the step holds, it never passes).

Checks (each a difference canary minus stable, where bigger is worse):

  error_rate     5xx share of the requests routed to each variant
  fallback_rate  share of the requests routed to each variant that the fallback chain served
  latency        the binned latency distributions: at each bucket bound at or above ``floor_s``, the
                 share of the canary's requests slower than it minus the stable's (the worst bound)
  latency_tail   the slowest few percent: at the bucket bounds of the stable's own p95 and p99, the
                 canary's share of slower requests against ``min_ratio`` x the stable's 5 % / 1 %
  feedback       mean feedback score of the stable minus the canary's (scores in ``score_range``)

This module holds the rate and feedback checks and runs every check: ``judge`` (one analysis) and
``judge_many`` (many at once, vectorised). The latency checks are monitoring/latencychecks.py's; the
decision rule (pass, fail, inconclusive), the error levels and the results monitoring/judgeresult.py's;
the checks' settings monitoring/judgeconfig.py's.

The test (monitoring/confseq.py): each variant's share (or scaled mean) gets an always-valid confidence
sequence; the interval of a difference is the canary's interval minus the stable's. A check fails when a
regression of at least its ``min_effect`` is shown, passes when one is ruled out (with ``min_samples``),
and is inconclusive otherwise; the analysis fails if any check fails, passes if every check passes.

Error control (``alpha``, ``beta`` below):

* a canary no worse than the stable is rolled back with probability at most ``alpha`` over the
  whole rollout: the lower bounds use ``alpha / (steps x checks x 2 variants)``, and the latency
  check splits its share again over its bucket bounds (Bonferroni over sequences that are each
  valid at all times);
* a canary worse by at least ``min_effect`` in some check passes a given step with probability at
  most ``beta``: passing needs every check (and every latency bound) to pass, so the upper bounds
  use ``beta / 2`` (canary and stable) without further splitting. The tail check's bounds are chosen
  from the stable's data, so its lower bounds are split over every bound the choice may fall on.

Measured with bench/canary_judge.py (A/A false rollbacks, bad canaries caught before 50 %, the
analyses a good canary needs); the figures are in docs/monitoring.md. Assumes requests in one window are
exchangeable between the two variants (the same traffic mix, split by weight); Prometheus' ``increase()``
extrapolates counts to the window's edges, so counts are real numbers, used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loragate.monitoring.confseq import RATE_PRIOR, SHARE_PRIOR, difference_bounds
from loragate.monitoring.judgeconfig import FeedbackCheckConfig, JudgeConfig, RateCheckConfig
from loragate.monitoring.judgeresult import (
    DECISIONS,
    CheckResult,
    Levels,
    Verdict,
    decide,
    explain,
    percentage_points,
)
from loragate.monitoring.latencychecks import latency_shift, latency_tail, tail_bound_index, tail_decide


# --- the rate and feedback checks ----------------------------------------------------------------------


def compare_rates(
    check: str,
    canary_events: float,
    canary_n: float,
    stable_events: float,
    stable_n: float,
    config: RateCheckConfig,
    levels: Levels,
) -> CheckResult:
    """A share of requests (5xx, fallbacks), canary against stable."""
    estimate, lower, upper = (
        float(x)
        for x in difference_bounds(
            canary_events, canary_n, stable_events, stable_n, levels.fail, levels.pass_, RATE_PRIOR
        )
    )
    decision = DECISIONS[int(decide(estimate, lower, upper, config.min_effect, canary_n, config.min_samples))]
    figures = {
        "canary_rate": canary_events / canary_n if canary_n > 0 else None,
        "canary_events": canary_events,
        "canary_n": canary_n,
        "stable_rate": stable_events / stable_n if stable_n > 0 else None,
        "stable_events": stable_events,
        "stable_n": stable_n,
    }
    line = explain(
        check, decision, estimate, lower, upper, config.min_effect, canary_n, config.min_samples, percentage_points
    )
    line += f" (canary {canary_events:.0f}/{canary_n:.0f}, stable {stable_events:.0f}/{stable_n:.0f})"
    return CheckResult(
        check,
        "difference of shares: Beta-binomial mixture confidence sequences (always valid)",
        decision,
        estimate,
        lower,
        upper,
        config.min_effect,
        config.min_samples,
        canary_n,
        levels.fail,
        levels.pass_,
        figures,
        line,
    )


def compare_feedback(
    canary_sum: float, canary_n: float, stable_sum: float, stable_n: float, config: FeedbackCheckConfig, levels: Levels
) -> CheckResult:
    """Mean feedback score, the stable's minus the canary's (a drop is worse), scores in score_range."""
    low, high = config.score_range
    width = high - low
    figures = {
        "canary_mean": canary_sum / canary_n if canary_n > 0 else None,
        "canary_n": canary_n,
        "stable_mean": stable_sum / stable_n if stable_n > 0 else None,
        "stable_n": stable_n,
    }
    test = "difference of mean scores: Beta-binomial mixture confidence sequences for bounded means (always valid)"
    outside = [
        m
        for m in (figures["canary_mean"], figures["stable_mean"])
        if m is not None and not low - 1e-9 <= m <= high + 1e-9
    ]
    if outside:
        line = f"feedback: mean score {outside[0]:.3g} outside score_range [{low:g}, {high:g}]: not judged"
        return CheckResult.not_judged(
            "feedback", test, config.min_effect, config.min_samples, canary_n, levels, figures, line
        )
    # Scaled to [0, 1]; "stable minus canary" is "canary's (1 - score) minus stable's".
    c_bad, s_bad = canary_n - (canary_sum - low * canary_n) / width, stable_n - (stable_sum - low * stable_n) / width
    estimate, lower, upper = (
        float(x) * width
        for x in difference_bounds(c_bad, canary_n, s_bad, stable_n, levels.fail, levels.pass_, SHARE_PRIOR)
    )
    decision = DECISIONS[int(decide(estimate, lower, upper, config.min_effect, canary_n, config.min_samples))]
    line = explain(
        "feedback drop",
        decision,
        estimate,
        lower,
        upper,
        config.min_effect,
        canary_n,
        config.min_samples,
        lambda v: f"{v:+.3f}",
    )
    if None not in (figures["canary_mean"], figures["stable_mean"]):
        line += (
            f" (mean {figures['canary_mean']:.3f} of {canary_n:.0f} vs {figures['stable_mean']:.3f} of {stable_n:.0f})"
        )
    return CheckResult(
        "feedback",
        test,
        decision,
        estimate,
        lower,
        upper,
        config.min_effect,
        config.min_samples,
        canary_n,
        levels.fail,
        levels.pass_,
        figures,
        line,
    )


# --- one analysis ---------------------------------------------------------------------------------------


@dataclass
class Observed:
    """What the judge needs over one window, per variant (counts may be real: ``increase()``)."""

    canary_routed: float = 0.0  # requests routed to the canary: answered by it + moved to the fallback chain
    canary_errors: float = 0.0
    canary_fallbacks: float = 0.0
    stable_routed: float = 0.0
    stable_errors: float = 0.0
    stable_fallbacks: float = 0.0
    canary_latency: dict[float, float] = field(default_factory=dict)  # bucket upper bound -> cumulative count
    stable_latency: dict[float, float] = field(default_factory=dict)
    canary_feedback_sum: float = 0.0
    canary_feedback_count: float = 0.0
    stable_feedback_sum: float = 0.0
    stable_feedback_count: float = 0.0


def judge(config: JudgeConfig, observed: Observed, *, steps: int) -> Verdict:
    """One analysis of the canary against the stable variant; ``steps``: how many steps the rollout
    analyses (``judged_steps``), over which the rollback risk ``alpha`` is shared."""
    levels = Levels.of(config, steps)
    o = observed
    results = []
    if config.error_rate is not None:
        results.append(
            compare_rates(
                "error_rate",
                o.canary_errors,
                o.canary_routed,
                o.stable_errors,
                o.stable_routed,
                config.error_rate,
                levels,
            )
        )
    if config.fallback_rate is not None:
        results.append(
            compare_rates(
                "fallback_rate",
                o.canary_fallbacks,
                o.canary_routed,
                o.stable_fallbacks,
                o.stable_routed,
                config.fallback_rate,
                levels,
            )
        )
    if config.latency is not None:
        results.append(latency_shift(o.canary_latency, o.stable_latency, config.latency, levels))
    if config.latency_tail is not None:
        results.append(latency_tail(o.canary_latency, o.stable_latency, config.latency_tail, levels))
    if config.feedback is not None:
        results.append(
            compare_feedback(
                o.canary_feedback_sum,
                o.canary_feedback_count,
                o.stable_feedback_sum,
                o.stable_feedback_count,
                config.feedback,
                levels,
            )
        )
    failed = [r for r in results if r.decision == "fail"]
    waiting = [r for r in results if r.decision == "inconclusive"]
    if failed:
        return Verdict("fail", results, "; ".join(r.explanation for r in failed))
    if waiting:
        return Verdict("inconclusive", results, "; ".join(r.explanation for r in waiting))
    return Verdict(
        "pass",
        results,
        f"{o.canary_routed:.0f} canary requests: every check rules out a regression "
        f"that matters ({', '.join(r.check for r in results)})",
    )


# --- many analyses at once (the bench's simulated rollouts, the rollout plan) -------------------------


@dataclass
class Counts:
    """One variant's counts over many analyses at once (arrays over leading axes), for ``judge_many``."""

    n: np.ndarray  # requests routed
    errors: np.ndarray
    fallbacks: np.ndarray
    below: np.ndarray  # (..., len(bounds)): requests at or below each finite bucket bound, cumulative
    feedback_count: np.ndarray
    feedback_sum: np.ndarray


def judge_many(
    config: JudgeConfig, counts: tuple[Counts, Counts], bounds: tuple[float, ...], *, steps: int
) -> dict[str, np.ndarray]:
    """``judge()``'s decisions over arrays of (canary, stable) counts: {check: codes} (2 fail, 1 pass,
    0 inconclusive), and ``"analysis"`` for the whole. The same rules as ``judge()`` (bench/canary_judge.py
    cross-checks them on every run); ``bounds`` are the finite bucket bounds, the same for both variants."""
    canary, stable = counts
    levels = Levels.of(config, steps)
    codes: dict[str, np.ndarray] = {}
    for name, c_k, s_k in (
        ("error_rate", canary.errors, stable.errors),
        ("fallback_rate", canary.fallbacks, stable.fallbacks),
    ):
        spec = getattr(config, name)
        if spec is not None:
            est, low, up = difference_bounds(c_k, canary.n, s_k, stable.n, levels.fail, levels.pass_, RATE_PRIOR)
            codes[name] = decide(est, low, up, spec.min_effect, canary.n, spec.min_samples)
    c_n, s_n = np.asarray(canary.n, dtype=float)[..., None], np.asarray(stable.n, dtype=float)[..., None]
    latency = config.latency
    if latency is not None:
        compared = np.array([b >= latency.floor_s for b in bounds], dtype=bool)
        if not compared.any():
            codes["latency"] = np.zeros(np.shape(canary.n), dtype=int)
        else:
            est, low, up = difference_bounds(
                c_n - canary.below[..., compared],
                c_n,
                s_n - stable.below[..., compared],
                s_n,
                levels.fail / compared.sum(),
                levels.pass_,
                SHARE_PRIOR,
            )
            per_bound = decide(est, low, up, latency.min_effect, c_n, latency.min_samples)
            codes["latency"] = np.where((per_bound == 2).any(-1), 2, np.where((per_bound == 1).all(-1), 1, 0))
    tail = config.latency_tail
    if tail is not None and not any(b >= tail.floor_s for b in bounds):
        codes["latency_tail"] = np.zeros(np.shape(canary.n), dtype=int)
    elif tail is not None:
        compared = np.array([b >= tail.floor_s for b in bounds])
        c_below, s_below = canary.below[..., compared], stable.below[..., compared]
        max_share = np.full(s_below.shape, np.inf)  # the share that matters at each chosen bound; inf: not chosen
        for q, limit in tail.max_shares().items():  # ascending: the higher quantile's bound wins a tie
            index = tail_bound_index(s_below, stable.n, q)
            picked = np.expand_dims(index, -1) == np.arange(s_below.shape[-1])
            max_share = np.where(picked, limit, max_share)
        chosen = np.isfinite(max_share)
        per_bound, *_ = tail_decide(
            c_n - c_below,
            c_n,
            s_n - s_below,
            s_n,
            np.where(chosen, max_share, 2.0),
            tail.min_ratio,
            levels.fail / max(1, compared.sum()),
            levels.pass_,
            tail.min_samples,
        )
        per_bound = np.where(chosen, per_bound, 1)
        codes["latency_tail"] = np.where(
            ~chosen.any(-1), 0, np.where((per_bound == 2).any(-1), 2, np.where((per_bound == 1).all(-1), 1, 0))
        )
    feedback = config.feedback
    if feedback is not None:
        low_score, high_score = feedback.score_range
        width = high_score - low_score

        def bad(c: Counts) -> np.ndarray:  # scaled to [0, 1], "1 - score"
            return c.feedback_count - (c.feedback_sum - low_score * c.feedback_count) / width

        est, low, up = difference_bounds(
            bad(canary),
            canary.feedback_count,
            bad(stable),
            stable.feedback_count,
            levels.fail,
            levels.pass_,
            SHARE_PRIOR,
        )
        codes["feedback"] = decide(
            est * width, low * width, up * width, feedback.min_effect, canary.feedback_count, feedback.min_samples
        )
    every = np.stack(list(codes.values()))
    codes["analysis"] = np.where((every == 2).any(0), 2, np.where((every == 1).all(0), 1, 0))
    return codes

"""The canary judge: tests that know their sample size, valid however often the rollout looks.

Pure (numpy, scipy; no I/O). Each analysis compares the canary with the stable variant over the
step's traffic so far, check by check, and each check answers **pass**, **fail** or
**inconclusive** ("not enough data yet": the step holds, it never passes).

Checks (each a difference canary minus stable, where bigger is worse):

  error_rate     5xx share of the requests routed to each variant
  fallback_rate  share of the requests routed to each variant that the fallback chain served
  latency        the binned latency distributions (``loragate_request_duration_seconds`` buckets):
                 at each bucket bound at or above ``floor_s``, the share of the canary's requests
                 slower than it minus the stable's. The worst bound is the figure. With the
                 gateway's coarse buckets (0.25, 0.5, 1, 2.5 s ...) a p95 read from them by linear
                 interpolation moves far less than the latency does (x1.5 reads as x1.2), while
                 the share of traffic that crossed a bound moves plainly; the p95s are still
                 reported as figures. Requests faster than ``floor_s`` are fast enough whatever the
                 canary does, so a millisecond shift never fails a canary
  latency_tail   the slowest few percent, which ``latency``'s min effect cannot see: at the bucket
                 bounds of the stable's own p95 and p99, the canary's share of slower requests against
                 ``min_ratio`` x the stable's 5 % / 1 % (fail also when shown ``min_ratio`` x the
                 stable's own share there); see ``latency_tail``
  feedback       mean feedback score of the stable minus the canary's (scores in ``score_range``)

The test (monitoring/confseq.py): each variant's share (or scaled mean) gets an always-valid confidence
sequence; the interval of a difference is the canary's interval minus the stable's. The checks' settings
are monitoring/judgeconfig.py's.

Decisions, with ``min_effect`` the smallest regression that matters:

* fail: the interval's lower bound is above 0 (a regression is shown) and the estimate is at
  least ``min_effect`` (it is big enough to matter). A failure may come before ``min_samples``:
  the interval is valid at every sample size.
* pass: the upper bound is below ``min_effect`` (a regression that matters is ruled out), with at
  least ``min_samples`` canary observations.
* otherwise inconclusive. The analysis fails if any check fails, passes if every check passes.

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

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping

import numpy as np

from loragate.monitoring.confseq import RATE_PRIOR, SHARE_PRIOR, difference_bounds, mean_bounds
from loragate.monitoring.judgeconfig import (
    FeedbackCheckConfig,
    JudgeConfig,
    LatencyCheckConfig,
    LatencyTailCheckConfig,
    RateCheckConfig,
)

Decision = Literal["pass", "fail", "inconclusive"]


# --- the decision rule ---------------------------------------------------------------------------


def decide(estimate: Any, lower: Any, upper: Any, min_effect: Any, samples: Any, min_samples: Any) -> np.ndarray:
    """The decision rule, vectorised: 2 fail, 1 pass, 0 inconclusive."""
    fail = (np.asarray(lower) > 0) & (np.asarray(estimate) >= min_effect)
    passed = (np.asarray(upper) < min_effect) & (np.asarray(samples) >= min_samples)
    return np.where(fail, 2, np.where(passed, 1, 0))


DECISIONS: tuple[Decision, Decision, Decision] = ("inconclusive", "pass", "fail")


# --- the levels ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Levels:
    """Per-sequence error levels: lower bounds at ``fail`` (``fail / bounds`` for each latency bound),
    upper bounds at ``pass_``."""

    fail: float
    pass_: float

    @classmethod
    def of(cls, config: JudgeConfig, judged_steps: int) -> "Levels":
        checks = len(config.enabled())
        return cls(config.alpha / (max(1, judged_steps) * checks * 2), config.beta / 2)


def judged_steps(steps: list[float]) -> int:
    """How many steps are analysed: every step below 100 % (a pass at the last promotes), at least one."""
    return max(1, sum(1 for s in steps if s < 100))


# --- results ----------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    check: str
    test: str
    decision: Decision
    estimate: float | None  # canary minus stable (feedback: stable minus canary), worse is bigger
    lower: float | None
    upper: float | None
    min_effect: float
    min_samples: int
    samples: float  # the canary's observations
    alpha_fail: float  # the level of the lower bound (per variant; per bucket bound for latency)
    alpha_pass: float  # the level of the upper bound (per variant)
    figures: dict[str, float | None] = field(default_factory=dict)
    explanation: str = ""

    @classmethod
    def not_judged(
        cls,
        check: str,
        test: str,
        min_effect: float,
        min_samples: int,
        samples: float,
        levels: Levels,
        figures: dict[str, float | None],
        explanation: str,
    ) -> CheckResult:
        """Inconclusive without an estimate or bounds: the data cannot be judged (yet)."""
        return cls(
            check,
            test,
            "inconclusive",
            None,
            None,
            None,
            min_effect,
            min_samples,
            samples,
            levels.fail,
            levels.pass_,
            figures,
            explanation,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: (_finite(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Verdict:
    decision: Decision
    checks: list[CheckResult]
    explanation: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "explanation": self.explanation,
            "checks": {c.check: c.as_dict() for c in self.checks},
        }

    def check(self, name: str) -> CheckResult | None:
        return next((c for c in self.checks if c.check == name), None)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _pp(value: float) -> str:
    return f"{value * 100:+.2f} pp"


def _explain(
    name: str,
    decision: Decision,
    estimate: float,
    lower: float,
    upper: float,
    min_effect: float,
    samples: float,
    min_samples: int,
    fmt: Callable[[float], str],
) -> str:
    interval = f"{fmt(estimate)} [{fmt(lower)}, {fmt(upper)}]"
    if decision == "fail":
        return f"{name} {interval}: a regression (lower bound > 0) of at least {fmt(min_effect).lstrip('+')}: fail"
    if decision == "pass":
        return f"{name} {interval}: upper bound below the min effect {fmt(min_effect).lstrip('+')}: pass"
    if samples < min_samples and upper < min_effect:
        return f"{name} {interval}: {samples:.0f} of {min_samples} samples needed: not enough data yet"
    return f"{name} {interval}: upper bound not below the min effect {fmt(min_effect).lstrip('+')}: not enough data yet"


# --- the checks ----------------------------------------------------------------------------------------


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
    line = _explain(check, decision, estimate, lower, upper, config.min_effect, canary_n, config.min_samples, _pp)
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


def cumulative(buckets: Mapping[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted finite bucket bounds and their cumulative counts, plus the total (the +Inf bucket)."""
    bounds = np.array(sorted(buckets), dtype=float)
    counts = np.array([buckets[b] for b in sorted(buckets)], dtype=float)
    counts = np.maximum.accumulate(np.maximum(counts, 0.0)) if counts.size else counts  # increase() can wobble
    return bounds, counts


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over {upper bound: cumulative count} (with +Inf); None without data."""
    bounds, counts = cumulative(buckets)
    if not counts.size or counts[-1] <= 0 or not math.isinf(bounds[-1]):
        return None
    rank = q * counts[-1]
    i = int(np.searchsorted(counts, rank, side="left"))
    if i >= len(bounds) - 1:
        return float(bounds[-2]) if len(bounds) > 1 else None  # in the +Inf bucket: the highest finite bound
    low_bound = 0.0 if i == 0 else float(bounds[i - 1])
    low_count = 0.0 if i == 0 else float(counts[i - 1])
    width = counts[i] - low_count
    return float(low_bound + (bounds[i] - low_bound) * ((rank - low_count) / width if width > 0 else 1.0))


def latency_shift(
    canary: Mapping[float, float], stable: Mapping[float, float], config: LatencyCheckConfig, levels: Levels
) -> CheckResult:
    """The binned latency distributions: at each bound >= floor_s, slower share canary minus stable."""
    c_bounds, c_counts = cumulative(canary)
    s_bounds, s_counts = cumulative(stable)
    canary_n = float(c_counts[-1]) if c_counts.size and math.isinf(c_bounds[-1]) else 0.0
    stable_n = float(s_counts[-1]) if s_counts.size and math.isinf(s_bounds[-1]) else 0.0
    shared = [b for b in c_bounds if math.isfinite(b) and b >= config.floor_s and b in set(s_bounds)]
    figures: dict[str, float | None] = {
        "canary_n": canary_n,
        "stable_n": stable_n,
        "canary_p95_s": histogram_quantile(0.95, canary),
        "stable_p95_s": histogram_quantile(0.95, stable),
    }
    test = "slower share at each latency bucket bound: Beta-binomial mixture confidence sequences (always valid)"
    if not shared:
        line = f"latency: no bucket bound at or above {config.floor_s:g} s in both variants: not enough data yet"
        return CheckResult.not_judged(
            "latency", test, config.min_effect, config.min_samples, canary_n, levels, figures, line
        )
    bounds = np.array(shared)
    slower_c = canary_n - c_counts[np.searchsorted(c_bounds, bounds)]
    slower_s = stable_n - s_counts[np.searchsorted(s_bounds, bounds)]
    alpha_fail = levels.fail / len(bounds)
    estimate, lower, upper = difference_bounds(
        slower_c, canary_n, slower_s, stable_n, alpha_fail, levels.pass_, SHARE_PRIOR
    )
    codes = decide(estimate, lower, upper, config.min_effect, canary_n, config.min_samples)
    if (codes == 2).any():
        decision: Decision = "fail"
        worst = int(np.argmax(np.where(codes == 2, lower, -np.inf)))
    else:
        worst = int(np.argmax(upper))
        decision = "pass" if (codes == 1).all() else "inconclusive"
    bound = float(bounds[worst])
    figures.update(
        {
            "bound_s": bound,
            "canary_slower_share": float(slower_c[worst] / canary_n) if canary_n > 0 else None,
            "stable_slower_share": float(slower_s[worst] / stable_n) if stable_n > 0 else None,
        }
    )
    line = _explain(
        f"latency share slower than {bound:g} s",
        decision,
        float(estimate[worst]),
        float(lower[worst]),
        float(upper[worst]),
        config.min_effect,
        canary_n,
        config.min_samples,
        _pp,
    )
    p95 = [figures["canary_p95_s"], figures["stable_p95_s"]]
    if None not in p95:
        line += f" (p95 {p95[0]:.3g} s vs {p95[1]:.3g} s)"
    return CheckResult(
        "latency",
        test,
        decision,
        float(estimate[worst]),
        float(lower[worst]),
        float(upper[worst]),
        config.min_effect,
        config.min_samples,
        canary_n,
        alpha_fail,
        levels.pass_,
        figures,
        line,
    )


def tail_bound_index(stable_below: Any, stable_n: Any, q: float) -> np.ndarray:
    """Which compared bound is the stable's ``q``-quantile bound: the first with at least ``q`` of the
    stable's requests at or below it (vectorised over leading axes; ``stable_below[..., j]`` counts the
    stable's requests at or below bound j). -1 where there is none (no data, or the quantile lies
    above every compared bound)."""
    below = np.asarray(stable_below, dtype=float)
    n = np.asarray(stable_n, dtype=float)[..., None]
    reached = (below >= q * n - 1e-9) & (n > 0)
    return np.where(reached.any(axis=-1), np.argmax(reached, axis=-1), -1)


def tail_bounds(
    stable_below: np.ndarray, stable_n: float, config: LatencyTailCheckConfig
) -> dict[int, tuple[float, float]]:
    """The compared bounds each tail quantile picks: {bound index: (quantile, max canary share)}; two
    quantiles on one bound keep the higher quantile (the smaller share)."""
    chosen: dict[int, tuple[float, float]] = {}
    if not stable_below.size or stable_n <= 0:
        return chosen
    for q, limit in config.max_shares().items():  # ascending quantiles: the higher one overwrites
        index = int(tail_bound_index(stable_below, stable_n, q))
        if index >= 0:
            chosen[index] = (q, limit)
    return chosen


def tail_decide(
    slower_c: Any,
    canary_n: Any,
    slower_s: Any,
    stable_n: Any,
    max_share: Any,
    min_ratio: float,
    alpha_fail: Any,
    alpha_pass: Any,
    min_samples: Any,
) -> tuple[np.ndarray, ...]:
    """The tail rule, vectorised: (codes 2 fail / 1 pass / 0 inconclusive, canary share, its lower and
    upper bound, the lower bound of canary minus stable)."""
    low, _ = mean_bounds(slower_c, canary_n, alpha_fail, RATE_PRIOR)
    _, stable_high = mean_bounds(slower_s, stable_n, alpha_fail, RATE_PRIOR)
    _, high = mean_bounds(slower_c, canary_n, alpha_pass, RATE_PRIOR)
    shown = low - stable_high
    n = np.asarray(canary_n, dtype=float)
    share = np.divide(slower_c, n, out=np.zeros(np.broadcast(slower_c, n).shape), where=n > 0)
    # worse than the stable, and either above the share that matters or shown min_ratio x the stable's own share
    fail = (shown > 0) & ((share >= max_share) | (low > min_ratio * stable_high))
    passed = (high < max_share) & (n >= min_samples)
    return np.where(fail, 2, np.where(passed, 1, 0)), share, low, high, shown


def latency_tail(
    canary: Mapping[float, float], stable: Mapping[float, float], config: LatencyTailCheckConfig, levels: Levels
) -> CheckResult:
    """The slowest few percent: the canary's share of requests slower than the stable's own high-quantile
    bucket bounds (p95, p99), against ``min_ratio`` x the share the stable has there (``1 - q``).

    At the stable's q bound B (the first bound with at least q of the stable's requests at or below it):
    fail when the canary's share slower than B is shown above the stable's (the lower bound of the
    difference > 0) and is at least ``min_ratio x (1 - q)`` (2 % at p99: the canary's p98 is slower than
    the stable's p99); pass when the canary's share's upper bound is below ``min_ratio x (1 - q)``. The
    bounds are chosen from the stable's data, so the rollback risk is split over every bound the choice
    could fall on (each bound >= floor_s): the guarantee holds whichever bound each analysis picks."""
    c_bounds, c_counts = cumulative(canary)
    s_bounds, s_counts = cumulative(stable)
    canary_n = float(c_counts[-1]) if c_counts.size and math.isinf(c_bounds[-1]) else 0.0
    stable_n = float(s_counts[-1]) if s_counts.size and math.isinf(s_bounds[-1]) else 0.0
    shared = np.array([b for b in c_bounds if math.isfinite(b) and b >= config.floor_s and b in set(s_bounds)])
    figures: dict[str, float | None] = {
        "canary_n": canary_n,
        "stable_n": stable_n,
        "canary_p99_s": histogram_quantile(0.99, canary),
        "stable_p99_s": histogram_quantile(0.99, stable),
    }
    test = (
        "share slower than the stable's p95/p99 bucket bounds against min_ratio x (1 - q): Beta-binomial "
        "mixture confidence sequences (always valid)"
    )
    chosen = tail_bounds(s_counts[np.searchsorted(s_bounds, shared)] if shared.size else np.zeros(0), stable_n, config)
    if not chosen:
        line = (
            f"latency tail: no bucket bound at or above {config.floor_s:g} s holds the stable's "
            f"p{100 * config.quantiles[0]:g}: not enough data yet"
        )
        return CheckResult.not_judged(
            "latency_tail", test, min(config.max_shares().values()), config.min_samples, canary_n, levels, figures, line
        )
    indices = np.array(sorted(chosen))
    bounds = shared[indices]
    max_share = np.array([chosen[i][1] for i in indices])
    slower_c = canary_n - c_counts[np.searchsorted(c_bounds, bounds)]
    slower_s = stable_n - s_counts[np.searchsorted(s_bounds, bounds)]
    alpha_fail = levels.fail / len(shared)
    codes, share, low, high, shown = tail_decide(
        slower_c,
        canary_n,
        slower_s,
        stable_n,
        max_share,
        config.min_ratio,
        alpha_fail,
        levels.pass_,
        config.min_samples,
    )
    if (codes == 2).any():
        decision: Decision = "fail"
        worst = int(np.argmax(np.where(codes == 2, share - max_share, -np.inf)))
    else:
        worst = int(np.argmax(high - max_share))
        decision = "pass" if (codes == 1).all() else "inconclusive"
    bound, limit, q = float(bounds[worst]), float(max_share[worst]), chosen[int(indices[worst])][0]
    s_share = float(slower_s[worst] / stable_n)
    figures.update(
        {
            "bound_s": bound,
            "quantile": q,
            "canary_slower_share": float(share[worst]),
            "stable_slower_share": s_share,
            "difference_lower": float(shown[worst]),
            "ratio": float(share[worst]) / s_share if s_share > 0 else None,
        }
    )
    head = (
        f"latency tail: {100 * share[worst]:.2f}% [{100 * low[worst]:.2f}%, {100 * high[worst]:.2f}%] of the "
        f"canary slower than {bound:g} s, the stable's p{100 * q:g} bound (stable {100 * s_share:.2f}%)"
    )
    if decision == "fail":
        if share[worst] >= limit:
            line = f"{head}: shown above the stable's and at least {100 * limit:g}%: fail"
        else:
            line = f"{head}: shown above {config.min_ratio:g}x the stable's share: fail"
    elif decision == "pass":
        line = f"{head}: upper bound below {100 * limit:g}%: pass"
    elif canary_n < config.min_samples and high[worst] < limit:
        line = f"{head}: {canary_n:.0f} of {config.min_samples} samples needed: not enough data yet"
    else:
        line = f"{head}: upper bound not below {100 * limit:g}%: not enough data yet"
    p99 = [figures["canary_p99_s"], figures["stable_p99_s"]]
    if None not in p99:
        line += f" (p99 {p99[0]:.3g} s vs {p99[1]:.3g} s)"
    return CheckResult(
        "latency_tail",
        test,
        decision,
        float(share[worst]),
        float(low[worst]),
        float(high[worst]),
        limit,
        config.min_samples,
        canary_n,
        alpha_fail,
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
    line = _explain(
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

"""The canary judge's latency checks, read from the request-duration histograms (Prometheus' cumulative
``loragate_request_duration_seconds`` buckets, {upper bound: count}, with +Inf); monitoring/judge.py runs them.

Pure (numpy, scipy; no I/O).

  latency        at each bucket bound at or above ``floor_s``, the share of the canary's requests
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

Both split their share of the rollback risk (``Levels.fail``) over the bucket bounds they compare; the
vectorised parts (``tail_bound_index``, ``tail_decide``) also serve ``judge_many``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from loragate.monitoring.confseq import RATE_PRIOR, SHARE_PRIOR, difference_bounds, mean_bounds
from loragate.monitoring.judgeconfig import LatencyCheckConfig, LatencyTailCheckConfig
from loragate.monitoring.judgeresult import CheckResult, Decision, Levels, decide, explain, percentage_points


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
    line = explain(
        f"latency share slower than {bound:g} s",
        decision,
        float(estimate[worst]),
        float(lower[worst]),
        float(upper[worst]),
        config.min_effect,
        canary_n,
        config.min_samples,
        percentage_points,
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

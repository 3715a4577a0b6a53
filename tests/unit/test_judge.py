"""The canary judge (monitoring/judge.py, latencychecks.py, judgeresult.py): decisions that know their sample size.

The rates over whole simulated rollouts are measured by bench/canary_judge.py; these are the
fast checks of each rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.special import ndtr  # the standard normal CDF (scipy.stats.norm.cdf), without importing scipy.stats

from loragate.monitoring.confseq import mean_bounds
from loragate.monitoring.judge import Counts, Observed, judge, judge_many
from loragate.monitoring.judgeconfig import FeedbackCheckConfig, JudgeConfig
from loragate.monitoring.judgeresult import Levels
from loragate.monitoring.latencychecks import histogram_quantile, tail_bound_index, tail_decide

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)  # the gateway's buckets


def lognormal_buckets(
    n: float, median_s: float, sigma: float = 0.5, tail: tuple[float, float] = (0.0, 1.0)
) -> dict[float, float]:
    """Expected cumulative bucket counts of n lognormal latencies (the +Inf bucket included); ``tail``:
    (share, factor) of the requests that are ``factor`` times slower."""
    share, factor = tail

    def cdf(median: float) -> np.ndarray:
        return ndtr((np.log(BOUNDS) - math.log(median)) / sigma)

    mixed = (1 - share) * cdf(median_s) + share * cdf(median_s * factor)
    return {**{b: float(n * c) for b, c in zip(BOUNDS, mixed)}, math.inf: float(n)}


def traffic(
    canary_n: float, stable_n: float, *, errors=(0.01, 0.01), fallbacks=(0.0, 0.0), medians=(0.6, 0.6)
) -> Observed:
    return Observed(
        canary_routed=canary_n,
        canary_errors=round(canary_n * errors[0]),
        canary_fallbacks=round(canary_n * fallbacks[0]),
        stable_routed=stable_n,
        stable_errors=round(stable_n * errors[1]),
        stable_fallbacks=round(stable_n * fallbacks[1]),
        canary_latency=lognormal_buckets(canary_n, medians[0]),
        stable_latency=lognormal_buckets(stable_n, medians[1]),
    )


def decisions(verdict) -> dict[str, str]:
    return {c.check: c.decision for c in verdict.checks}


def test_a_zero_error_canary_is_not_passed_on_a_tiny_sample():
    """0 errors in 20 requests is no evidence of a low error rate: the interval says so."""
    config = JudgeConfig(error_rate={"min_effect": 0.02, "min_samples": 1})
    verdict = judge(config, Observed(canary_routed=20, stable_routed=2000, stable_errors=20), steps=3)
    error = verdict.check("error_rate")
    assert error.decision == "inconclusive" and verdict.decision == "inconclusive"
    assert error.estimate == pytest.approx(-0.01) and error.upper > 0.1  # 0 of 20 allows a rate above 10 %
    assert "not enough data yet" in error.explanation
    # Below min_samples it never passes, even when the interval alone would allow it.
    many = Observed(canary_routed=5000, stable_routed=50_000, stable_errors=500, canary_errors=50)
    held = judge(JudgeConfig(error_rate={"min_samples": 10_000}, fallback_rate=None, latency=None), many, steps=3)
    assert held.decision == "inconclusive" and "5000 of 10000 samples needed" in held.explanation


def test_a_clearly_bad_canary_fails_and_says_why():
    verdict = judge(JudgeConfig(), traffic(600, 5700, errors=(0.06, 0.01)), steps=3)
    error = verdict.check("error_rate")
    assert verdict.decision == "fail" and error.decision == "fail"
    assert error.estimate == pytest.approx(0.05, abs=1e-3) and 0 < error.lower < error.estimate < error.upper
    assert error.figures["canary_rate"] == pytest.approx(0.06) and error.figures["stable_n"] == 5700
    assert "error_rate +5.00 pp" in error.explanation and "fail" in error.explanation
    assert error.test.startswith("difference of shares") and error.min_effect == 0.02
    # A canary that fails every request is hidden from clients by the fallback: caught at once,
    # before min_samples (the interval is valid at every sample size).
    hidden = judge(JudgeConfig(), traffic(30, 600, fallbacks=(1.0, 0.0)), steps=3)
    assert decisions(hidden)["fallback_rate"] == "fail" and hidden.decision == "fail"


def test_a_canary_like_the_stable_passes_with_enough_data():
    verdict = judge(JudgeConfig(), traffic(3000, 10_000), steps=3)
    assert decisions(verdict) == {
        "error_rate": "pass",
        "fallback_rate": "pass",
        "latency": "pass",
        "latency_tail": "pass",
    }
    assert verdict.decision == "pass" and "every check rules out a regression" in verdict.explanation
    # ... and not with little data: the same shares from 100 requests hold.
    assert judge(JudgeConfig(), traffic(100, 1000), steps=3).decision == "inconclusive"


def test_latency_compares_the_bucketed_distributions():
    slower = judge(JudgeConfig(), traffic(600, 5700, medians=(0.9, 0.6)), steps=3).check("latency")  # x1.5
    assert slower.decision == "fail" and slower.figures["bound_s"] == 1.0  # the bound most traffic crossed
    assert slower.figures["canary_slower_share"] > slower.figures["stable_slower_share"] + 0.2
    assert slower.lower > slower.min_effect == 0.1
    assert slower.figures["canary_p95_s"] > slower.figures["stable_p95_s"]
    assert "latency share slower than 1 s" in slower.explanation
    # The latency check splits its rollback risk over the bucket bounds it compares (0.25 s and up).
    assert slower.alpha_fail == pytest.approx(Levels.of(JudgeConfig(), 3).fail / 10)
    # Milliseconds under the floor (0.25 s) are never a regression: 4 ms vs 1 ms passes.
    fast = judge(JudgeConfig(), traffic(3000, 10_000, medians=(0.004, 0.001)), steps=3).check("latency")
    assert fast.decision == "pass" and fast.estimate == pytest.approx(0.0, abs=1e-9)
    # No buckets at all (no answered requests): nothing to compare, never a pass.
    empty = judge(JudgeConfig(), Observed(canary_routed=500, stable_routed=500), steps=3).check("latency")
    assert empty.decision == "inconclusive"


def test_a_slow_tail_fails_the_tail_check_where_the_whole_distribution_check_cannot_see_it():
    """8 % of the canary's requests 4x slower (p99 ~2 s -> ~4 s): the shares above each bound move by
    at most ~4 points (under latency's 10-point min effect), but above the stable's p99 bound (2.5 s)
    the canary has ~3.9 % of its requests against the stable's 0.2 %."""
    slow = Observed(
        canary_routed=300,
        stable_routed=5700,
        canary_latency=lognormal_buckets(300, 0.6, tail=(0.08, 4)),
        stable_latency=lognormal_buckets(5700, 0.6),
    )
    verdict = judge(JudgeConfig(), slow, steps=3)
    tail = verdict.check("latency_tail")
    assert verdict.decision == "fail" and tail.decision == "fail"
    assert verdict.check("latency").decision != "fail"
    assert tail.figures["bound_s"] == 2.5 and tail.figures["quantile"] == 0.99
    assert tail.estimate == pytest.approx(0.039, abs=0.003) and tail.figures["stable_slower_share"] < 0.003
    assert "the stable's p99 bound" in tail.explanation and "fail" in tail.explanation
    # Without the tail check (the judge before it), the same canary is only held.
    blind = judge(JudgeConfig(latency_tail=None), slow, steps=3)
    assert blind.decision == "inconclusive"


def test_the_tail_check_passes_a_canary_like_the_stable_and_needs_samples_to_do_so():
    config = JudgeConfig()
    same = Observed(
        canary_routed=2000,
        stable_routed=6000,
        canary_latency=lognormal_buckets(2000, 0.6),
        stable_latency=lognormal_buckets(6000, 0.6),
    )
    tail = judge(config, same, steps=3).check("latency_tail")
    assert tail.decision == "pass" and tail.upper < tail.min_effect == pytest.approx(0.02)
    few = Observed(
        canary_routed=150,
        stable_routed=6000,
        canary_latency=lognormal_buckets(150, 0.6),
        stable_latency=lognormal_buckets(6000, 0.6),
    )
    assert judge(config, few, steps=3).check("latency_tail").decision == "inconclusive"
    # A canary faster in its tail is no regression however much data there is.
    faster = Observed(
        canary_routed=3000,
        stable_routed=3000,
        canary_latency=lognormal_buckets(3000, 0.4),
        stable_latency=lognormal_buckets(3000, 0.6, tail=(0.05, 4)),
    )
    assert judge(config, faster, steps=3).check("latency_tail").decision == "pass"
    # No stable data: no bound to compare at.
    alone = Observed(canary_routed=500, canary_latency=lognormal_buckets(500, 0.6))
    assert judge(config, alone, steps=3).check("latency_tail").decision == "inconclusive"


def test_the_tail_bound_is_the_stables_own_quantile_bound():
    below = np.array([[10, 50, 94, 96, 100], [10, 50, 94, 96, 99], [0, 0, 0, 0, 0]], dtype=float)
    n = np.array([100, 100, 0])
    assert tail_bound_index(below, n, 0.95).tolist() == [3, 3, -1]
    assert tail_bound_index(below, n, 0.99).tolist() == [4, 4, -1]
    assert tail_bound_index(below[:1], np.array([110]), 0.99).tolist() == [-1]  # beyond the last bound: none


def test_the_tail_rule_keeps_its_rollback_risk_however_often_it_looks():
    """A/A at a heavy tail: 2000 rollouts of one step, 25 looks each, the bound re-chosen from the stable's
    data at every look; the tail rule at level alpha (split over the 10 bounds it may choose) rolls back
    at most alpha of them."""
    rng = np.random.default_rng(3)
    rollouts, looks, alpha = 2000, 25, 0.05
    probabilities = np.diff(np.concatenate([[0.0], np.array(list(lognormal_buckets(1, 0.6, sigma=0.9).values()))]))
    compared = np.array([b >= 0.25 for b in BOUNDS])
    canary, stable = np.zeros((rollouts, len(probabilities))), np.zeros((rollouts, len(probabilities)))
    failed = np.zeros(rollouts, dtype=bool)
    for _ in range(looks):
        canary += rng.multinomial(60, probabilities, size=rollouts)
        stable += rng.multinomial(60, probabilities, size=rollouts)
        c_below, s_below = np.cumsum(canary, 1)[:, :-1][:, compared], np.cumsum(stable, 1)[:, :-1][:, compared]
        c_n, s_n = canary.sum(1), stable.sum(1)
        for q, limit in ((0.95, 0.1), (0.99, 0.02)):
            index = tail_bound_index(s_below, s_n, q)
            rows = np.flatnonzero(index >= 0)
            codes, *_ = tail_decide(
                c_n[rows] - c_below[rows, index[rows]],
                c_n[rows],
                s_n[rows] - s_below[rows, index[rows]],
                s_n[rows],
                limit,
                2.0,
                alpha / compared.sum(),
                0.05,
                200,
            )
            failed[rows[codes == 2]] = True
    assert failed.mean() <= alpha


def test_a_real_regression_smaller_than_the_min_effect_does_not_fail():
    """1.0 % -> 1.4 % errors is real (the interval is above 0) but below the 2-point min effect."""
    verdict = judge(JudgeConfig(latency=None), traffic(200_000, 200_000, errors=(0.014, 0.010)), steps=3)
    error = verdict.check("error_rate")
    assert error.lower > 0 and error.upper < 0.02 and error.decision == "pass"
    strict = JudgeConfig(error_rate={"min_effect": 0.002}, latency=None)
    assert judge(strict, traffic(200_000, 200_000, errors=(0.014, 0.010)), steps=3).decision == "fail"


def test_feedback_drop_with_an_interval():
    config = JudgeConfig(feedback=FeedbackCheckConfig(min_effect=0.1, min_samples=100))
    base = traffic(3000, 10_000)
    drop = Observed(
        **{
            **base.__dict__,
            "canary_feedback_sum": 180,
            "canary_feedback_count": 300,
            "stable_feedback_sum": 800,
            "stable_feedback_count": 1000,
        }
    )  # 0.6 vs 0.8
    feedback = judge(config, drop, steps=3).check("feedback")
    assert feedback.decision == "fail" and feedback.estimate == pytest.approx(0.2)
    assert 0 < feedback.lower < 0.2 < feedback.upper
    same = Observed(**{**drop.__dict__, "canary_feedback_sum": 1200, "canary_feedback_count": 1500})
    assert judge(config, same, steps=3).check("feedback").decision == "pass"
    assert (
        judge(config, Observed(**{**same.__dict__, "canary_feedback_count": 50}), steps=3).check("feedback").decision
        == "inconclusive"
    )  # 50 scores: under min_samples
    stars = Observed(
        **{
            **drop.__dict__,
            "canary_feedback_sum": 6000,
            "canary_feedback_count": 1500,
            "stable_feedback_sum": 8000,
            "stable_feedback_count": 2000,
        }
    )  # 4 stars each
    outside = judge(config, stars, steps=3).check("feedback")
    assert outside.decision == "inconclusive" and "outside score_range" in outside.explanation
    five = JudgeConfig(feedback={"min_effect": 0.5, "score_range": [1, 5]})  # 1-5 stars: min effect in stars
    assert judge(five, stars, steps=3).check("feedback").decision == "pass"


def test_the_bounds_stay_valid_however_often_one_looks():
    """Ville's inequality: over 30 looks at a growing sample the true rate leaves the interval in at
    most alpha of the sequences (here far fewer: the mixture bound is conservative)."""
    rng = np.random.default_rng(7)
    sequences, looks, per_look, rate, alpha = 4000, 30, 50, 0.02, 0.05
    successes = np.cumsum(rng.binomial(per_look, rate, size=(looks, sequences)), axis=0)
    ever_out = np.zeros(sequences, dtype=bool)
    for look in range(looks):
        lower, upper = mean_bounds(successes[look], per_look * (look + 1), alpha / 2)
        ever_out |= (lower > rate) | (upper < rate)
    assert ever_out.mean() <= alpha
    # One-look-at-a-time Wald intervals at the same level are not: they leave far more often.
    wald_out = np.zeros(sequences, dtype=bool)
    for look in range(looks):
        n = per_look * (look + 1)
        p = successes[look] / n
        half = 1.96 * np.sqrt(np.maximum(p * (1 - p), 1e-12) / n)
        wald_out |= (p - half > rate) | (p + half < rate)
    assert wald_out.mean() > 2 * alpha


def test_bounds_at_the_edges():
    lower, upper = mean_bounds([0, 20, 0], [20, 20, 0], 0.05)
    assert lower[0] == 0 and 0.1 < upper[0] < 0.4  # no errors in 20: an upper bound, not 0
    assert upper[1] == 1 and 0.6 < lower[1] < 0.9
    assert (lower[2], upper[2]) == (0, 1)  # nothing observed: nothing known


def test_histogram_quantile_follows_prometheus():
    buckets = {0.1: 50, 0.5: 90, 1.0: 100, math.inf: 100}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.95, {0.1: 10, math.inf: 20}) == 0.1  # in the +Inf bucket: the top bound
    assert histogram_quantile(0.95, {math.inf: 0}) is None


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"error_rate": {"min_effect": 0}}, "min_effect"),
        ({"latency": {"min_samples": 0}}, "min_samples"),
        ({"feedback": {"score_range": [1, 1]}}, "score_range must be"),
        ({"feedback": {"min_effect": 2}}, "below the score range's width"),
        ({"error_rate": None, "fallback_rate": None, "latency": None, "latency_tail": None}, "at least one check"),
        ({"latency": {"floor": 0.1}}, "floor"),
    ],
)
def test_bad_judge_settings_are_refused_with_the_field_named(bad, message):
    with pytest.raises(ValidationError, match=message):
        JudgeConfig.model_validate(bad)


def test_judge_many_is_judges_rule():
    """judge_many (the bench's simulated rollouts, the rollout plan) decides as judge() does, check by check,
    on random counts around the decision boundaries (feedback on, several sample sizes and tails)."""
    rng = np.random.default_rng(11)
    config = JudgeConfig(feedback={"min_effect": 0.1, "min_samples": 50})
    rows = 60
    c_n, s_n = rng.integers(20, 3000, rows).astype(float), rng.integers(20, 20000, rows).astype(float)
    probabilities = np.diff(np.concatenate([[0.0], np.array(list(lognormal_buckets(1, 0.6).values()))]))
    slow = np.diff(np.concatenate([[0.0], np.array(list(lognormal_buckets(1, 0.6, tail=(0.1, 4)).values()))]))
    c_buckets = np.array(
        [rng.multinomial(n, slow if i % 3 == 0 else probabilities) for i, n in enumerate(c_n.astype(int))]
    )
    s_buckets = np.array([rng.multinomial(n, probabilities) for n in s_n.astype(int)])
    c_errors = rng.binomial(c_n.astype(int), rng.choice([0.01, 0.04], rows))
    s_errors = rng.binomial(s_n.astype(int), 0.01)
    c_scores, s_scores = rng.binomial(c_n.astype(int), 0.5), rng.binomial(s_n.astype(int), 0.5)
    c_sum, s_sum = rng.binomial(c_scores, rng.choice([0.8, 0.65], rows)), rng.binomial(s_scores, 0.8)
    canary = Counts(c_n, c_errors, np.zeros(rows), np.cumsum(c_buckets, 1)[:, :-1], c_scores, c_sum)
    stable = Counts(s_n, s_errors, np.zeros(rows), np.cumsum(s_buckets, 1)[:, :-1], s_scores, s_sum)
    many = judge_many(config, (canary, stable), BOUNDS, steps=3)
    codes = {"inconclusive": 0, "pass": 1, "fail": 2}
    seen = set()
    for i in range(rows):
        bounds = [*BOUNDS, math.inf]
        verdict = judge(
            config,
            Observed(
                canary_routed=c_n[i],
                canary_errors=c_errors[i],
                stable_routed=s_n[i],
                stable_errors=s_errors[i],
                canary_latency=dict(zip(bounds, np.cumsum(c_buckets[i]))),
                stable_latency=dict(zip(bounds, np.cumsum(s_buckets[i]))),
                canary_feedback_sum=c_sum[i],
                canary_feedback_count=c_scores[i],
                stable_feedback_sum=s_sum[i],
                stable_feedback_count=s_scores[i],
            ),
            steps=3,
        )
        for check in verdict.checks:
            assert codes[check.decision] == many[check.check][i], (i, check.check, check.explanation)
            seen.add((check.check, check.decision))
        assert codes[verdict.decision] == many["analysis"][i]
    assert {("latency_tail", "fail"), ("latency_tail", "pass"), ("error_rate", "fail")} <= seen

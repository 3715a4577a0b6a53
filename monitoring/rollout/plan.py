"""A rollout's plan before it starts: how many requests and how much time each step needs to pass.

From the route's recent traffic (its request rate, 5xx and fallback shares, latency histogram and
feedback, read from Prometheus), the plan asks the judge itself (``judge_many``) when an A/A canary
(one exactly like the stable) would pass each check at each step, with the rollout's min effects,
min samples and alpha: the expected counts at ``n`` canary requests (and ``n x (100 - w) / w`` stable
ones at weight ``w``) are judged for a grid of ``n``, and the first ``n`` where every check passes is
the step's need. A step that needs more than ``max_holds`` analyses (in a slow rollout) stalls
before it passes: the rollout cannot finish, and the plan says which setting would let it (a
longer interval, larger min effects, fewer steps).

The time to promote is the median rollout's; feasibility is judged on a slow one (the canary
``SLOW_Z`` standard deviations unlucky in every figure at once: about 1 rollout in 10 needs more;
bench/canary_judge.py measures both against simulated rollouts), and a canary that is worse or
better than the stable needs a different number (a clear regression fails sooner). Pure: the
traffic comes in as ``RouteTraffic``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from itertools import combinations
from typing import Any

import numpy as np

from loragate.monitoring.judge import Counts, Observed, judge_many
from loragate.monitoring.judgeconfig import CHECKS, JudgeConfig
from loragate.monitoring.judgeresult import judged_steps
from loragate.monitoring.rollout.config import CanaryConfig

COARSE = np.unique(np.rint(np.geomspace(1, 1e7, 100)))  # canary requests tried first, ~18 % apart ...
FINE = 16  # ... then this many more just below each check's first pass (~1 % apart)
SLOW_Z = 1.28  # the slow rollout the plan must fit: the canary this many standard deviations unlucky (~1 in 10)
EFFECT_FACTORS = (1.5, 2.0, 3.0, 5.0)


@dataclass
class RouteTraffic:
    """What the route carried lately (all its variants): rate, shares, latency shape, feedback."""

    requests_per_s: float
    error_rate: float = 0.0
    fallback_rate: float = 0.0
    latency: dict[float, float] = field(default_factory=dict)  # finite bucket bound -> share at or below it
    feedback_per_request: float = 0.0
    feedback_mean: float | None = None
    window_s: float = 0.0

    @classmethod
    def from_observed(cls, observed: Observed, window_s: float) -> "RouteTraffic":
        """From a whole-route measurement over ``window_s`` (the ``stable_*`` fields of ``observed``)."""
        o, n = observed, observed.stable_routed
        total = o.stable_latency.get(math.inf, 0.0)
        latency = {b: c / total for b, c in sorted(o.stable_latency.items()) if math.isfinite(b)} if total > 0 else {}
        return cls(
            requests_per_s=n / window_s if window_s > 0 else 0.0,
            error_rate=o.stable_errors / n if n > 0 else 0.0,
            fallback_rate=o.stable_fallbacks / n if n > 0 else 0.0,
            latency=latency,
            feedback_per_request=o.stable_feedback_count / n if n > 0 else 0.0,
            feedback_mean=(o.stable_feedback_sum / o.stable_feedback_count if o.stable_feedback_count > 0 else None),
            window_s=window_s,
        )

    def expected(self, n: np.ndarray) -> Counts:
        """The expected counts of ``n`` requests of a variant that behaves like the route."""
        n = np.asarray(n, dtype=float)
        shares = np.array(list(self.latency.values()), dtype=float)
        scored = n * self.feedback_per_request
        return Counts(
            n=n,
            errors=n * self.error_rate,
            fallbacks=n * self.fallback_rate,
            below=n[..., None] * shares,
            feedback_count=scored,
            feedback_sum=scored * (self.feedback_mean or 0.0),
        )

    def unlucky(
        self, n: np.ndarray, stable_n: np.ndarray, z: float, score_range: tuple[float, float] = (0.0, 1.0)
    ) -> Counts:
        """The counts of an A/A canary ``z`` standard deviations of its difference with the stable (of
        ``stable_n`` requests) worse than expected in every figure at once: what a slow rollout sees."""
        counts = self.expected(n)
        n = counts.n
        reach = n + n**2 / np.maximum(np.asarray(stable_n, dtype=float), 1.0)  # n^2 x Var(share difference) / p(1-p)

        def worse(count: np.ndarray, share: Any, total: np.ndarray, sign: float) -> np.ndarray:
            share = np.asarray(share, dtype=float)
            spread = z * np.sqrt(share * (1 - share) * (reach[..., None] if share.ndim else reach))
            return np.clip(count + sign * spread, 0, total)

        shares = np.array(list(self.latency.values()), dtype=float)
        low, high = score_range
        mean = self.feedback_mean if self.feedback_mean is not None else low
        scaled = min(max((mean - low) / (high - low), 0.0), 1.0)
        scored = counts.feedback_count
        spread = (
            z
            * np.sqrt(
                scaled
                * (1 - scaled)
                * (scored + scored**2 / np.maximum(np.asarray(stable_n, dtype=float) * self.feedback_per_request, 1.0))
            )
            * (high - low)
        )
        return Counts(
            n=n,
            errors=worse(counts.errors, self.error_rate, n, 1.0),
            fallbacks=worse(counts.fallbacks, self.fallback_rate, n, 1.0),
            below=worse(counts.below, shares, n[..., None], -1.0) if shares.size else counts.below,
            feedback_count=scored,
            feedback_sum=np.clip(counts.feedback_sum - spread, low * scored, high * scored),
        )


@dataclass
class StepPlan:
    weight: float
    canary_per_analysis: float
    samples: float | None  # canary requests for every check to pass, median rollout (None: not within 10 million)
    analyses: int | None  # analyses (intervals) for that
    seconds: float | None
    bottleneck: str | None  # the check that needs the most
    per_check: dict[str, float | None]  # canary requests each check needs
    slow_samples: float | None  # the same for a slow rollout (~1 in 10 needs more)
    slow_analyses: int | None


@dataclass
class Plan:
    route: str
    canary: str
    feasible: bool  # every step passes within max_holds analyses, for a slow A/A rollout (~1 in 10 is slower)
    steps: list[StepPlan]
    analyses: int | None  # to promote, all steps
    promote_s: float | None
    interval_s: float
    max_holds: int
    traffic: dict[str, Any]
    # Each a change of one setting that makes the rollout feasible: {"change": what to set, "update": the
    # CanaryConfig fields that change, JSON (CanaryConfig.model_validate({**spec.model_dump(), **update}))}
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        t = self.traffic
        head = (
            f"{self.route}: plan for {self.canary}: route traffic {t['requests_per_s']:.3g} req/s "
            f"(5xx {100 * t['error_rate']:.2f}%, fallbacks {100 * t['fallback_rate']:.2f}%, over "
            f"{t['window_s']:.0f} s); an analysis every {self.interval_s:g} s, at most {self.max_holds} per step"
        )
        lines = [head]
        for step in self.steps:
            if step.samples is None:
                lines.append(
                    f"  step {step.weight:g}%: {step.canary_per_analysis:.0f} canary requests an analysis; "
                    f"{step.bottleneck} never passes (no data for it?)"
                )
                continue
            slow = step.slow_analyses
            over = slow is None or slow > self.max_holds
            count = f"{step.analyses} analys{'is' if step.analyses == 1 else 'es'}"
            lines.append(
                f"  step {step.weight:g}%: {step.canary_per_analysis:.0f} canary requests an analysis; needs "
                f"{step.samples:.0f} ({step.bottleneck}): {count}, {_duration(step.seconds)}; "
                f"a slow rollout (1 in 10) {'never' if slow is None else slow}"
                + (f" > max_holds {self.max_holds}: STALLS" if over else "")
            )
        if self.feasible:
            lines.append(f"  an A/A canary is promoted after ~{self.analyses} analyses, ~{_duration(self.promote_s)}")
        else:
            lines.append(
                "  CANNOT FINISH: a step needs more analyses than max_holds in 1 rollout of 10 or more; those stall"
            )
        lines += [f"  feasible with: {s['change']}" for s in self.suggestions]
        return lines


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "never"
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.0f} min"


def needs(
    judge: JudgeConfig, steps: list[float], rows: list[tuple[float, float]], traffic: RouteTraffic
) -> list[dict[str, float | None]]:
    """For each ``(weight, z)`` of ``rows``: the canary requests each check (and ``"analysis"``: all of them)
    needs to pass an A/A canary at ``weight`` (``z``: one that many standard deviations unlucky). The judge
    runs over a coarse grid of sizes, then over a fine grid just below each check's first pass; each grid is
    one ``judge_many`` call for all rows at once (per-call costs dominated one row at a time: bench/plan_speed.py)."""
    coarse = _passes(judge, steps, rows, traffic, np.broadcast_to(COARSE, (len(rows), COARSE.size)))
    fine_rows = []
    for row in coarse:
        firsts = {int(np.argmax(p)) for p in row.values() if p.any()}
        fine = [np.linspace(COARSE[i - 1], COARSE[i], FINE + 1)[1:-1] for i in firsts if i]
        fine_rows.append(np.concatenate(fine) if fine else np.full(1, COARSE[0]))
    width = max(f.size for f in fine_rows)
    fine_sizes = np.array([np.pad(f, (0, width - f.size), mode="edge") for f in fine_rows])
    fine_passes = _passes(judge, steps, rows, traffic, fine_sizes)
    found = []
    for coarse_row, fine_row, sizes in zip(coarse, fine_passes, fine_sizes):
        first: dict[str, float | None] = {}
        for name, passed in coarse_row.items():  # the smallest passing size of both grids
            candidates = np.concatenate([COARSE[passed], sizes[fine_row[name]]])
            first[name] = float(candidates.min()) if candidates.size else None
        found.append(first)
    return found


def _passes(
    judge: JudgeConfig, steps: list[float], rows: list[tuple[float, float]], traffic: RouteTraffic, sizes: np.ndarray
) -> list[dict[str, np.ndarray]]:
    """For each row (weight, z) and its line of ``sizes``: {check: whether the counts at each size pass}."""
    score_range = judge.feedback.score_range if judge.feedback is not None else (0.0, 1.0)
    canaries, stables = [], []
    for (weight, z), line in zip(rows, sizes):
        stable_sizes = line * (100 - weight) / weight
        canaries.append(traffic.unlucky(line, stable_sizes, z, score_range) if z else traffic.expected(line))
        stables.append(traffic.expected(stable_sizes))
    codes = judge_many(
        judge, (_stacked(canaries), _stacked(stables)), tuple(traffic.latency), steps=judged_steps(steps)
    )
    return [{name: decided[r] == 1 for name, decided in codes.items()} for r in range(len(rows))]


def _stacked(counts: list[Counts]) -> Counts:
    return Counts(*(np.stack([np.asarray(getattr(c, f.name), dtype=float) for c in counts]) for f in fields(Counts)))


def _needs_of(
    memo: dict[tuple[str, int, float, float], dict[str, float | None]],
    judge: JudgeConfig,
    steps: list[float],
    weights: list[float],
    traffic: RouteTraffic,
) -> None:
    """Fill ``memo`` with the needs of each of ``weights``, median and slow rollout, in one batch."""
    key = judge.model_dump_json(), judged_steps(steps)
    missing = [(w, z) for w in weights for z in (0.0, SLOW_Z) if (*key, w, z) not in memo]
    if missing:
        for row, found in zip(missing, needs(judge, steps, missing, traffic)):
            memo[(*key, *row)] = found


def plan(
    spec: CanaryConfig,
    traffic: RouteTraffic,
    *,
    suggest: bool = True,
    memo: dict[tuple[str, int, float, float], dict[str, float | None]] | None = None,
) -> Plan:
    """The plan of ``spec``'s rollout over ``traffic``, with the settings that would make it feasible.
    ``memo`` keeps each step's needs across the plans of one suggestion search (same traffic)."""
    memo = {} if memo is None else memo
    rate = traffic.requests_per_s
    step_plans = []
    judged = [w for w in spec.steps if w < 100] if any(w < 100 for w in spec.steps) else spec.steps[:1]
    _needs_of(memo, spec.judge, spec.steps, judged, traffic)
    key = spec.judge.model_dump_json(), judged_steps(spec.steps)
    for weight in judged:
        per_analysis = rate * spec.interval_s * weight / 100
        found = [memo[(*key, weight, z)] for z in (0.0, SLOW_Z)]
        need = dict(found[0])
        samples, slow = need.pop("analysis"), found[1]["analysis"]
        bottleneck = max(need, key=lambda c: _or_inf(need[c])) if need else None
        analyses, slow_analyses = (
            None if x is None or per_analysis <= 0 else max(1, math.ceil(x / per_analysis)) for x in (samples, slow)
        )
        step_plans.append(
            StepPlan(
                weight,
                per_analysis,
                samples,
                analyses,
                None if analyses is None else analyses * spec.interval_s,
                bottleneck,
                need,
                slow,
                slow_analyses,
            )
        )
    counts = [s.analyses for s in step_plans]
    feasible = all(s.slow_analyses is not None and s.slow_analyses <= spec.max_holds for s in step_plans)
    total = sum(a for a in counts if a is not None) if all(a is not None for a in counts) else None
    result = Plan(
        spec.route,
        spec.canary,
        feasible,
        step_plans,
        total,
        None if total is None else total * spec.interval_s,
        spec.interval_s,
        spec.max_holds,
        {k: v for k, v in asdict(traffic).items() if k != "latency"},
    )
    if suggest and not feasible:
        result.suggestions = suggestions(spec, traffic, result, memo)
    return result


def suggestions(
    spec: CanaryConfig,
    traffic: RouteTraffic,
    current: Plan,
    memo: dict[tuple[str, int, float, float], dict[str, float | None]],
) -> list[dict[str, Any]]:
    """Settings that make the rollout feasible, each changing one thing: the interval, the min effects, the steps."""
    found: list[dict[str, Any]] = []
    if traffic.requests_per_s <= 0:
        return [
            {"change": "none: no traffic on the route over the lookback, nothing to judge a canary with", "update": {}}
        ]
    if all(s.slow_samples is not None for s in current.steps):
        interval = max(
            _or_inf(s.slow_samples) / (traffic.requests_per_s * s.weight / 100) / spec.max_holds for s in current.steps
        )
        interval = 60 * math.ceil(interval / 60)
        window = max(spec.max_window_s, spec.max_holds * interval)
        found.append(
            {
                "change": f"interval_s: {interval:g}"
                + (f" (and max_window_s: {window:g})" if window > spec.max_window_s else ""),
                "update": {"interval_s": interval, "max_window_s": window},
            }
        )
    for factor in EFFECT_FACTORS:
        judge = scaled(spec.judge, factor)
        if judge is None:
            break
        candidate = plan(spec.model_copy(update={"judge": judge}), traffic, suggest=False, memo=memo)
        if candidate.feasible:
            found.append(
                {
                    "change": f"min effects x{factor:g}: {effects(judge)}",
                    "update": {"judge": judge.model_dump(mode="json")},
                }
            )
            break
    judged = [w for w in spec.steps if w < 100]
    last = [100.0] if 100 in spec.steps else []
    for keep in range(len(judged) - 1, 0, -1):
        _needs_of(memo, spec.judge, [*judged[:keep], *last], judged, traffic)  # every subset's, in one batch
        options = []
        for subset in combinations(judged, keep):
            candidate = plan(spec.model_copy(update={"steps": [*subset, *last]}), traffic, suggest=False, memo=memo)
            if candidate.feasible:
                options.append((candidate.promote_s or 0.0, [*subset, *last]))
        if options:
            steps = min(options)[1]
            found.append({"change": f"steps: {[float(w) for w in steps]}", "update": {"steps": steps}})
            break
    return found


def scaled(judge: JudgeConfig, factor: float) -> JudgeConfig | None:
    """The judge with every min effect ``factor`` times larger (the tail's min_ratio too); None when one
    would leave its range."""
    update: dict[str, Any] = {}
    for name in ("error_rate", "fallback_rate", "latency"):
        check = getattr(judge, name)
        if check is not None:
            if check.min_effect * factor >= 1:
                return None
            update[name] = check.model_copy(update={"min_effect": check.min_effect * factor})
    if judge.latency_tail is not None:
        update["latency_tail"] = judge.latency_tail.model_copy(
            update={"min_ratio": judge.latency_tail.min_ratio * factor}
        )
    if judge.feedback is not None:
        low, high = judge.feedback.score_range
        if judge.feedback.min_effect * factor >= high - low:
            return None
        update["feedback"] = judge.feedback.model_copy(update={"min_effect": judge.feedback.min_effect * factor})
    return judge.model_copy(update=update)


def effects(judge: JudgeConfig) -> str:
    parts = []
    for name in CHECKS:
        check = getattr(judge, name)
        if check is not None:
            value = check.min_ratio if name == "latency_tail" else check.min_effect
            parts.append(f"{name}.{'min_ratio' if name == 'latency_tail' else 'min_effect'}={value:.3g}")
    return ", ".join(parts)

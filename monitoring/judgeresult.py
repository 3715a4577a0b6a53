"""The canary judge's results and its decision rule: how a check's interval becomes pass, fail or inconclusive
(``decide``), the error levels each confidence sequence is tested at (``Levels``), and the ``CheckResult`` and
``Verdict`` a rollout reads. monitoring/judge.py and monitoring/latencychecks.py make them.

Pure (numpy; no I/O).

Decisions, with ``min_effect`` the smallest regression that matters:

* fail: the interval's lower bound is above 0 (a regression is shown) and the estimate is at
  least ``min_effect`` (it is big enough to matter). A failure may come before ``min_samples``:
  the interval is valid at every sample size.
* pass: the upper bound is below ``min_effect`` (a regression that matters is ruled out), with at
  least ``min_samples`` canary observations.
* otherwise inconclusive. The analysis fails if any check fails, passes if every check passes.

Levels: the lower bounds (a failure) use ``alpha / (steps x checks x 2 variants)``, the upper bounds
(a pass) ``beta / 2``; monitoring/judge.py explains the error control they give.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from loragate.monitoring.judgeconfig import JudgeConfig

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


def percentage_points(value: float) -> str:
    """A share (or a difference of shares) as signed percentage points: 0.012 -> '+1.20 pp'."""
    return f"{value * 100:+.2f} pp"


def explain(
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
    """One line on a check's interval and decision, the figures written by ``fmt``."""
    interval = f"{fmt(estimate)} [{fmt(lower)}, {fmt(upper)}]"
    if decision == "fail":
        return f"{name} {interval}: a regression (lower bound > 0) of at least {fmt(min_effect).lstrip('+')}: fail"
    if decision == "pass":
        return f"{name} {interval}: upper bound below the min effect {fmt(min_effect).lstrip('+')}: pass"
    if samples < min_samples and upper < min_effect:
        return f"{name} {interval}: {samples:.0f} of {min_samples} samples needed: not enough data yet"
    return f"{name} {interval}: upper bound not below the min effect {fmt(min_effect).lstrip('+')}: not enough data yet"

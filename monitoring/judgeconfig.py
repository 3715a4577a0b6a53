"""The settings of the canary judge (the ``judge`` section of a canary): which checks run, their min effects and
sample sizes, and the error levels. monitoring/judge.py (and its latencychecks.py, judgeresult.py) read them;
monitoring/rollout/config.py nests them."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CHECKS = ("error_rate", "fallback_rate", "latency", "latency_tail", "feedback")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RateCheckConfig(_Strict):
    min_effect: float = Field(
        0.02, gt=0, lt=1, description="smallest increase of the share that matters (0.02 = 2 points)"
    )
    min_samples: int = Field(200, ge=1, description="canary requests before the check can pass")


class LatencyCheckConfig(_Strict):
    min_effect: float = Field(
        0.1, gt=0, lt=1, description="smallest extra share of canary requests slower than a bound"
    )
    min_samples: int = Field(200, ge=1, description="canary requests before the check can pass")
    floor_s: float = Field(0.25, ge=0, description="bucket bounds below this are not compared")


class LatencyTailCheckConfig(_Strict):
    quantiles: tuple[float, ...] = Field(
        (0.95, 0.99), min_length=1, description="the stable's quantiles whose bucket bounds are compared"
    )
    min_ratio: float = Field(
        2.0,
        gt=1,
        description="the canary's share slower than the stable's q bound that matters, "
        "as a multiple of the stable's 1 - q there (2: p98 above p99)",
    )
    min_samples: int = Field(200, ge=1, description="canary requests before the check can pass")
    floor_s: float = Field(0.25, ge=0, description="bucket bounds below this are not compared")

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, quantiles: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.5 <= q < 1 for q in quantiles):
            raise ValueError(f"tail quantiles must be in [0.5, 1): {list(quantiles)}")
        return tuple(sorted(set(quantiles)))

    def max_shares(self) -> dict[float, float]:
        """The canary's share slower than each quantile's bound that matters: min_ratio x (1 - q)."""
        return {q: min(1.0, self.min_ratio * (1 - q)) for q in self.quantiles}


class FeedbackCheckConfig(_Strict):
    min_effect: float = Field(0.1, gt=0, description="smallest drop of the mean score that matters (score units)")
    min_samples: int = Field(100, ge=1, description="canary scores before the check can pass")
    score_range: tuple[float, float] = Field((0.0, 1.0), description="lowest and highest possible score")

    @model_validator(mode="after")
    def _range(self) -> "FeedbackCheckConfig":
        low, high = self.score_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"score_range must be [lowest, highest] with lowest < highest: {list(self.score_range)}")
        if self.min_effect >= high - low:
            raise ValueError(f"min_effect {self.min_effect:g} must be below the score range's width {high - low:g}")
        return self


class JudgeConfig(_Strict):
    alpha: float = Field(
        0.05, gt=0, lt=1, description="risk of rolling back a canary no worse than the stable, per rollout"
    )
    beta: float = Field(0.1, gt=0, lt=1, description="risk of passing a step with a canary worse by a min effect")
    error_rate: RateCheckConfig | None = Field(default_factory=RateCheckConfig)
    fallback_rate: RateCheckConfig | None = Field(default_factory=RateCheckConfig)
    latency: LatencyCheckConfig | None = Field(default_factory=LatencyCheckConfig)
    latency_tail: LatencyTailCheckConfig | None = Field(default_factory=LatencyTailCheckConfig)
    feedback: FeedbackCheckConfig | None = None  # on only when configured: a route without feedback would hold forever

    @model_validator(mode="after")
    def _some_check(self) -> "JudgeConfig":
        if not self.enabled():
            raise ValueError(
                "the judge needs at least one check (error_rate, fallback_rate, latency, latency_tail, feedback)"
            )
        return self

    def enabled(self) -> list[str]:
        return [name for name in CHECKS if getattr(self, name) is not None]

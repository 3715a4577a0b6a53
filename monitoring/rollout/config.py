"""The ``rollouts`` section of the monitor YAML: where the weights go, and each canary's steps and thresholds."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Thresholds(_Strict):
    max_error_rate_increase: float = Field(0.01, ge=0, description="canary 5xx share minus stable 5xx share")
    max_latency_p95_ratio: float = Field(1.5, gt=0, description="canary p95 / stable p95")
    latency_floor_s: float = Field(0.1, ge=0, description="both p95 values are raised to this before dividing")
    max_fallback_rate: float = Field(0.05, ge=0, le=1, description="share of canary traffic moved off it")
    min_feedback_score: float | None = Field(None, description="mean canary feedback score must be at least this")
    min_feedback: int = Field(20, ge=1, description="fewer canary scores: the feedback check is not judged")


class CanaryConfig(_Strict):
    route: str
    stable: str
    canary: str
    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])
    interval_s: float = Field(300, gt=0, description="time between two analyses (and the least time on a step)")
    min_requests: int = Field(50, ge=1, description="canary requests an analysis needs; fewer: hold")
    failure_limit: int = Field(1, ge=1, description="failing analyses in a row that roll back")
    max_window_s: float = Field(3600, gt=0, description="longest analysis window (the step's traffic so far)")
    thresholds: Thresholds = Field(default_factory=Thresholds)

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if not steps:
            raise ValueError("steps needs at least one canary weight")
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError(f"steps are canary weights in percent, 0 < w <= 100: {steps}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must increase: {steps}")
        return steps

    @model_validator(mode="after")
    def _two_variants(self) -> "CanaryConfig":
        if self.canary == self.stable:
            raise ValueError(f"canary and stable are both {self.canary!r}")
        return self


class ConfigMapRef(_Strict):
    name: str
    namespace: str = "default"
    key: str = "routes.yaml"


class RolloutsConfig(_Strict):
    # The routes source the gateways watch: the file (compose, one machine) or the ConfigMap (cluster).
    routes_file: str | None = None
    configmap: ConfigMapRef | None = None
    state_file: str = "rollout-state.json"
    canaries: list[CanaryConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> "RolloutsConfig":
        if (self.routes_file is None) == (self.configmap is None):
            raise ValueError("rollouts need exactly one routes source: routes_file or configmap")
        routes = [c.route for c in self.canaries]
        duplicates = sorted({r for r in routes if routes.count(r) > 1})
        if duplicates:
            raise ValueError(f"one rollout per route at a time; several for {duplicates}")
        return self

"""The ``rollouts`` section of the monitor YAML: where the weights go, and each canary's steps and judge."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loragate.monitoring.judgeconfig import JudgeConfig
from loragate.monitoring.probe import ProbeConfig
from loragate.monitoring.shadow import ShadowGate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CanaryConfig(_Strict):
    route: str
    stable: str
    canary: str
    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])
    interval_s: float = Field(300, gt=0, description="time between two analyses (and the least time on a step)")
    failure_limit: int = Field(1, ge=1, description="failing analyses in a row that roll back")
    max_holds: int = Field(
        12,
        ge=1,
        description="inconclusive analyses in a row on one step before the rollout "
        "stalls: it keeps the step, alerts, and is never promoted",
    )
    max_window_s: float = Field(3600, gt=0, description="longest analysis window (the step's traffic so far)")
    plan_lookback_s: float = Field(3600, gt=0, description="the route's recent traffic the plan at the start reads")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    # The canary's shadow answers (monitoring/shadow.py) must pass this before its first step.
    shadow_gate: ShadowGate | None = None
    # Ask the engines whether the canary's adapter is applied at all, at the start and at every analysis
    # (monitoring/probe.py); one that answers as the base model is rolled back (and its card rejected).
    probe: ProbeConfig | None = None
    # Registry card directories of the two versions: their states follow the rollout (monitoring/rollout/cards.py).
    canary_card: str | None = None
    stable_card: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _replaced(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [key for key in ("thresholds", "min_requests") if key in data]
            if old:
                raise ValueError(
                    f"{' and '.join(old)}: the threshold judge was replaced by the statistical judge; "
                    "set judge: {alpha, beta, error_rate/fallback_rate/latency/feedback: "
                    "{min_effect, min_samples}} (docs/monitoring.md)"
                )
        return data

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
        if self.max_holds * self.interval_s > self.max_window_s:
            # The judge's intervals hold over a step's growing window; a window that slid would void them.
            raise ValueError(
                f"max_holds x interval_s ({self.max_holds} x {self.interval_s:g} s) must fit in "
                f"max_window_s ({self.max_window_s:g} s): the analysis window is the whole step"
            )
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

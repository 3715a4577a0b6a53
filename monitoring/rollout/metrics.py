"""The rollout series on the monitor's /metrics: step, state, transitions, last analysis values."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from loragate.monitoring.rollout.judge import CHECKS, Analysis
from loragate.monitoring.rollout.state import STATES, RolloutStatus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

ACTIONS = ("step", "promote", "rollback", "hold")


class RolloutMetrics:
    def __init__(self, registry: "CollectorRegistry | None" = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        rc, r = ("route", "canary"), self.registry
        self.step = Gauge("loragate_rollout_step", "Canary weight of each rollout now, in percent.", rc, registry=r)
        self.state = Gauge("loragate_rollout_state",
                           "1 for the rollout's current state (progressing, promoted, rolled_back), else 0.",
                           (*rc, "state"), registry=r)
        self.transitions = Counter("loragate_rollout_transitions",
                                   "Rollout decisions by action (step, promote, rollback, hold).",
                                   (*rc, "action"), registry=r)
        self.analysis = Gauge("loragate_rollout_analysis",
                              "Last measured value of each canary analysis check (NaN: not measurable).",
                              (*rc, "check"), registry=r)
        self._shown: dict[str, str] = {}  # route -> canary whose series exist

    def show(self, status: RolloutStatus) -> None:
        route, canary = status.route, status.canary
        previous = self._shown.get(route)
        if previous is not None and previous != canary:
            self.forget(route, previous)
        if previous != canary:
            for action in ACTIONS:  # every action has a series from the start: increase() sees the first
                self.transitions.labels(route, canary, action)
            self._shown[route] = canary
        self.step.labels(route, canary).set(status.weight)
        for state in STATES:
            self.state.labels(route, canary, state).set(1 if status.state == state else 0)

    def forget(self, route: str, canary: str) -> None:
        for metric, extra in ((self.step, [()]), (self.state, [(s,) for s in STATES]),
                              (self.transitions, [(a,) for a in ACTIONS]), (self.analysis, [(c,) for c in CHECKS])):
            for labels in extra:
                try:
                    metric.remove(route, canary, *labels)
                except KeyError:
                    pass
        self._shown.pop(route, None)

    def record(self, route: str, canary: str, action: str, analysis: Analysis | None = None) -> None:
        self.transitions.labels(route, canary, action).inc()
        if analysis is not None:
            for check in CHECKS:
                value = analysis.values.get(check)
                self.analysis.labels(route, canary, check).set(math.nan if value is None else value)

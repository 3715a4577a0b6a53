"""The rollout series on the monitor's /metrics: step, state, transitions, and the last analysis explained."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from loragate.monitoring.judgeconfig import CHECKS
from loragate.monitoring.judgeresult import Verdict
from loragate.monitoring.probe import RESULTS as PROBE_RESULTS
from loragate.monitoring.rollout.state import STATES, RolloutStatus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

ACTIONS = ("step", "promote", "rollback", "hold")
FIGURES = ("estimate", "lower", "upper", "min_effect", "samples", "min_samples")
DECISION_VALUES = {"pass": 1, "inconclusive": 0, "fail": -1}
OVERALL = "analysis"  # the decision series of the whole analysis, beside one per check


class RolloutMetrics:
    def __init__(self, registry: "CollectorRegistry | None" = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        rc, r = ("route", "canary"), self.registry
        self.step = Gauge("loragate_rollout_step", "Canary weight of each rollout now, in percent.", rc, registry=r)
        self.state = Gauge(
            "loragate_rollout_state",
            "1 for the rollout's current state (progressing, promoted, rolled_back), else 0.",
            (*rc, "state"),
            registry=r,
        )
        self.stalled = Gauge(
            "loragate_rollout_stalled",
            "1 while a rollout holds its step for good: max_holds inconclusive analyses in a row.",
            rc,
            registry=r,
        )
        self.transitions = Counter(
            "loragate_rollout_transitions",
            "Rollout decisions by action (step, promote, rollback, hold).",
            (*rc, "action"),
            registry=r,
        )
        self.analysis = Gauge(
            "loragate_rollout_analysis",
            "Last canary analysis, per check: the difference canary - stable (estimate), its "
            "interval (lower, upper), the min effect that matters, the canary's samples and the "
            "min samples (NaN: not measurable).",
            (*rc, "check", "figure"),
            registry=r,
        )
        self.decision = Gauge(
            "loragate_rollout_decision",
            "Last canary analysis decision per check and for the whole analysis (check=analysis): "
            "1 pass, 0 inconclusive (hold), -1 fail.",
            (*rc, "check"),
            registry=r,
        )
        self.plan_feasible = Gauge(
            "loragate_rollout_plan_feasible",
            "1 when the plan made at the rollout's start says an A/A canary passes every step "
            "within max_holds analyses, 0 when the rollout cannot finish.",
            rc,
            registry=r,
        )
        self.plan_seconds = Gauge(
            "loragate_rollout_plan_promote_seconds",
            "The plan's time to promote a canary like the stable (NaN: never).",
            rc,
            registry=r,
        )
        self.probes = Counter(
            "loragate_adapter_probe",
            "Adapter probes by result, one per engine asked: applied, not_applied (the engine "
            "answers the adapter's name as the base model), error.",
            ("route", "variant", "result"),
            registry=r,
        )
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
        self.stalled.labels(route, canary).set(1 if status.stalled and status.state == "progressing" else 0)
        for state in STATES:
            self.state.labels(route, canary, state).set(1 if status.state == state else 0)
        made = status.plan or {}
        if "feasible" in made:
            self.plan_feasible.labels(route, canary).set(1 if made["feasible"] else 0)
            seconds = made.get("promote_s") if made["feasible"] else None
            self.plan_seconds.labels(route, canary).set(math.nan if seconds is None else seconds)

    def forget(self, route: str, canary: str) -> None:
        for metric, extra in (
            (self.step, [()]),
            (self.stalled, [()]),
            (self.plan_feasible, [()]),
            (self.plan_seconds, [()]),
            (self.state, [(s,) for s in STATES]),
            (self.transitions, [(a,) for a in ACTIONS]),
            (self.analysis, [(c, f) for c in CHECKS for f in FIGURES]),
            (self.decision, [(c,) for c in (*CHECKS, OVERALL)]),
        ):
            for labels in extra:
                try:
                    metric.remove(route, canary, *labels)
                except KeyError:
                    pass
        self._shown.pop(route, None)

    def probed(self, route: str, variant: str, results: list[str]) -> None:
        for known in PROBE_RESULTS:  # every result has a series from the first probe: increase() sees the first
            self.probes.labels(route, variant, known)
        for result in results:
            self.probes.labels(route, variant, result).inc()

    def record(self, route: str, canary: str, action: str, verdict: Verdict | None = None) -> None:
        self.transitions.labels(route, canary, action).inc()
        if verdict is None:
            return
        self.decision.labels(route, canary, OVERALL).set(DECISION_VALUES[verdict.decision])
        for result in verdict.checks:
            self.decision.labels(route, canary, result.check).set(DECISION_VALUES[result.decision])
            for figure in FIGURES:
                value = getattr(result, figure)
                self.analysis.labels(route, canary, result.check, figure).set(math.nan if value is None else value)

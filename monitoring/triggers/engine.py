"""A Trigger: one policy and its actions for one route/variant, with the shared persisted state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loragate.monitoring.triggers.action import Action, ActionResult, TriggerContext
from loragate.monitoring.triggers.policy import Decision, TriggerPolicy, decide
from loragate.monitoring.triggers.state import TriggerState

if TYPE_CHECKING:
    import pandas as pd

    from loragate.monitoring.drift import DriftResult
    from loragate.monitoring.sources import WindowSource

log = logging.getLogger("loragate.monitor")


@dataclass
class TriggerOutcome:
    decision: Decision
    actions: list[ActionResult] = field(default_factory=list)


class Trigger:
    """One policy and its actions for one route/variant, with the shared persisted state.

    Actions run in order (the dataset export first, so the webhook and the Job can name it);
    one failing does not stop the others.
    """

    def __init__(
        self, route: str, variant: str | None, policy: TriggerPolicy, actions: list[Action], state: TriggerState
    ) -> None:
        self.route, self.variant, self.policy, self.state = route, variant, policy, state
        order = {"dataset": 0, "pipeline": 2}  # the export first, the pipeline (which reads it) last
        self.actions = sorted(actions, key=lambda a: order.get(a.name, 1))

    @property
    def key(self) -> str:
        return f"{self.route}/{self.variant or '*'}"

    async def handle(
        self,
        result: "DriftResult",
        *,
        requests: "pd.DataFrame | None" = None,
        feedback: "pd.DataFrame | None" = None,
        now: float | None = None,
        source: "WindowSource | None" = None,
    ) -> TriggerOutcome:
        scores = feedback["score"] if feedback is not None and "score" in feedback else None
        decision = decide(self.policy, self.state.get(self.key), result, scores, now=now)
        self.state.save()
        outcome = TriggerOutcome(decision)
        if not decision.fire:
            return outcome
        log.warning("retraining trigger for %s: %s", self.key, decision.reason)
        ctx = TriggerContext(self.route, self.variant, result, decision, requests, feedback, source=source)
        for action in self.actions:
            try:
                outcome.actions.append(await action.run(ctx))
            except Exception as exc:  # an action's failure is reported, never fatal to the monitor
                outcome.actions.append(ActionResult(action.name, False, f"{type(exc).__name__}: {exc}"))
        for item in outcome.actions:
            (log.info if item.ok else log.error)("trigger action %s for %s: %s", item.action, self.key, item.detail)
        return outcome

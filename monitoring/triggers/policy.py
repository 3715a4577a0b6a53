"""When to fire: drift (share above a threshold, or chosen signal groups) K runs in a row and/or low feedback,
then a cool-down."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from loragate.monitoring.triggers.state import KeyState

if TYPE_CHECKING:
    import pandas as pd

    from loragate.monitoring.drift import DriftResult


class TriggerPolicy(BaseModel):
    drift_share_above: float | None = Field(0.3, description="a run counts when its drift share is above this")
    # With groups set, a run counts when one of these signal groups drifted (its own verdict and
    # threshold, see monitoring/drift.py), e.g. [inputs, outputs] for retraining, not latency noise;
    # drift_share_above is then not used.
    groups: list[Literal["inputs", "outputs", "operations"]] | None = Field(None, min_length=1)
    consecutive_runs: int = Field(2, ge=1, description="K: counting runs in a row needed to fire")
    feedback_score_below: float | None = Field(None, description="fire when the mean feedback score is below")
    min_feedback: int = Field(20, ge=1, description="fewer scored requests: the feedback condition is not judged")
    combine: Literal["any", "all"] = "any"  # drift or feedback / drift and feedback
    cooldown_s: float = Field(86_400, ge=0)


@dataclass
class Decision:
    fire: bool
    reason: str
    drift_condition: bool = False
    feedback_condition: bool = False
    consecutive: int = 0
    cooldown_left_s: float = 0.0


def decide(
    policy: TriggerPolicy,
    state: KeyState,
    result: "DriftResult",
    feedback_scores: "pd.Series | None" = None,
    *,
    now: float | None = None,
) -> Decision:
    """Update ``state`` with one drift run and say whether to fire. Pure apart from ``state``.

    An insufficient-data run neither counts nor breaks the streak.
    """
    now = time.time() if now is None else now
    state.last_run = now
    drift_on = policy.groups is not None or policy.drift_share_above is not None
    if policy.groups is not None:
        verdicts = [g for g in result.groups if g.group in policy.groups]
        judged = any(g.status != "insufficient_data" for g in verdicts)
        counts = any(g.status == "drift" for g in verdicts)
        measure = (
            f"drifted groups {','.join(result.drifted_groups) or 'none'} "
            f"({{}}/{policy.consecutive_runs} runs with {'/'.join(policy.groups)} drift)"
        )
    else:
        judged = result.status != "insufficient_data"
        counts = policy.drift_share_above is not None and result.share > policy.drift_share_above
        measure = (
            f"drift share {result.share:.2f} ({{}}/{policy.consecutive_runs} runs above {policy.drift_share_above})"
        )
    if judged and drift_on:
        state.consecutive = state.consecutive + 1 if counts else 0
    drift_ok = drift_on and state.consecutive >= policy.consecutive_runs

    feedback_ok, feedback_note = False, ""
    if policy.feedback_score_below is not None and feedback_scores is not None:
        scores = feedback_scores.dropna()
        if len(scores) >= policy.min_feedback:
            mean = float(scores.mean())
            feedback_ok = mean < policy.feedback_score_below
            feedback_note = f"feedback mean {mean:.3f} over {len(scores)}"

    conditions = [c for c, on in ((drift_ok, drift_on), (feedback_ok, policy.feedback_score_below is not None)) if on]
    wanted = bool(conditions) and (all(conditions) if policy.combine == "all" else any(conditions))
    reason = measure.format(state.consecutive) + (f"; {feedback_note}" if feedback_note else "")
    decision = Decision(False, reason, drift_ok, feedback_ok, state.consecutive)
    if not wanted:
        return decision
    if state.last_fired is not None and now - state.last_fired < policy.cooldown_s:
        decision.cooldown_left_s = policy.cooldown_s - (now - state.last_fired)
        decision.reason += f"; cooling down ({decision.cooldown_left_s:.0f} s left)"
        return decision
    state.last_fired, state.fired, state.consecutive = now, state.fired + 1, 0
    decision.fire = True
    return decision

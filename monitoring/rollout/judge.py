"""The rollout's judge: a step's Observed counts -> monitoring/judge.py's Verdict (pure)."""

from __future__ import annotations

from loragate.monitoring.judge import Observed, judge
from loragate.monitoring.judgeresult import Verdict, judged_steps
from loragate.monitoring.rollout.config import CanaryConfig


def analyse(config: CanaryConfig, observed: Observed) -> Verdict:
    """One analysis of the canary against the stable variant, with the canary's judge settings; the
    rollback risk ``alpha`` is shared over every step the rollout analyses."""
    return judge(config.judge, observed, steps=judged_steps(config.steps))

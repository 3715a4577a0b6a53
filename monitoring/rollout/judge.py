"""The threshold judge: one analysis of the canary's Measurements against the stable variant's (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from loragate.monitoring.rollout.analysis import Measurements
from loragate.monitoring.rollout.config import CanaryConfig

CHECKS = ("canary_requests", "error_rate_increase", "latency_p95_ratio", "fallback_rate", "feedback_score")


@dataclass
class Analysis:
    verdict: Literal["pass", "fail", "inconclusive"]
    values: dict[str, float | None]
    failed: list[str] = field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "values": self.values, "failed": self.failed, "reason": self.reason}


def judge(config: CanaryConfig, m: Measurements) -> Analysis:
    """Pure: one analysis of the canary against the stable variant."""
    t = config.thresholds
    routed = m.canary_routed
    canary_error = m.canary_errors / routed if routed > 0 else None
    stable_error = m.stable_errors / m.stable_routed if m.stable_routed > 0 else 0.0
    ratio = None
    if m.canary_p95_s is not None and m.stable_p95_s is not None:
        floor = max(t.latency_floor_s, 1e-9)
        ratio = max(m.canary_p95_s, floor) / max(m.stable_p95_s, floor)
    feedback = m.feedback_sum / m.feedback_count if m.feedback_count >= t.min_feedback else None
    values: dict[str, float | None] = {
        "canary_requests": routed,
        "error_rate_increase": None if canary_error is None else canary_error - stable_error,
        "latency_p95_ratio": ratio,
        "fallback_rate": m.canary_fallbacks / routed if routed > 0 else None,
        "feedback_score": feedback,
    }
    if routed < config.min_requests:
        return Analysis("inconclusive", values, reason=f"{routed:.0f} canary requests, {config.min_requests} needed")
    limits = [("error_rate_increase", t.max_error_rate_increase, ">"),
              ("latency_p95_ratio", t.max_latency_p95_ratio, ">"),
              ("fallback_rate", t.max_fallback_rate, ">")]
    if t.min_feedback_score is not None:
        limits.append(("feedback_score", t.min_feedback_score, "<"))
    failed, notes = [], []
    for check, limit, op in limits:
        value = values[check]
        if value is None:
            continue  # not measurable in this window (e.g. no stable latency): not judged
        bad = value > limit if op == ">" else value < limit
        if bad:
            failed.append(check)
            notes.append(f"{check} {value:.4g} {op} {limit:g}")
    if failed:
        return Analysis("fail", values, failed, "; ".join(notes))
    return Analysis("pass", values, reason=f"{routed:.0f} canary requests, every check within its threshold")

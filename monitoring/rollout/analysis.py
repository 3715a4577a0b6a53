"""Measuring a canary: the PromQL over the gateway's counters, and its answers as Measurements."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Protocol

from loragate.monitoring.prometheus import Prometheus, selector
from loragate.monitoring.rollout.config import CanaryConfig


@dataclass
class Measurements:
    """Counts over the analysis window, from the gateway's counters."""

    canary_answered: float = 0.0  # loragate_requests_total{variant=canary}
    canary_errors: float = 0.0  # ... status_class="5xx"
    canary_fallbacks: float = 0.0  # loragate_fallbacks_total{variant=canary}
    stable_answered: float = 0.0
    stable_errors: float = 0.0
    stable_fallbacks: float = 0.0
    canary_p95_s: float | None = None
    stable_p95_s: float | None = None
    feedback_count: float = 0.0
    feedback_sum: float = 0.0

    @property
    def canary_routed(self) -> float:
        return self.canary_answered + self.canary_fallbacks

    @property
    def stable_routed(self) -> float:
        return self.stable_answered + self.stable_fallbacks


def analysis_queries(route: str, canary: str, stable: str, window_s: float) -> dict[str, str]:
    """PromQL for each field of Measurements over the last ``window_s`` (instant queries)."""
    window = f"{max(1, math.ceil(window_s))}s"

    def sel(variant: str, extra: str = "") -> str:
        return selector({"route": route, "variant": variant}, extra)

    queries: dict[str, str] = {}
    for role, variant in (("canary", canary), ("stable", stable)):
        queries[f"{role}_answered"] = f"sum(increase(loragate_requests_total{sel(variant)}[{window}]))"
        errors = sel(variant, 'status_class="5xx"')
        queries[f"{role}_errors"] = f"sum(increase(loragate_requests_total{errors}[{window}]))"
        queries[f"{role}_fallbacks"] = f"sum(increase(loragate_fallbacks_total{sel(variant)}[{window}]))"
        queries[f"{role}_p95_s"] = (f"histogram_quantile(0.95, sum by (le) "
                                    f"(increase(loragate_request_duration_seconds_bucket{sel(variant)}[{window}])))")
    queries["feedback_count"] = f"sum(increase(loragate_feedback_score_count{sel(canary)}[{window}]))"
    queries["feedback_sum"] = f"sum(increase(loragate_feedback_score_sum{sel(canary)}[{window}]))"
    return queries


class MetricsSource(Protocol):
    async def measure(self, config: CanaryConfig, window_s: float) -> Measurements: ...


class PrometheusAnalysis:
    """Measurements from instant queries over Prometheus' HTTP API (one query per field, concurrently)."""

    def __init__(self, prometheus: Prometheus) -> None:
        self.prometheus = prometheus

    async def measure(self, config: CanaryConfig, window_s: float) -> Measurements:
        queries = analysis_queries(config.route, config.canary, config.stable, window_s)
        async with self.prometheus.session() as session:
            values = await asyncio.gather(*(self.prometheus.value(q, session=session) for q in queries.values()))
        found = dict(zip(queries, values))
        counts = {k: v or 0.0 for k, v in found.items() if not k.endswith("_p95_s")}  # no series: none counted
        return Measurements(**counts, canary_p95_s=found.get("canary_p95_s"), stable_p95_s=found.get("stable_p95_s"))

"""Measuring a canary: the PromQL over the gateway's counters, and its answers as Measurements."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Protocol

from loragate.monitoring.rollout.config import CanaryConfig
from loragate.monitoring.rollout.errors import RolloutError


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


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def analysis_queries(route: str, canary: str, stable: str, window_s: float) -> dict[str, str]:
    """PromQL for each field of Measurements over the last ``window_s`` (instant queries)."""
    window = f"{max(1, math.ceil(window_s))}s"

    def sel(variant: str, extra: str = "") -> str:
        return f'{{route="{_label(route)}",variant="{_label(variant)}"{"," + extra if extra else ""}}}'

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
    """Measurements from instant queries over Prometheus' HTTP API (aiohttp)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    async def query(self, session, expr: str) -> float | None:
        async with session.get(f"{self.url}/api/v1/query", params={"query": expr}) as resp:
            body = await resp.json(content_type=None)
        if body.get("status") != "success":
            raise RolloutError(f"prometheus: {body.get('errorType')}: {body.get('error')} (query {expr})")
        result = body["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) else None

    async def measure(self, config: CanaryConfig, window_s: float) -> Measurements:
        import aiohttp

        queries = analysis_queries(config.route, config.canary, config.stable, window_s)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            values = await asyncio.gather(*(self.query(session, q) for q in queries.values()))
        found = dict(zip(queries, values))
        return Measurements(**{k: (v if k.endswith("_p95_s") else (v or 0.0)) for k, v in found.items()})

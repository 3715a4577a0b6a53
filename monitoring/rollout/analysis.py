"""Measuring a canary: the PromQL over the gateway's counters and histograms, its answers as the judge's Observed."""

from __future__ import annotations

import asyncio
import math
from typing import Any, Protocol

from loragate.monitoring.judge import Observed
from loragate.monitoring.prometheus import Prometheus, selector
from loragate.monitoring.rollout.config import CanaryConfig
from loragate.monitoring.rollout.plan import RouteTraffic


def analysis_queries(route: str, canary: str | None, stable: str | None, window_s: float) -> dict[str, str]:
    """PromQL for each field of Observed over the last ``window_s`` (instant queries); a variant of None
    stands for the whole route (every variant).

    Requests routed to a variant = answered by it (``loragate_requests_total``) + moved off it to the
    fallback chain (``loragate_fallbacks_total``). ``<role>_latency`` answers one sample per bucket
    (label ``le``, cumulative, +Inf included).
    """
    window = f"{max(1, math.ceil(window_s))}s"

    def sel(variant: str | None, extra: str = "") -> str:
        return selector({"route": route, "variant": variant}, extra)

    def increase(metric: str, variant: str | None, extra: str = "") -> str:
        return f"sum(increase({metric}{sel(variant, extra)}[{window}]))"

    queries: dict[str, str] = {}
    for role, variant in (("canary", canary), ("stable", stable)):
        answered = f"sum(increase(loragate_requests_total{sel(variant)}[{window}]))"
        fallbacks = increase("loragate_fallbacks_total", variant)
        queries[f"{role}_routed"] = f"({answered} or vector(0)) + ({fallbacks} or vector(0))"
        queries[f"{role}_errors"] = increase("loragate_requests_total", variant, 'status_class="5xx"')
        queries[f"{role}_fallbacks"] = fallbacks
        queries[f"{role}_feedback_sum"] = increase("loragate_feedback_score_sum", variant)
        queries[f"{role}_feedback_count"] = increase("loragate_feedback_score_count", variant)
        queries[f"{role}_latency"] = (
            f"sum by (le) (increase(loragate_request_duration_seconds_bucket{sel(variant)}[{window}]))"
        )
    return queries


def buckets(result: list[dict[str, Any]]) -> dict[float, float]:
    """{upper bound: cumulative count} from a ``sum by (le)`` vector (NaN counts dropped)."""
    found = {}
    for sample in result:
        count = float(sample["value"][1])
        if math.isfinite(count):
            found[float(sample["metric"]["le"])] = count  # float("+Inf") is inf
    return found


class MetricsSource(Protocol):
    async def measure(self, config: CanaryConfig, window_s: float) -> Observed: ...

    # and, where the source can tell (PrometheusAnalysis): ``async traffic(route, window_s) -> RouteTraffic``


class PrometheusAnalysis:
    """Observed counts and buckets from instant queries over the monitor's Prometheus client, concurrently."""

    def __init__(self, prometheus: Prometheus) -> None:
        self.prometheus = prometheus

    async def measure(self, config: CanaryConfig, window_s: float) -> Observed:
        return await self._observe(analysis_queries(config.route, config.canary, config.stable, window_s))

    async def traffic(self, route: str, window_s: float) -> RouteTraffic:
        """The whole route's traffic over the last ``window_s``, for the rollout plan."""
        queries = analysis_queries(route, None, None, window_s)
        observed = await self._observe({name: q for name, q in queries.items() if name.startswith("stable_")})
        return RouteTraffic.from_observed(observed, window_s)

    async def _observe(self, queries: dict[str, str]) -> Observed:
        vectors = {name: q for name, q in queries.items() if name.endswith("_latency")}
        numbers = {name: q for name, q in queries.items() if name not in vectors}
        async with self.prometheus.session() as session:
            values, results = await asyncio.gather(
                asyncio.gather(*(self.prometheus.value(q, session=session) for q in numbers.values())),
                asyncio.gather(*(self.prometheus.query(q, session=session) for q in vectors.values())),
            )
        fields: dict[str, Any] = {name: value or 0.0 for name, value in zip(numbers, values)}  # no series: 0
        fields.update({name: buckets(result) for name, result in zip(vectors, results)})
        return Observed(**fields)

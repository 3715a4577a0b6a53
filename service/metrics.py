"""Every Prometheus metric of the gateway, defined once.

Labels stay bounded: route and variant names come from the catalog, upstreams
from the settings, reasons and status classes from fixed sets. Requests whose
model is unknown are counted under route ``_unknown``.

With several worker processes (``loragate serve --workers N``) prometheus-client
runs in multiprocess mode: PROMETHEUS_MULTIPROC_DIR is set before the first
import, each worker writes its samples to files there, and /metrics sums them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess

from loragate.common.catalog import Route

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REDIS_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
# Feedback scores: 0-1 ratings and 1-5 stars land in distinct buckets. No negative bounds: with them
# prometheus-client drops the _sum series, and the mean score is what dashboards want (thumbs down = 0).
SCORE_BUCKETS = (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1, 2, 3, 4, 5, 10)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        rv = ("route", "variant")
        self.requests = Counter(
            "loragate_requests",
            "Requests answered, by route, variant and HTTP status class.",
            (*rv, "status_class"),
            registry=r,
        )
        self.request_duration = Histogram(
            "loragate_request_duration_seconds",
            "Time from request received to last byte sent.",
            rv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "loragate_time_to_first_token_seconds",
            "Streaming: time from request received to the first token sent.",
            rv,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "loragate_time_per_output_token_seconds",
            "Streaming: mean time between output tokens after the first.",
            rv,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("loragate_prompt_tokens", "Prompt tokens processed.", rv, registry=r)
        self.completion_tokens = Counter("loragate_completion_tokens", "Completion tokens generated.", rv, registry=r)
        self.cost = Counter(
            "loragate_cost_usd", "Cost of the served tokens at this deployment's price.", rv, registry=r
        )
        self.reference_cost = Counter(
            "loragate_reference_cost_usd",
            "What the same tokens would cost on the reference hosted API (savings = reference - cost).",
            rv,
            registry=r,
        )
        self.fallbacks = Counter(
            "loragate_fallbacks",
            "Requests moved off a variant before any byte was sent, by reason.",
            (*rv, "reason"),
            registry=r,
        )
        self.in_flight = Gauge(
            "loragate_requests_in_flight",
            "Requests being served now.",
            ("route",),
            multiprocess_mode="livesum",
            registry=r,
        )
        self.rollout_weight = Gauge(
            "loragate_rollout_weight",
            "Current rollout weight of each variant (share of its route, 0-1).",
            rv,
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.adapter_loads = Counter(
            "loragate_adapter_loads",
            "Adapter loads requested from replicas, by result (not_applied: loaded, but answered as the base model).",
            ("upstream", "adapter", "result"),
            registry=r,
        )
        self.adapter_load_duration = Histogram(
            "loragate_adapter_load_duration_seconds",
            "Time an adapter load took on a replica.",
            ("adapter",),
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_load_probes = Counter(
            "loragate_adapter_load_probes",
            "Probes of adapters this gateway loaded (is the adapter applied?), by result: applied, not_applied, "
            "error (unanswered), skipped (base model unknown).",
            ("upstream", "adapter", "result"),
            registry=r,
        )
        self.adapter_load_probe_duration = Histogram(
            "loragate_adapter_load_probe_duration_seconds",
            "Time the probe after an adapter load took (added to the first requests of that load).",
            ("adapter",),
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.upstream_healthy = Gauge(
            "loragate_upstream_healthy",
            "1 when the replica passed its last health check.",
            ("upstream",),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.upstream_in_flight = Gauge(
            "loragate_upstream_requests_in_flight",
            "Requests in flight to each replica.",
            ("upstream",),
            multiprocess_mode="livesum",
            registry=r,
        )
        self.circuit_state = Gauge(
            "loragate_circuit_state",
            'Circuit per replica (adapter="*") and per adapter on it: 0 closed, 1 half-open, 2 open.',
            ("upstream", "adapter"),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.retries = Counter(
            "loragate_upstream_retries",
            "Requests retried on another replica before any byte was sent, by reason.",
            ("route", "reason"),
            registry=r,
        )
        self.rejections = Counter(
            "loragate_admission_rejections",
            "Requests refused because every replica was at capacity.",
            ("route",),
            registry=r,
        )
        # Admission by priority class (service/admission.py): priority is one of critical, standard, sheddable.
        self.admission_shed = Counter(
            "loragate_admission_shed",
            "Requests refused or dropped while every replica was at capacity, by priority "
            "class and reason (queue_full, displaced: a higher class took its place, deadline).",
            ("priority", "reason"),
            registry=r,
        )
        self.admission_wait = Histogram(
            "loragate_admission_wait_seconds",
            "Time a request waited for a free replica slot before it was served "
            "(requests that waited only), by priority class.",
            ("priority",),
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.admission_share_handoffs = Counter(
            "loragate_admission_share_handoffs",
            "Freed slots handed to a class on its share's turn while a higher class was waiting "
            "(LORAGATE_PRIORITY_SHARES; strict priority would have given them to the higher class).",
            ("priority",),
            registry=r,
        )
        self.admission_waiting = Gauge(
            "loragate_admission_waiting_requests",
            "Requests waiting for a free replica slot now, by priority class.",
            ("priority",),
            multiprocess_mode="livesum",
            registry=r,
        )
        self.catalog_reloads = Counter(
            "loragate_catalog_reloads",
            "Routes file reloads, by result (a failed one keeps the last good catalog).",
            ("result",),
            registry=r,
        )
        self.auth_rejections = Counter(
            "loragate_auth_rejections",
            "Requests refused by auth, by reason (service.auth.REJECTION_REASONS).",
            ("reason",),
            registry=r,
        )
        # Limits (service/limits.py) and replica discovery (service/upstreams.py). key_id values come from
        # the keys file (bounded by it); upstream values of discovery from LORAGATE_UPSTREAMS.
        self.limit_rejections = Counter(
            "loragate_limit_rejections",
            "Requests refused by a per-key limit, by key id and reason "
            "(request_rate, token_rate, limiter_unavailable).",
            ("key_id", "reason"),
            registry=r,
        )
        # Spend budgets (service/budgets.py): scope is key or team, owner the key id or team name (bounded
        # by the keys file and LORAGATE_TEAM_BUDGETS), period day or month. Spent is as of the last check.
        self.budget_spent = Gauge(
            "loragate_budget_spent_usd",
            "USD spent in the current period, as read at the last admission check.",
            ("scope", "owner", "period"),
            multiprocess_mode="max",
            registry=r,
        )
        self.budget_limit = Gauge(
            "loragate_budget_limit_usd",
            "The spend budget in USD per period.",
            ("scope", "owner", "period"),
            multiprocess_mode="max",
            registry=r,
        )
        self.limits_backend = Gauge(
            "loragate_limits_backend",
            "Processes enforcing limits on each backend now (in_process, redis, "
            "fallback: Redis unreachable and serving on in-process limits, refusing: unreachable, fail closed).",
            ("backend",),
            multiprocess_mode="livesum",
            registry=r,
        )
        self.limits_backend_changes = Counter(
            "loragate_limits_backend_changes",
            "Changes of the limits backend, by the backend changed to.",
            ("backend",),
            registry=r,
        )
        self.limits_redis_duration = Histogram(
            "loragate_limits_redis_duration_seconds",
            "Round trip of one limit check in Redis.",
            buckets=REDIS_BUCKETS,
            registry=r,
        )
        self.upstream_discovered = Gauge(
            "loragate_upstream_discovered_replicas",
            "Replicas an upstream entry stands for now: the addresses its host name resolves to (1 for an IP).",
            ("upstream",),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.upstream_discovery_errors = Counter(
            "loragate_upstream_discovery_errors",
            "Failed DNS lookups of an upstream entry (the last addresses stay).",
            ("upstream",),
            registry=r,
        )
        # Scheduling (service/replicas.py, picker.py, adapterloads.py): each replica's scraped engine state,
        # which scorer decided each pick (load, adapter, prefix, only), adapter loads and unloads by reason.
        self.engine_requests = Gauge(
            "loragate_engine_requests",
            "Requests on each replica's engine at its last /metrics scrape, by state.",
            ("upstream", "state"),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.engine_kv_cache_usage = Gauge(
            "loragate_engine_kv_cache_usage_ratio",
            "KV-cache usage of each replica's engine at its last scrape (0-1).",
            ("upstream",),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.engine_lora_adapters = Gauge(
            "loragate_engine_lora_adapters",
            "Adapters on each replica: loaded (listed), running (running or waiting, scraped), slots (max_lora).",
            ("upstream", "state"),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.engine_scrape_errors = Counter(
            "loragate_engine_scrape_errors",
            "Failed /metrics scrapes of a replica (its load falls back to in-flight).",
            ("upstream",),
            registry=r,
        )
        self.picker_decisions = Counter(
            "loragate_picker_decisions",
            "Replica picks, by the scorer that separated the winner from the runner-up.",
            ("scorer",),
            registry=r,
        )
        self.adapter_placements = Counter(
            "loragate_adapter_placements",
            "Adapters loaded on or unloaded from replicas by the scheduler, by action and reason "
            "(first: on no replica yet; spread: its holders were busier; lru: idle, at the adapter limit).",
            ("action", "reason"),
            registry=r,
        )
        self.api_keys_reloads = Counter(
            "loragate_api_keys_reloads",
            "API keys file reloads, by result (a failed one keeps the last good keys).",
            ("result",),
            registry=r,
        )
        self.requestlog_records = Counter(
            "loragate_requestlog_records",
            "Request-log records by table (requests, feedback) and result "
            "(written; dropped: queue full; failed: the store refused them).",
            ("kind", "result"),
            registry=r,
        )
        self.requestlog_queue_depth = Gauge(
            "loragate_requestlog_queue_depth",
            "Records waiting for the request-log writer.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.feedback = Counter(
            "loragate_feedback",
            "Feedback received, by route, variant and label (allow-listed, else other).",
            (*rv, "label"),
            registry=r,
        )
        self.feedback_score = Histogram(
            "loragate_feedback_score", "Scores given as feedback.", rv, buckets=SCORE_BUCKETS, registry=r
        )

        self._variants: dict[tuple[str, str], VariantMetrics] = {}
        self._route_in_flight: dict[str, Gauge] = {}

    def set_rollout_weights(self, routes: Mapping[str, Route]) -> None:
        self.rollout_weight.clear()
        for route in routes.values():
            total = sum(v.weight for v in route.variants) or 1.0
            for variant in route.variants:
                self.rollout_weight.labels(route.name, variant.name).set(variant.weight / total)

    def route_in_flight(self, route: str) -> Gauge:
        found = self._route_in_flight.get(route)
        if found is None:
            found = self._route_in_flight[route] = self.in_flight.labels(route)
        return found

    def variant(self, route: str, variant: str) -> "VariantMetrics":
        """The children of every per-(route, variant) metric, looked up once (labels() takes a lock)."""
        key = (route, variant)
        found = self._variants.get(key)
        if found is None:
            found = self._variants[key] = VariantMetrics(self, route, variant)
        return found

    def exposition(self) -> bytes:
        directory = multiprocess_dir()
        if directory:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
            return generate_latest(registry)
        return generate_latest(self.registry)


class VariantMetrics:
    __slots__ = (
        "by_status",
        "_requests",
        "_labels",
        "duration",
        "ttft",
        "tpot",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "reference_cost",
    )

    def __init__(self, metrics: Metrics, route: str, variant: str) -> None:
        labels = self._labels = (route, variant)
        self._requests = metrics.requests
        self.by_status = {c: metrics.requests.labels(*labels, c) for c in ("2xx", "4xx", "5xx")}
        self.duration = metrics.request_duration.labels(*labels)
        self.ttft = metrics.time_to_first_token.labels(*labels)
        self.tpot = metrics.time_per_output_token.labels(*labels)
        self.prompt_tokens = metrics.prompt_tokens.labels(*labels)
        self.completion_tokens = metrics.completion_tokens.labels(*labels)
        self.cost = metrics.cost.labels(*labels)
        self.reference_cost = metrics.reference_cost.labels(*labels)

    def count(self, status: int) -> None:
        cls = status_class(status)
        child = self.by_status.get(cls)
        if child is None:
            child = self.by_status[cls] = self._requests.labels(*self._labels, cls)
        child.inc()

    def usage(self, prompt_tokens: int, completion_tokens: int, cost: float, reference_cost: float) -> None:
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens)
        self.cost.inc(cost)
        self.reference_cost.inc(reference_cost)

"""The drift and trigger series on the monitor's /metrics (the rollout ones: rollout/metrics.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from loragate.monitoring.drift import DriftResult
    from loragate.monitoring.triggers.engine import TriggerOutcome


class MonitorMetrics:
    def __init__(self, registry: "CollectorRegistry | None" = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        rv, r = ("route", "variant"), self.registry
        self.share = Gauge("loragate_drift_share", "Share of drifted features in the last run.", rv, registry=r)
        self.detected = Gauge(
            "loragate_drift_detected",
            "1 when the last run found drift in the signal group (inputs, outputs, operations).",
            (*rv, "group"),
            registry=r,
        )
        self.feature_score = Gauge(
            "loragate_drift_feature_score",
            "Drift score per feature in the last run (p-value or distance, see the JSON summary).",
            (*rv, "feature"),
            registry=r,
        )
        self.last_run = Gauge(
            "loragate_drift_last_run_timestamp_seconds",
            "When the last drift run finished (unix seconds).",
            rv,
            registry=r,
        )
        self.triggers = Counter(
            "loragate_retraining_triggers",
            "Retraining trigger actions, by result.",
            (*rv, "action", "result"),
            registry=r,
        )
        self.runs = Counter(
            "loragate_drift_runs",
            "Drift runs, by status (ok, drift, insufficient_data, error).",
            (*rv, "status"),
            registry=r,
        )
        self.window_rows = Gauge(
            "loragate_drift_window_requests",
            "Requests in the last run's window, by side "
            "(reference, current); the run compares a sample of them (sampled: side_sampled).",
            (*rv, "side"),
            registry=r,
        )
        self.compactions = Counter(
            "loragate_request_log_compactions",
            "Request-log hours compacted, by result (compacted, cleaned, error).",
            ("result",),
            registry=r,
        )

    def record(self, result: DriftResult) -> None:
        labels = (result.route, result.variant or "")
        self.runs.labels(*labels, result.status).inc()
        self.last_run.labels(*labels).set(time.time())
        for side, window, sampled in (
            ("reference", result.reference_window_rows, result.reference_rows),
            ("current", result.current_window_rows, result.current_rows),
        ):
            if window is not None:
                self.window_rows.labels(*labels, side).set(window)
                self.window_rows.labels(*labels, f"{side}_sampled").set(sampled)
        if result.status == "insufficient_data":
            return  # keep the last real figures; the run counter says what happened
        self.share.labels(*labels).set(result.share)
        for group in result.groups:
            if group.status != "insufficient_data":
                self.detected.labels(*labels, group.group).set(1 if group.status == "drift" else 0)
        for feature in result.features:
            self.feature_score.labels(*labels, feature.feature).set(feature.score)

    def record_outcome(self, route: str, variant: str | None, outcome: TriggerOutcome) -> None:
        for item in outcome.actions:
            self.triggers.labels(route, variant or "", item.action, "ok" if item.ok else "error").inc()

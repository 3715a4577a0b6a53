"""``loragate monitor``: drift checks on a schedule, retraining triggers, rollouts, its own /metrics.

One asyncio process: an aiohttp app serving ``/metrics`` (its own prometheus-client
registry) and ``/healthz``, a loop that runs every configured check each
``interval_s``, and (with a ``rollouts`` section) the rollout loop of monitoring/rollout/,
which analyses each canary on its own interval. The Evidently work runs in a worker thread
so the endpoints and the rollouts stay live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, Field, model_validator

from loragate.common.objectstore import S3Options
from loragate.monitoring.drift import DriftConfig, DriftResult, run_drift
from loragate.monitoring.rollout.analysis import PrometheusAnalysis
from loragate.monitoring.prometheus import Prometheus
from loragate.monitoring.rollout.config import RolloutsConfig
from loragate.monitoring.rollout.controller import RolloutController
from loragate.monitoring.rollout.metrics import RolloutMetrics
from loragate.monitoring.sources import RequestLog, Window, load_reference, variant_series
from loragate.monitoring.triggers.config import ActionConfig
from loragate.monitoring.triggers.engine import Trigger, TriggerOutcome
from loragate.monitoring.triggers.policy import TriggerPolicy
from loragate.monitoring.triggers.state import TriggerState

if TYPE_CHECKING:
    import pandas as pd
    from prometheus_client import CollectorRegistry

log = logging.getLogger("loragate.monitor")


class ReferenceConfig(BaseModel):
    """A saved dataset (``path``) or an earlier request-log window (``window_s`` ending ``offset_s`` ago)."""

    path: str | None = None
    window_s: float | None = None
    offset_s: float | None = None  # default: the reference window ends where the current one starts

    @model_validator(mode="after")
    def _one(self) -> "ReferenceConfig":
        if (self.path is None) == (self.window_s is None):
            raise ValueError("reference needs exactly one of path or window_s")
        return self


class CheckConfig(BaseModel):
    route: str
    variant: str | None = None
    window_s: float = 3600
    reference: ReferenceConfig
    prometheus_step_s: float = 60
    prometheus_rate_window: str = "1m"
    policy: TriggerPolicy = Field(default_factory=TriggerPolicy)
    actions: list[ActionConfig] = Field(default_factory=list)


class MonitorConfig(BaseModel):
    request_log: str
    # Where s3:// locations are (request log, reference datasets, dataset exports), as the gateway's
    # LORAGATE_REQUEST_LOG_S3_ENDPOINT / _REGION (also read when these are unset); see common/objectstore.py.
    s3_endpoint: str | None = None
    s3_region: str | None = None
    prometheus_url: str | None = None
    output_dir: str = "drift-reports"
    state_file: str = "monitor-state.json"
    interval_s: float = 900
    host: str = "127.0.0.1"
    port: int = 9108
    drift: DriftConfig = Field(default_factory=DriftConfig)
    checks: list[CheckConfig] = Field(default_factory=list)
    rollouts: RolloutsConfig | None = None  # progressive delivery of adapter versions (monitoring/rollout/)

    @model_validator(mode="after")
    def _rollouts_need_prometheus(self) -> "MonitorConfig":
        if self.rollouts is not None and self.rollouts.canaries and not self.prometheus_url:
            raise ValueError("rollouts analyse canaries from Prometheus: set prometheus_url")
        return self

    @classmethod
    def load(cls, path: str | Path) -> "MonitorConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))


class MonitorMetrics:
    def __init__(self, registry: "CollectorRegistry | None" = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        rv, r = ("route", "variant"), self.registry
        self.share = Gauge("loragate_drift_share", "Share of drifted features in the last run.", rv, registry=r)
        self.detected = Gauge("loragate_drift_detected", "1 when the last run found dataset drift.", rv, registry=r)
        self.feature_score = Gauge(
            "loragate_drift_feature_score",
            "Drift score per feature in the last run (p-value or distance, see the JSON summary).",
            (*rv, "feature"), registry=r)
        self.last_run = Gauge("loragate_drift_last_run_timestamp_seconds",
                              "When the last drift run finished (unix seconds).", rv, registry=r)
        self.triggers = Counter("loragate_retraining_triggers", "Retraining trigger actions, by result.",
                                (*rv, "action", "result"), registry=r)
        self.runs = Counter("loragate_drift_runs", "Drift runs, by status (ok, drift, insufficient_data, error).",
                            (*rv, "status"), registry=r)

    def record(self, result: DriftResult) -> None:
        labels = (result.route, result.variant or "")
        self.runs.labels(*labels, result.status).inc()
        self.last_run.labels(*labels).set(time.time())
        if result.status == "insufficient_data":
            return  # keep the last real figures; the run counter says what happened
        self.share.labels(*labels).set(result.share)
        self.detected.labels(*labels).set(1 if result.dataset_drift else 0)
        for feature in result.features:
            self.feature_score.labels(*labels, feature.feature).set(feature.score)

    def record_outcome(self, route: str, variant: str | None, outcome: TriggerOutcome) -> None:
        for item in outcome.actions:
            self.triggers.labels(route, variant or "", item.action, "ok" if item.ok else "error").inc()


@dataclass
class CheckRun:
    result: DriftResult
    outcome: TriggerOutcome
    current: "pd.DataFrame" = field(repr=False)


class Monitor:
    def __init__(self, config: MonitorConfig, *, metrics: MonitorMetrics | None = None, k8s_api: Any = None,
                 core_api: Any = None) -> None:
        self.config = config
        self.metrics = metrics or MonitorMetrics()
        self.s3 = S3Options.resolve(config.s3_endpoint, config.s3_region)
        self.log = RequestLog(config.request_log, self.s3)
        self.prometheus = Prometheus(config.prometheus_url) if config.prometheus_url else None
        self.state = TriggerState(config.state_file)
        self.triggers = [
            Trigger(c.route, c.variant, c.policy, [a.build(k8s_api, self.s3) for a in c.actions], self.state)
            for c in config.checks
        ]
        self._references: dict[str, "pd.DataFrame"] = {}
        self.last_results: dict[str, dict] = {}
        # core_api: a CoreV1Api (or stand-in) for the routes ConfigMap; default: in-cluster config.
        self.rollouts = None
        if config.rollouts is not None and config.rollouts.canaries:
            self.rollouts = RolloutController(
                config.rollouts, PrometheusAnalysis(self.prometheus) if self.prometheus is not None else None,
                metrics=RolloutMetrics(self.metrics.registry), k8s_api=core_api)

    async def run_check(self, index: int, *, now: float | None = None) -> CheckRun:
        check, trigger = self.config.checks[index], self.triggers[index]
        now = time.time() if now is None else now
        current_window = Window.last(check.window_s, end=now)
        current = await asyncio.to_thread(self.log.requests, current_window, check.route, check.variant)
        ref_cfg = check.reference
        if ref_cfg.path is not None:
            if ref_cfg.path not in self._references:
                self._references[ref_cfg.path] = await asyncio.to_thread(load_reference, ref_cfg.path, self.s3)
            reference = self._references[ref_cfg.path]
            ref_window = Window.last(check.window_s, end=current_window.start)  # for Prometheus only
        else:
            offset = ref_cfg.offset_s if ref_cfg.offset_s is not None else check.window_s
            ref_window = Window.last(ref_cfg.window_s, end=now, offset_s=offset)
            reference = await asyncio.to_thread(self.log.requests, ref_window, check.route, check.variant)
        series = None
        if self.prometheus is not None:
            try:
                series = await asyncio.gather(*(
                    variant_series(self.prometheus, check.route, check.variant, w, step_s=check.prometheus_step_s,
                                   rate_window=check.prometheus_rate_window)
                    for w in (ref_window, current_window)))
            except Exception as exc:  # Prometheus down: the report goes on without its series
                log.warning("prometheus query failed for %s: %s", trigger.key, exc)
        result = await asyncio.to_thread(
            run_drift, reference, current, route=check.route, variant=check.variant, config=self.config.drift,
            out_dir=self.config.output_dir, prometheus=tuple(series) if series else None)
        self.metrics.record(result)
        # Feedback may be stored without route/variant (another replica served the request):
        # take the window's feedback and join it to the current requests on request_id.
        feedback = await asyncio.to_thread(self.log.feedback, Window.between(current_window.start, now + 60))
        feedback = feedback[feedback["request_id"].isin(current["request_id"])]
        outcome = await trigger.handle(result, requests=current, feedback=feedback, now=now)
        self.metrics.record_outcome(check.route, check.variant, outcome)
        self.last_results[trigger.key] = {"status": result.status, "share": result.share,
                                          "finished": time.time(), "fired": outcome.decision.fire,
                                          "report": result.html_path}
        log.info("drift %s: %s share=%.2f fired=%s", trigger.key, result.status, result.share, outcome.decision.fire)
        return CheckRun(result, outcome, current)

    async def run_all(self, *, now: float | None = None) -> list[CheckRun]:
        runs = []
        for index, check in enumerate(self.config.checks):
            try:
                runs.append(await self.run_check(index, now=now))
            except Exception:
                log.exception("drift check %s/%s failed", check.route, check.variant)
                self.metrics.runs.labels(check.route, check.variant or "", "error").inc()
        return runs

    async def loop(self) -> None:
        loops = [self._drift_loop()]
        if self.rollouts is not None:
            loops.append(self.rollouts.loop())
        await asyncio.gather(*loops)

    async def _drift_loop(self) -> None:
        while True:
            started = time.monotonic()
            await self.run_all()
            await asyncio.sleep(max(1.0, self.config.interval_s - (time.monotonic() - started)))


def make_app(monitor: Monitor):
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(_request):
        return web.Response(body=generate_latest(monitor.metrics.registry),
                            headers={"content-type": CONTENT_TYPE_LATEST})

    async def healthz(_request):
        body = {"status": "ok", "checks": monitor.last_results}
        if monitor.rollouts is not None:
            body["rollouts"] = monitor.rollouts.status()
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(config: MonitorConfig, *, once: bool = False) -> int:
    monitor = Monitor(config)
    if once:
        runs = await monitor.run_all()
        return 1 if any(r.result.dataset_drift for r in runs) else 0
    from aiohttp import web

    runner = web.AppRunner(make_app(monitor))
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    log.info("loragate monitor on http://%s:%d (%d checks every %.0f s, %d rollouts)",
             config.host, config.port, len(config.checks), config.interval_s,
             len(config.rollouts.canaries) if config.rollouts else 0)
    try:
        await monitor.loop()
    finally:
        await runner.cleanup()
    return 0

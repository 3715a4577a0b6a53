"""``loragate monitor``: drift checks on a schedule, retraining triggers, rollouts, its own /metrics.

One asyncio process: an aiohttp app serving ``/metrics`` (its own prometheus-client
registry) and ``/healthz``, a loop that runs every configured check (monitoring/check.py) each
``interval_s``, a compaction round of the request log every ``compaction.interval_s`` (with a
``compaction`` section: monitoring/compaction.py), and (with a ``rollouts`` section) the rollout loop of
monitoring/rollout/,
which analyses each canary on its own interval. The Evidently work runs in a worker thread
so the endpoints and the rollouts stay live. This module only wires the parts together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from loragate.common.objectstore import S3Options, filesystem
from loragate.common.registry import Registry
from loragate.monitoring.adapterinfo import AdapterInfoCollector
from loragate.monitoring.check import CheckRun, DriftCheck, References
from loragate.monitoring.compaction import Compactor, HourResult
from loragate.monitoring.config import MonitorConfig
from loragate.monitoring.metrics import MonitorMetrics
from loragate.monitoring.prometheus import Prometheus
from loragate.monitoring.rollout.analysis import PrometheusAnalysis
from loragate.monitoring.rollout.controller import RolloutController
from loragate.monitoring.rollout.config import CanaryConfig
from loragate.monitoring.rollout.metrics import RolloutMetrics
from loragate.monitoring.shadow import GateResult, ShadowComparisonMetrics, gate, report
from loragate.monitoring.sources import RequestLog
from loragate.monitoring.triggers.engine import Trigger
from loragate.monitoring.triggers.pipeline import PipelineAction, PipelineMetrics
from loragate.monitoring.triggers.state import TriggerState

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("loragate.monitor")


class Monitor:
    def __init__(
        self, config: MonitorConfig, *, metrics: MonitorMetrics | None = None, k8s_api: Any = None, core_api: Any = None
    ) -> None:
        self.config = config
        self.metrics = metrics or MonitorMetrics()
        self.s3 = S3Options.resolve(config.s3_endpoint, config.s3_region)
        self.log = RequestLog(config.request_log, self.s3)
        self.prometheus = Prometheus(config.prometheus_url) if config.prometheus_url else None
        self.state = TriggerState(config.state_file)
        # core_api: a CoreV1Api (or stand-in) for the routes ConfigMap; default: in-cluster config.
        self.rollouts = None
        if config.rollouts is not None:
            self.rollouts = RolloutController(
                config.rollouts,
                PrometheusAnalysis(self.prometheus) if self.prometheus is not None else None,
                metrics=RolloutMetrics(self.metrics.registry),
                k8s_api=core_api,
                shadow_gate=self.shadow_gate,
            )
        pipeline_metrics = PipelineMetrics(self.metrics.registry)
        self.triggers = [
            Trigger(
                c.route,
                c.variant,
                c.policy,
                [
                    a.build(k8s_api, self.s3, rollouts=self.rollouts, pipeline_metrics=pipeline_metrics)
                    for a in c.actions
                ],
                self.state,
            )
            for c in config.checks
        ]
        references = References(self.s3)
        self.checks = [
            DriftCheck(
                c,
                t,
                log=self.log,
                references=references,
                prometheus=self.prometheus,
                drift=config.drift,
                out_dir=config.output_dir,
                metrics=self.metrics,
            )
            for c, t in zip(config.checks, self.triggers)
        ]
        if config.adapter_registry:
            self.metrics.registry.register(AdapterInfoCollector(Registry(config.adapter_registry)))
        self.last_results: dict[str, dict] = {}
        self.shadow_metrics = ShadowComparisonMetrics(self.metrics.registry)
        self.last_shadows: list[dict] = []

    async def run_check(self, index: int, *, now: float | None = None) -> CheckRun:
        run = await self.checks[index].run(now=now)
        self.last_results[self.triggers[index].key] = run.summary()
        return run

    async def run_all(self, *, now: float | None = None) -> list[CheckRun]:
        runs = []
        for index, check in enumerate(self.config.checks):
            try:
                runs.append(await self.run_check(index, now=now))
            except Exception:
                log.exception("drift check %s/%s failed", check.route, check.variant)
                self.metrics.runs.labels(check.route, check.variant or "", "error").inc()
        return runs

    async def compare_shadows(self, *, now: float | None = None) -> list[dict]:
        """Every shadow variant's comparison over the configured window; the gauges and /healthz get them."""
        from loragate.monitoring.sources import Window

        shadows = self.config.shadows
        assert shadows is not None
        now = time.time() if now is None else now
        window = Window.last(shadows.window_s, end=now)
        found = []
        routes: list[str | None] = [*shadows.routes] if shadows.routes else [None]
        for route in routes:
            found += await asyncio.to_thread(report, self.log, window, route)
        for comparison in found:
            self.shadow_metrics.record(comparison, now)
        self.last_shadows = [c.as_dict() for c in found]
        return self.last_shadows

    async def shadow_gate(self, spec: CanaryConfig) -> GateResult:
        """A rollout's shadow_gate: its canary's shadow answers against its stable variant's."""
        from loragate.monitoring.sources import Window

        assert spec.shadow_gate is not None
        window = Window.last(spec.shadow_gate.window_s)
        comparisons = await asyncio.to_thread(report, self.log, window, spec.route, spec.canary, spec.stable)
        result = gate(comparisons[0], spec.shadow_gate)
        self.shadow_metrics.record(result.comparison, time.time())
        return result

    def pipelines(self) -> list[PipelineAction]:
        return [a for t in self.triggers for a in t.actions if isinstance(a, PipelineAction)]

    async def loop(self) -> None:
        for action in self.pipelines():
            action.resume()  # unfinished runs of a stopped monitor go on where they were
        loops = [self._drift_loop()]
        if self.rollouts is not None:
            loops.append(self.rollouts.loop())
        if self.config.shadows is not None:
            loops.append(self._shadow_loop())
        if self.config.compaction is not None:
            loops.append(self._compaction_loop())
        await asyncio.gather(*loops)

    async def compact(self, *, now: float | None = None) -> list[HourResult]:
        """One compaction round over the request log's closed hours (safe beside other monitors and gateways)."""
        settings = self.config.compaction
        assert settings is not None
        compactor = Compactor(*filesystem(self.config.request_log, self.s3), grace_s=settings.grace_s)
        return await asyncio.to_thread(compactor.run, days=settings.days, now=now)

    async def _compaction_loop(self) -> None:
        assert self.config.compaction is not None
        while True:
            try:
                for done in await self.compact():
                    if done.status != "skipped":
                        self.metrics.compactions.labels(done.status).inc()
            except Exception:
                log.exception("request-log compaction failed")
                self.metrics.compactions.labels("error").inc()
            await asyncio.sleep(self.config.compaction.interval_s)

    async def _shadow_loop(self) -> None:
        assert self.config.shadows is not None
        while True:
            try:
                await self.compare_shadows()
            except Exception:
                log.exception("shadow comparison failed")
            await asyncio.sleep(self.config.shadows.interval_s)

    async def _drift_loop(self) -> None:
        while True:
            started = time.monotonic()
            await self.run_all()
            await asyncio.sleep(max(1.0, self.config.interval_s - (time.monotonic() - started)))


def make_app(monitor: Monitor) -> web.Application:
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(monitor.metrics.registry), headers={"content-type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_request: web.Request) -> web.Response:
        body: dict[str, Any] = {"status": "ok", "checks": monitor.last_results}
        if monitor.rollouts is not None:
            body["rollouts"] = monitor.rollouts.status()
        if monitor.config.shadows is not None:
            body["shadows"] = monitor.last_shadows
        runs = [r for action in monitor.pipelines() for r in action.records()]
        if runs:
            body["pipelines"] = [
                {
                    "route": r.route,
                    "version": f"{r.name}/{r.version}",
                    "outcome": r.outcome,
                    "steps": {k: v.status for k, v in r.steps.items()},
                }
                for r in runs
            ]
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
    log.info(
        "loragate monitor on http://%s:%d (%d checks every %.0f s, %d rollouts)",
        config.host,
        config.port,
        len(config.checks),
        config.interval_s,
        len(config.rollouts.canaries) if config.rollouts else 0,
    )
    try:
        await monitor.loop()
    finally:
        await runner.cleanup()
    return 0

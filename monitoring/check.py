"""One drift check: read the current and reference windows, run the drift report, hand the result to the trigger."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loragate.monitoring.drift import DriftConfig, DriftResult, run_drift
from loragate.monitoring.driftfeatures import LOG_COLUMNS
from loragate.monitoring.sources import RequestLog, Window, WindowSample, WindowSource, load_reference, variant_series

if TYPE_CHECKING:
    import pandas as pd

    from loragate.common.objectstore import S3Options
    from loragate.monitoring.config import CheckConfig
    from loragate.monitoring.metrics import MonitorMetrics
    from loragate.monitoring.prometheus import Prometheus
    from loragate.monitoring.triggers.engine import Trigger, TriggerOutcome

log = logging.getLogger("loragate.monitor")


@dataclass
class CheckRun:
    result: DriftResult
    outcome: "TriggerOutcome"
    current: "pd.DataFrame" = field(repr=False)

    def summary(self) -> dict:
        """What /healthz shows of the last run."""
        return {
            "status": self.result.status,
            "share": self.result.share,
            "finished": time.time(),
            "fired": self.outcome.decision.fire,
            "report": self.result.html_path,
        }


class References:
    """Saved reference datasets, each read once (shared by the checks that name it)."""

    def __init__(self, s3: "S3Options | None" = None) -> None:
        self.s3 = s3
        self._frames: dict[str, "pd.DataFrame"] = {}

    async def get(self, path: str) -> "pd.DataFrame":
        if path not in self._frames:
            self._frames[path] = await asyncio.to_thread(load_reference, path, self.s3)
        return self._frames[path]


class DriftCheck:
    """Reads a sample of the current window (and of the reference window), compares, hands on to the trigger."""

    def __init__(
        self,
        check: "CheckConfig",
        trigger: "Trigger",
        *,
        log: RequestLog,
        references: References,
        prometheus: "Prometheus | None",
        drift: DriftConfig,
        out_dir: str,
        metrics: "MonitorMetrics",
    ) -> None:
        self.check, self.trigger, self.log, self.references = check, trigger, log, references
        self.prometheus, self.drift, self.out_dir, self.metrics = prometheus, drift, out_dir, metrics

    def _sample(self, window: Window) -> "WindowSample":
        return self.log.sample(
            window,
            self.check.route,
            self.check.variant,
            columns=LOG_COLUMNS,
            per_variant=self.drift.sample_rows,
            by_variant=False,
        )

    async def run(self, *, now: float | None = None) -> CheckRun:
        check, trigger = self.check, self.trigger
        now = time.time() if now is None else now
        current_window = Window.last(check.window_s, end=now)
        sampled = await asyncio.to_thread(self._sample, current_window)
        current = sampled.frame
        ref_cfg = check.reference
        reference_rows = None
        if ref_cfg.path is not None:
            reference = await self.references.get(ref_cfg.path)
            ref_window = Window.last(check.window_s, end=current_window.start)  # for Prometheus only
        else:
            assert ref_cfg.window_s is not None  # ReferenceConfig: a path or a window
            offset = ref_cfg.offset_s if ref_cfg.offset_s is not None else check.window_s
            ref_window = Window.last(ref_cfg.window_s, end=now, offset_s=offset)
            ref_sample = await asyncio.to_thread(self._sample, ref_window)
            reference, reference_rows = ref_sample.frame, ref_sample.total_rows
        series = None
        if self.prometheus is not None:
            try:
                series = await asyncio.gather(
                    *(
                        variant_series(
                            self.prometheus,
                            check.route,
                            check.variant,
                            w,
                            step_s=check.prometheus_step_s,
                            rate_window=check.prometheus_rate_window,
                        )
                        for w in (ref_window, current_window)
                    )
                )
            except Exception as exc:  # Prometheus down: the report goes on without its series
                log.warning("prometheus query failed for %s: %s", trigger.key, exc)
        result = await asyncio.to_thread(
            run_drift,
            reference,
            current,
            route=check.route,
            variant=check.variant,
            config=self.drift,
            out_dir=self.out_dir,
            prometheus=tuple(series) if series else None,
            window_rows=(reference_rows, sampled.total_rows),
        )
        self.metrics.record(result)
        # Feedback may be stored without route/variant (another replica served the request):
        # take the window's feedback and join it to the current requests on request_id.
        feedback = await asyncio.to_thread(self.log.feedback, Window.between(current_window.start, now + 60))
        feedback = feedback[feedback["request_id"].isin(current["request_id"])]
        outcome = await trigger.handle(
            result,
            requests=current,
            feedback=feedback,
            now=now,
            source=WindowSource(self.log, current_window, check.route, check.variant),
        )
        self.metrics.record_outcome(check.route, check.variant, outcome)
        log.info("drift %s: %s share=%.2f fired=%s", trigger.key, result.status, result.share, outcome.decision.fire)
        return CheckRun(result, outcome, current)

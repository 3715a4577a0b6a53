"""The Kubernetes Job action: a batch/v1 Job from a YAML template, followed to its end when it trains.

A training Job (the chart's, labelled ``app.kubernetes.io/component: training``) retries an evicted or
crashed pod ``backoffLimit`` times, each attempt resuming from the last checkpoint. The action follows
such a Job (``read_namespaced_job_status`` every ``poll_s``) and notices when it has failed for good
(its ``Failed`` condition: retries spent, or the deadline passed): an error line naming the Job and
its reason, and ``loragate_pipeline_step_total{step="training_job", result="failed"}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import string
from pathlib import Path
from typing import Any

from loragate.monitoring import kube
from loragate.monitoring.triggers.action import ActionResult, TriggerContext

log = logging.getLogger("loragate.monitor")
TRAINING_LABEL = ("app.kubernetes.io/component", "training")


def job_outcome(status: Any) -> tuple[str, str] | None:
    """("succeeded" | "failed", reason) once a Job has ended, else None; ``status`` is a V1JobStatus or a dict."""
    conditions = (status.get("conditions") if isinstance(status, dict) else getattr(status, "conditions", None)) or []
    for c in conditions:
        get = c.get if isinstance(c, dict) else (lambda k, c=c: getattr(c, k, None))
        if str(get("status")) != "True":
            continue
        if get("type") == "Complete":
            return "succeeded", ""
        if get("type") == "Failed":
            return "failed", f"{get('reason') or 'Failed'}: {get('message') or ''}".strip(": ")
    return None


class KubernetesJobAction:
    """Create a batch/v1 Job from a YAML template with the official client.

    The template is filled with ``string.Template`` (``${route}``, ``${variant}``, ``${run_id}``,
    ``${dataset}``, ``${report}``, ``${summary}``). ``api`` is a BatchV1Api or anything with
    ``create_namespaced_job(namespace, body)``; by default one from ``monitoring/kube.py``
    (in-cluster config, else the kubeconfig).
    """

    name = "k8s_job"

    def __init__(
        self,
        template: str | Path,
        namespace: str = "default",
        api: Any = None,
        *,
        metrics: Any = None,
        poll_s: float = 60.0,
    ) -> None:
        self.template = Path(template).read_text() if Path(str(template)).exists() else str(template)
        self.namespace, self._api = namespace, api
        self.metrics, self.poll_s = metrics, poll_s  # metrics: a PipelineMetrics (training Jobs are counted)
        self.following: dict[str, asyncio.Task] = {}  # Job name -> the task following it
        self.outcomes: dict[str, tuple[str, str]] = {}  # Job name -> how it ended

    def manifest(self, ctx: TriggerContext) -> dict:
        import yaml

        values = {
            "route": ctx.route,
            "variant": ctx.variant or "",
            "run_id": ctx.run_id,
            "dataset": ctx.dataset_location or "",
            "report": ctx.result.html_path or "",
            "summary": ctx.result.json_path or "",
        }
        body = yaml.safe_load(string.Template(self.template).safe_substitute(values))
        meta = body.setdefault("metadata", {})
        if "name" not in meta and "generateName" not in meta:
            meta["generateName"] = f"loragate-retrain-{_dns(ctx.route)}-"
        meta.setdefault("labels", {}).update(
            {"app.kubernetes.io/managed-by": "loragate-monitor", "loragate.io/route": _dns(ctx.route)}
        )
        return body

    def api(self) -> Any:
        if self._api is None:
            self._api = kube.batch_v1()
        return self._api

    async def run(self, ctx: TriggerContext) -> ActionResult:
        body = self.manifest(ctx)
        created = await asyncio.to_thread(self.api().create_namespaced_job, self.namespace, body)
        meta = getattr(created, "metadata", None)
        name = getattr(meta, "name", None) or (
            created.get("metadata", {}).get("name") if isinstance(created, dict) else None
        )
        labels = body.get("metadata", {}).get("labels", {})
        if name and labels.get(TRAINING_LABEL[0]) == TRAINING_LABEL[1]:
            self.following[name] = asyncio.create_task(self.follow(name, ctx.route))
        return ActionResult(self.name, True, f"job {self.namespace}/{name}")

    async def follow(self, name: str, route: str) -> tuple[str, str]:
        """Poll the Job until it has ended; a failure for good is logged and counted."""
        while True:
            try:
                job = await asyncio.to_thread(self.api().read_namespaced_job_status, name, self.namespace)
            except Exception as exc:  # the API down for a while: keep following
                log.warning("training Job %s/%s: cannot read its status: %s", self.namespace, name, exc)
                job = None
            status = (job.get("status") if isinstance(job, dict) else getattr(job, "status", None)) if job else None
            outcome = job_outcome(status) if status is not None else None
            if outcome is not None:
                break
            await asyncio.sleep(self.poll_s)
        self.outcomes[name] = outcome
        self.following.pop(name, None)
        if outcome[0] == "failed":
            log.error(
                "training Job %s/%s for route %s failed for good (%s): no new version; its checkpoints stay "
                "in the registry's .train-* directory for a rerun",
                self.namespace,
                name,
                route,
                outcome[1],
            )
        else:
            log.info("training Job %s/%s for route %s succeeded", self.namespace, name, route)
        if self.metrics is not None:
            self.metrics.steps.labels(
                route=route, step="training_job", result="ok" if outcome[0] == "succeeded" else "failed"
            ).inc()
        return outcome


def _dns(value: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:40] or "route"

"""The Kubernetes Job action: a batch/v1 Job from a YAML template."""

from __future__ import annotations

import asyncio
import re
import string
from pathlib import Path
from typing import Any

from loragate.monitoring import kube
from loragate.monitoring.triggers.action import ActionResult, TriggerContext


class KubernetesJobAction:
    """Create a batch/v1 Job from a YAML template with the official client.

    The template is filled with ``string.Template`` (``${route}``, ``${variant}``, ``${run_id}``,
    ``${dataset}``, ``${report}``, ``${summary}``). ``api`` is a BatchV1Api or anything with
    ``create_namespaced_job(namespace, body)``; by default one from ``monitoring/kube.py``
    (in-cluster config, else the kubeconfig).
    """

    name = "k8s_job"

    def __init__(self, template: str | Path, namespace: str = "default", api: Any = None) -> None:
        self.template = Path(template).read_text() if Path(str(template)).exists() else str(template)
        self.namespace, self._api = namespace, api

    def manifest(self, ctx: TriggerContext) -> dict:
        import yaml

        values = {"route": ctx.route, "variant": ctx.variant or "", "run_id": ctx.run_id,
                  "dataset": ctx.dataset_location or "", "report": ctx.result.html_path or "",
                  "summary": ctx.result.json_path or ""}
        body = yaml.safe_load(string.Template(self.template).safe_substitute(values))
        meta = body.setdefault("metadata", {})
        if "name" not in meta and "generateName" not in meta:
            meta["generateName"] = f"loragate-retrain-{_dns(ctx.route)}-"
        meta.setdefault("labels", {}).update({"app.kubernetes.io/managed-by": "loragate-monitor",
                                              "loragate.io/route": _dns(ctx.route)})
        return body

    def api(self) -> Any:
        if self._api is None:
            self._api = kube.batch_v1()
        return self._api

    async def run(self, ctx: TriggerContext) -> ActionResult:
        body = self.manifest(ctx)
        created = await asyncio.to_thread(self.api().create_namespaced_job, self.namespace, body)
        meta = getattr(created, "metadata", None)
        name = getattr(meta, "name", None) or (created.get("metadata", {}).get("name") if isinstance(created, dict) else None)
        return ActionResult(self.name, True, f"job {self.namespace}/{name}")


def _dns(value: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:40] or "route"

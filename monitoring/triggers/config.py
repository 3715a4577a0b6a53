"""The ``actions`` entries of a check in the monitor YAML, built into actions."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel

from loragate.common.objectstore import S3Options
from loragate.monitoring.triggers.action import Action
from loragate.monitoring.triggers.dataset import DatasetExportAction
from loragate.monitoring.triggers.kube_job import KubernetesJobAction
from loragate.monitoring.triggers.pipeline import PipelineAction, PipelineMetrics, PipelineSettings
from loragate.monitoring.triggers.webhook import WebhookAction


class ActionConfig(BaseModel):
    type: Literal["webhook", "dataset", "k8s_job", "pipeline"]
    url: str | None = None
    secret: str | None = None
    secret_env: str | None = None  # read the webhook secret from this environment variable
    attempts: int = 4
    backoff_s: float = 0.5
    location: str | None = None  # dataset: a directory or s3:// prefix
    min_score: float | None = None
    template: str | None = None  # k8s_job: a file path or the YAML itself
    namespace: str = "default"
    pipeline: PipelineSettings | None = None  # pipeline: train -> gate -> load -> route -> rollout

    def build(
        self,
        k8s_api: Any = None,
        s3: S3Options | None = None,
        *,
        rollouts: Any = None,
        pipeline_metrics: PipelineMetrics | None = None,
    ) -> Action:
        if self.type == "webhook":
            secret = self.secret or (os.environ.get(self.secret_env, "") if self.secret_env else "")
            if not self.url or not secret:
                raise ValueError("a webhook action needs url and secret (or secret_env)")
            return WebhookAction(self.url, secret, attempts=self.attempts, backoff_s=self.backoff_s)
        if self.type == "dataset":
            if not self.location:
                raise ValueError("a dataset action needs location")
            return DatasetExportAction(self.location, min_score=self.min_score, s3=s3)
        if self.type == "pipeline":
            if self.pipeline is None:
                raise ValueError(
                    "a pipeline action needs its pipeline: block (registry, base_model, state_dir, engines)"
                )
            return PipelineAction(self.pipeline, rollouts, pipeline_metrics)
        if not self.template:
            raise ValueError("a k8s_job action needs template")
        return KubernetesJobAction(self.template, self.namespace, api=k8s_api, metrics=pipeline_metrics)

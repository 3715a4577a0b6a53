"""The monitor's YAML: the request log, Prometheus, drift checks with their trigger policy and actions, rollouts."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field, model_validator

from loragate.monitoring.compaction import CompactionConfig
from loragate.monitoring.drift import DriftConfig
from loragate.monitoring.rollout.config import RolloutsConfig
from loragate.monitoring.shadow import ShadowsConfig
from loragate.monitoring.triggers.config import ActionConfig
from loragate.monitoring.triggers.policy import TriggerPolicy


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
    shadows: ShadowsConfig | None = None  # shadow answers vs the primary's, on a schedule (monitoring/shadow.py)
    compaction: CompactionConfig | None = None  # merge closed hours of the request log (monitoring/compaction.py)
    adapter_registry: str | None = None  # adapter cards (loragate.common.registry): loragate_adapter_info

    @model_validator(mode="after")
    def _rollouts_need_prometheus(self) -> "MonitorConfig":
        if self.rollouts is not None and self.rollouts.canaries and not self.prometheus_url:
            raise ValueError("rollouts analyse canaries from Prometheus: set prometheus_url")
        pipelines = [
            f"checks.{i}.actions.{j}"
            for i, c in enumerate(self.checks)
            for j, a in enumerate(c.actions)
            if a.type == "pipeline"
        ]
        if pipelines and (self.rollouts is None or not self.prometheus_url):
            raise ValueError(
                f"{pipelines[0]}: a pipeline action rolls the new version out: it needs a rollouts "
                "section (the routes source) and prometheus_url (the canary analysis)"
            )
        return self

    @classmethod
    def load(cls, path: str | Path) -> "MonitorConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

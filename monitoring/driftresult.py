"""What a drift check found: per feature, per signal group, the Prometheus series beside it, and the run's status
(monitoring/drift.py makes it; the triggers, metrics and commands read it)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from loragate.monitoring.driftconfig import P_VALUE_METHODS
from loragate.monitoring.textdrift import ContentDrift


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    kind: str  # "numerical" | "categorical" | "text"
    method: str
    score: float
    threshold: float
    drifted: bool
    test: str  # "p_value": drift when score < threshold; "distance": when score > threshold
    group: str = ""  # inputs | outputs | operations
    p_value: float | None = None  # the text-content test's p-value (its score is the ROC AUC)

    @staticmethod
    def judge(method: str, score: float, threshold: float) -> tuple[bool, str]:
        if method in P_VALUE_METHODS:
            return score < threshold, "p_value"
        return score > threshold, "distance"


@dataclass(frozen=True)
class SeriesComparison:
    """A Prometheus series over the reference and the current window (informational, no test:
    per-minute aggregates are autocorrelated and few, a p-value on them would overstate)."""

    series: str
    reference_mean: float | None
    current_mean: float | None
    ratio: float | None
    reference_points: int
    current_points: int


@dataclass
class GroupVerdict:
    group: str
    status: str  # "ok" | "drift" | "insufficient_data"
    features: list[str]
    drifted_features: list[str]
    share: float
    drift_share_threshold: float
    reason: str


@dataclass
class DriftResult:
    route: str
    variant: str | None
    status: str  # "ok" | "drift" | "insufficient_data"
    reference_rows: int  # rows compared (a window's sample)
    current_rows: int
    features: list[FeatureDrift] = field(default_factory=list)
    groups: list[GroupVerdict] = field(default_factory=list)
    content: list[ContentDrift] = field(default_factory=list)  # what changed in the texts
    drift_share_threshold: float = 0.5
    reason: str | None = None
    prometheus: list[SeriesComparison] = field(default_factory=list)
    html_path: str | None = None
    json_path: str | None = None
    created_at: float = field(default_factory=time.time)
    duration_s: float = 0.0
    reference_window_rows: int | None = None  # rows in the window the sample was drawn from (None: not a window)
    current_window_rows: int | None = None

    @property
    def drifted_features(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]

    @property
    def share(self) -> float:
        return len(self.drifted_features) / len(self.features) if self.features else 0.0

    @property
    def dataset_drift(self) -> bool:
        return self.status == "drift"

    @property
    def drifted_groups(self) -> list[str]:
        return [g.group for g in self.groups if g.status == "drift"]

    def feature(self, name: str) -> FeatureDrift:
        return next(f for f in self.features if f.feature == name)

    def group(self, name: str) -> GroupVerdict | None:
        return next((g for g in self.groups if g.group == name), None)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            drifted_features=self.drifted_features,
            drifted_count=len(self.drifted_features),
            share=self.share,
            dataset_drift=self.dataset_drift,
            drifted_groups=self.drifted_groups,
        )
        return data

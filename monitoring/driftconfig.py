"""The settings of a drift check (``drift:`` in the monitor's config): the signal groups and their features, how
many rows, which test per column and its threshold. monitoring/drift.py runs the check with them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

GroupName = Literal["inputs", "outputs", "operations"]
# The signal groups: (features, decisive features: one of them drifting makes the group drift).
GROUPS: dict[GroupName, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "inputs": (
        ("prompt_content", "prompt_tokens", "prompt_length", "prompt_words", "prompt_oov_share", "prompt_script"),
        ("prompt_content",),
    ),
    "outputs": (
        (
            "response_content",
            "completion_tokens",
            "response_length",
            "response_words",
            "response_oov_share",
            "finish_reason",
            "response_refusal",
        ),
        ("response_content",),
    ),
    "operations": (("latency_s", "ttft_s", "cost_micro_usd", "fallback", "status_class"), ()),
}
CHI2_TWO_SAMPLE = "chi2_two_sample"
P_VALUE_METHODS = frozenset(
    {
        CHI2_TWO_SAMPLE,
        "ks",
        "chisquare",
        "z",
        "fisher_exact",
        "g_test",
        "mannw",
        "t_test",
        "anderson",
        "cramer_von_mises",
        "epps_singleton",
        "empirical_mmd",
        "es",
    }
)


class GroupConfig(BaseModel):
    features: list[str] | None = Field(None, description="default: the group's features in GROUPS")
    decisive: list[str] | None = Field(None, description="features whose drift alone is the group's drift")
    drift_share: float | None = Field(None, gt=0, le=1, description="default: DriftConfig.drift_share")


class DriftConfig(BaseModel):
    min_rows: int = Field(30, ge=2, description="fewer rows on either side: insufficient data")
    sample_rows: int = Field(
        10_000,
        ge=100,
        description="rows read from a request-log window: a deterministic "
        "sample by request id (monitoring/logscan.py); the window's row count is reported",
    )
    drift_share: float = Field(0.5, gt=0, le=1, description="share of a group's drifted columns that makes it drift")
    groups: dict[GroupName, GroupConfig] = Field(default_factory=dict, description="per-group overrides")
    # Text content (monitoring/textdrift.py): domain classifier on TF-IDF, drift when its
    # held-out ROC AUC is above max(content_min_auc, the critical AUC at content_alpha).
    text_content: bool = True
    content_alpha: float = Field(0.01, gt=0, lt=0.5)
    content_min_auc: float = Field(0.55, ge=0.5, lt=1)
    content_max_rows: int = Field(5000, ge=30, description="rows sampled per side for the classifier")
    top_terms: int = Field(10, ge=0, description="terms per side in the report")
    text_examples: int = Field(3, ge=0, description="example rows per side in the report (0: none)")
    large_sample_rows: int = Field(1000, description="from this many rows (smaller side) use distances")
    p_value_threshold: float = 0.05
    distance_threshold: float = 0.1
    # Overrides, e.g. {"latency_s": "psi"} / {"latency_s": 0.2}; a method here is used at every size.
    per_column_method: dict[str, str] = Field(default_factory=dict)
    per_column_threshold: dict[str, float] = Field(default_factory=dict)
    text_descriptors: bool = True

    @field_validator("groups")
    @classmethod
    def _known_features(cls, groups: dict[str, GroupConfig]) -> dict[str, GroupConfig]:
        known = {f for features, _ in GROUPS.values() for f in features}
        for name, group in groups.items():
            for attr in ("features", "decisive"):
                unknown = sorted(set(getattr(group, attr) or ()) - known)
                if unknown:
                    raise ValueError(f"groups.{name}.{attr}: unknown features {unknown} (known: {sorted(known)})")
        return groups

    def group(self, name: GroupName) -> tuple[tuple[str, ...], tuple[str, ...], float]:
        """(features, decisive features, drift share) of one group, overrides applied."""
        features, decisive = GROUPS[name]
        override = self.groups.get(name) or GroupConfig()
        return (
            tuple(override.features if override.features is not None else features),
            tuple(override.decisive if override.decisive is not None else decisive),
            override.drift_share if override.drift_share is not None else self.drift_share,
        )

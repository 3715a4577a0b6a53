"""Drift of live traffic against a reference, as an Evidently 0.7 report and a typed result.

Features per request: token counts, latency, TTFT, cost in micro-dollars (numerical); finish reason,
fallback yes/no, status class, refusal yes/no and the prompt's script (categorical); length, word
count and out-of-vocabulary share of the prompt and the response text (numerical descriptors),
and the content of both texts (a TF-IDF domain classifier, monitoring/textdrift.py), all offline.

Verdicts per signal group, each with its own features and threshold (``GROUPS``):
inputs (what users send), outputs (what the adapter answers), operations (latency, TTFT, cost,
fallbacks, errors). A group drifts when one of its decisive features drifts (the text content:
a change of topic is drift by itself) or when at least its ``drift_share`` of its features
drift. The run's status is ``drift`` when any group drifted; triggers can ask for one group.

Statistical choices (see tests/unit/test_drift.py and bench/drift_fp_rate.py):

- The method per column is chosen here from the smaller side's row count, not left to
  Evidently (which looks at the reference only: a 50k-row reference against a 40-row
  window would get a distance with no allowance for the small sample's noise, and a
  500-row reference against 100k rows a p-value test that flags differences too small to
  matter). Below ``large_sample_rows`` (1,000): two-sample K-S / chi-square, drift when
  p < 0.05, so about 5% of unchanged columns are flagged per run by design. From 1,000
  rows: normed Wasserstein / Jensen-Shannon distance, drift when > 0.1, an effect size
  rather than a significance test.
- Evidently's own ``chisquare`` is a goodness-of-fit test that takes the reference
  frequencies as exact; with two samples of similar size it flags 10-12% of unchanged
  columns at p < 0.05 (measured). Categorical columns get ``chi2_two_sample`` instead: the
  chi-square test of independence on the 2 x k contingency table (scipy), registered
  with Evidently as a custom stat test.
- One flagged column is not an alarm: a group drifts when at least ``drift_share`` of its
  columns drift (or a decisive one does), and triggers ask for K drifting runs in a row on top.
  The text-content test is conservative by construction (alpha 0.01 and an AUC floor):
  bench/drift_topics.py measures its false-positive and detection rates on real questions.
- The out-of-vocabulary share of a reference row is computed leave-one-out (a word
  counts as unknown when no *other* reference row has it), so the reference is not
  scored against a vocabulary it built itself; otherwise every reference row would get
  0 and any current window would look shifted.
- Measured with bench/drift_fp_rate.py (50 pairs of same-distribution windows): 300 rows a
  side: 2.9% of the 13 numerical/categorical columns of the first version flagged (2.2% of all
  18 columns now), some column in 28% of runs, a drift share >= 0.3 in 0% of runs; 2,000 rows
  a side: 1.2% of those 13 columns (0.9% of 18), share >= 0.2 in 0%. Group verdicts at the
  default drift_share 0.5: 0 of 20 same-distribution pairs at 150 rows drifted in any group
  (tests/unit/test_drift.py). Hence drift_share 0.5 by default and trigger policies that want
  K runs in a row. Latency columns also move with the machine's load, not only the traffic.
- Windows with fewer than ``min_rows`` rows give ``status="insufficient_data"``: no
  report, no alarm.
"""

from __future__ import annotations

import json
import math
import re
import time
from html import escape
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

from pydantic import BaseModel, Field, field_validator

from loragate.common.atomicio import atomic_write
from loragate.common.jsonable import finite
from loragate.monitoring.textdrift import ContentDrift, content_drift

if TYPE_CHECKING:
    import pandas as pd

NUMERICAL = ("prompt_tokens", "completion_tokens", "latency_s", "ttft_s", "cost_micro_usd")
CATEGORICAL = ("finish_reason", "fallback", "status_class", "prompt_script", "response_refusal")
TEXT = ("prompt_text", "response_text")
CONTENT = {"prompt_text": "prompt_content", "response_text": "response_content"}  # text -> content feature
# The request-log columns a drift check reads (the reader projects on them: never prompt_messages).
LOG_COLUMNS = ("request_id", "timestamp", "variant", "status", "fallback", "latency_s", "ttft_s", "prompt_tokens",
               "completion_tokens", "cost_usd", "finish_reason", "prompt_text", "response_text")
GroupName = Literal["inputs", "outputs", "operations"]
# The signal groups: (features, decisive features: one of them drifting makes the group drift).
GROUPS: dict[GroupName, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "inputs": (("prompt_content", "prompt_tokens", "prompt_length", "prompt_words", "prompt_oov_share",
                "prompt_script"), ("prompt_content",)),
    "outputs": (("response_content", "completion_tokens", "response_length", "response_words",
                 "response_oov_share", "finish_reason", "response_refusal"), ("response_content",)),
    "operations": (("latency_s", "ttft_s", "cost_micro_usd", "fallback", "status_class"), ()),
}
# Descriptor columns per text column: (name, kind). Length and word count come from
# Evidently's TextLength and WordCount descriptors; the OOV share is ours.
DESCRIPTORS = {
    "prompt_text": ("prompt_length", "prompt_words", "prompt_oov_share"),
    "response_text": ("response_length", "response_words", "response_oov_share"),
}
CHI2_TWO_SAMPLE = "chi2_two_sample"
P_VALUE_METHODS = frozenset({
    CHI2_TWO_SAMPLE, "ks", "chisquare", "z", "fisher_exact", "g_test", "mannw", "t_test", "anderson",
    "cramer_von_mises", "epps_singleton", "empirical_mmd", "es",
})
_WORD = re.compile(r"[^\W\d_]+")
# A cheap language signal: the script most of a prompt's letters are written in.
SCRIPTS = {
    "latin": "A-Za-z\u00c0-\u024f", "cyrillic": "\u0400-\u04ff", "greek": "\u0370-\u03ff",
    "arabic": "\u0600-\u06ff", "hebrew": "\u0590-\u05ff", "devanagari": "\u0900-\u097f",
    "cjk": "\u3040-\u30ff\u4e00-\u9fff", "hangul": "\uac00-\ud7af",
}
_REFUSAL = re.compile(
    r"^\W*(?:i(?:'|\u2019)?m sorry|i am sorry|sorry,|i can(?:not|(?:'|\u2019)?t)|i won(?:'|\u2019)?t|"
    r"i(?:'|\u2019)?m (?:not able|unable)|i am (?:not able|unable)|as an ai)", re.IGNORECASE)


class GroupConfig(BaseModel):
    features: list[str] | None = Field(None, description="default: the group's features in GROUPS")
    decisive: list[str] | None = Field(None, description="features whose drift alone is the group's drift")
    drift_share: float | None = Field(None, gt=0, le=1, description="default: DriftConfig.drift_share")


class DriftConfig(BaseModel):
    min_rows: int = Field(30, ge=2, description="fewer rows on either side: insufficient data")
    sample_rows: int = Field(10_000, ge=100, description="rows read from a request-log window: a deterministic "
                             "sample by request id (monitoring/logscan.py); the window's row count is reported")
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
        return (tuple(override.features if override.features is not None else features),
                tuple(override.decisive if override.decisive is not None else decisive),
                override.drift_share if override.drift_share is not None else self.drift_share)


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
        data.update(drifted_features=self.drifted_features, drifted_count=len(self.drifted_features),
                    share=self.share, dataset_drift=self.dataset_drift, drifted_groups=self.drifted_groups)
        return data


# --- features ----------------------------------------------------------------------------------

def oov_shares(reference: Iterable[object], current: Iterable[object]) -> tuple[list[float], list[float]]:
    """Share of each row's words that the reference vocabulary lacks.

    Reference rows are scored leave-one-out: a word is unknown to a reference row when no
    other reference row contains it (its document frequency is 1). Rows without words get NaN.
    Vectorised with pandas (explode + value counts): 100k rows take well under a second.
    """
    import pandas as pd

    def tokens(texts) -> "pd.Series":
        series = pd.Series(list(texts), dtype="object")
        series = series.where(series.map(lambda v: isinstance(v, str)), "")
        return series.str.lower().str.findall(_WORD.pattern).explode()  # index: row number

    ref_tokens, cur_tokens = tokens(reference), tokens(current)
    ref_pairs = ref_tokens.dropna().reset_index().drop_duplicates()
    doc_freq = ref_pairs.iloc[:, 1].value_counts()

    def shares(toks: "pd.Series", minimum: int, rows: int) -> list[float]:
        present = toks.dropna()
        unknown = present.map(doc_freq).fillna(0).lt(minimum).astype("float64")
        per_row = unknown.groupby(level=0).mean()
        return per_row.reindex(range(rows)).tolist()

    return shares(ref_tokens, 2, len(ref_tokens.index.unique())), shares(cur_tokens, 1, len(cur_tokens.index.unique()))


def prepare(frame: "pd.DataFrame") -> "pd.DataFrame":
    """Request-log (or reference) rows -> the feature frame (text kept for the descriptors)."""
    import pandas as pd

    out = pd.DataFrame(index=frame.index)
    for column in NUMERICAL:
        if column in frame:
            out[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    if "cost_usd" in frame:
        # In micro-dollars: Evidently norms the Wasserstein distance by max(std, 0.001), which
        # would hide any shift in per-request costs of a few millionths of a dollar.
        out["cost_micro_usd"] = pd.to_numeric(frame["cost_usd"], errors="coerce").astype("float64") * 1e6
    if "finish_reason" in frame:
        out["finish_reason"] = frame["finish_reason"].fillna("none").astype(str)
    if "fallback" in frame:
        out["fallback"] = frame["fallback"].map(lambda v: "yes" if isinstance(v, str) and v else "no")
    if "status" in frame and frame["status"].notna().any():
        status = pd.to_numeric(frame["status"], errors="coerce")
        out["status_class"] = (status // 100).map(lambda v: f"{int(v)}xx" if v == v else "none")
    for column in TEXT:
        if column in frame and frame[column].notna().any():
            out[column] = frame[column].where(frame[column].notna(), None)
    if "prompt_text" in out:
        out["prompt_script"] = scripts(out["prompt_text"])
    if "response_text" in out:
        text = out["response_text"]
        out["response_refusal"] = text.where(text.map(lambda v: isinstance(v, str)), "").str[:200].str.contains(
            _REFUSAL).map({True: "yes", False: "no"})
    return out.reset_index(drop=True)


def scripts(texts: "pd.Series") -> "pd.Series":
    """The script most of each text's letters are in (``SCRIPTS``), ``other`` or ``none``."""
    import pandas as pd

    text = texts.where(texts.map(lambda v: isinstance(v, str)), "")
    counts = pd.DataFrame({name: text.str.count(f"[{chars}]") for name, chars in SCRIPTS.items()})
    letters = text.str.count(_WORD.pattern)
    best = counts.idxmax(axis=1).where(counts.max(axis=1) > 0, "other")
    return best.where(letters > 0, "none")


def _usable(ref: "pd.Series", cur: "pd.Series", min_rows: int) -> bool:
    return int(ref.notna().sum()) >= min_rows and int(cur.notna().sum()) >= min_rows


def choose_method(feature: str, kind: str, rows: int, config: DriftConfig) -> tuple[str, float]:
    if feature in config.per_column_method:
        method = config.per_column_method[feature]
    elif rows >= config.large_sample_rows:
        method = "wasserstein" if kind == "numerical" else "jensenshannon"
    else:
        method = "ks" if kind == "numerical" else CHI2_TWO_SAMPLE
    default = config.p_value_threshold if method in P_VALUE_METHODS else config.distance_threshold
    return method, config.per_column_threshold.get(feature, default)


# --- the report --------------------------------------------------------------------------------

def run_drift(reference: "pd.DataFrame", current: "pd.DataFrame", *, route: str, variant: str | None = None,
              config: DriftConfig | None = None, out_dir: str | Path | None = None,
              prometheus: tuple["pd.DataFrame", "pd.DataFrame"] | None = None, name: str | None = None,
              window_rows: tuple[int | None, int | None] = (None, None)) -> DriftResult:
    """Compare ``current`` with ``reference`` (request-log or reference-dataset frames).

    ``window_rows``: the (reference, current) windows' true row counts when the frames are samples of them.
    With ``out_dir`` the Evidently HTML report and a JSON summary are written there
    (``<name>.html``, ``<name>.json``). ``prometheus`` is a pair of frames from
    ``Prometheus.variant_series`` (reference window, current window).
    """
    config = config or DriftConfig()
    started = time.perf_counter()
    result = DriftResult(route=route, variant=variant, status="ok", reference_rows=len(reference),
                         current_rows=len(current), drift_share_threshold=config.drift_share,
                         reference_window_rows=window_rows[0], current_window_rows=window_rows[1])
    if prometheus is not None:
        result.prometheus = compare_series(*prometheus)
    stem = name or _stem(route, variant, result.created_at)
    if len(reference) < config.min_rows or len(current) < config.min_rows:
        result.status = "insufficient_data"
        result.reason = (f"need at least {config.min_rows} rows on each side, have "
                         f"{len(reference)} reference and {len(current)} current")
        return _finish(result, out_dir, stem, None, started)

    ref, cur = prepare(reference), prepare(current)
    if config.text_descriptors:
        for text, (_, _, oov) in DESCRIPTORS.items():
            if text in ref and text in cur:
                ref[oov], cur[oov] = oov_shares(ref[text], cur[text])
    content = {}
    if config.text_content:
        for text, feature in CONTENT.items():
            if text in ref and text in cur:
                found = content_drift(
                    ref[text].tolist(), cur[text].tolist(), column=text, alpha=config.content_alpha,
                    min_auc=config.content_min_auc, max_rows=config.content_max_rows,
                    min_rows=config.min_rows, top_terms=config.top_terms, examples=config.text_examples)
                if found is not None:
                    content[feature] = found
    ref_ds, cur_ds, kinds = _datasets(ref, cur, config)
    columns = []
    for feature, kind in kinds.items():
        r, c = ref_ds.as_dataframe()[feature], cur_ds.as_dataframe()[feature]
        if _usable(r, c, config.min_rows):
            columns.append((feature, kind, min(int(r.notna().sum()), int(c.notna().sum()))))
    if not columns and not content:
        result.status = "insufficient_data"
        result.reason = f"no feature has {config.min_rows} non-empty values on both sides"
        return _finish(result, out_dir, stem, None, started)

    methods = {f: choose_method(f, kind, rows, config) for f, kind, rows in columns}
    snapshot, scores = None, {}
    if columns:
        from evidently import Report
        from evidently.presets import DataDriftPreset

        register_stattests()
        preset = DataDriftPreset(
            columns=[f for f, _, _ in columns], drift_share=config.drift_share,
            per_column_method={f: m for f, (m, _) in methods.items()},
            per_column_threshold={f: t for f, (_, t) in methods.items()},
        )
        snapshot = Report([preset]).run(current_data=cur_ds, reference_data=ref_ds)
        scores = _value_drift_scores(snapshot.dict())
    group_of = {f: name for name in GROUPS for f in config.group(name)[0]}
    for feature, found in content.items():
        result.features.append(FeatureDrift(feature, "text", "domain_classifier", found.auc, found.threshold,
                                            found.drifted, "distance", group_of.get(feature, ""), found.p_value))
    result.content = list(content.values())
    for feature, kind, _ in columns:
        method, threshold = methods[feature]
        score = scores.get(feature, math.nan)
        drifted, test = FeatureDrift.judge(method, score, threshold)
        result.features.append(FeatureDrift(feature, kind, method, float(score), float(threshold),
                                            bool(drifted and math.isfinite(score)), test, group_of.get(feature, "")))
    result.groups = [judge_group(name, result.features, config) for name in GROUPS]
    result.status = "drift" if result.drifted_groups else "ok"
    return _finish(result, out_dir, stem, snapshot, started)


def judge_group(name: GroupName, features: list[FeatureDrift], config: DriftConfig) -> GroupVerdict:
    """One group's verdict: a decisive feature drifted, or at least its drift share of its features."""
    members, decisive, share_threshold = config.group(name)
    measured = [f for f in features if f.feature in members]
    drifted = [f.feature for f in measured if f.drifted]
    share = len(drifted) / len(measured) if measured else 0.0
    if not measured:
        return GroupVerdict(name, "insufficient_data", [], [], 0.0, share_threshold,
                            "none of its features could be measured")
    deciding = [f for f in drifted if f in decisive]
    if deciding:
        status, reason = "drift", f"{', '.join(deciding)} drifted"
    elif share >= share_threshold:
        status, reason = "drift", f"{len(drifted)}/{len(measured)} features drifted (>= {share_threshold:g})"
    else:
        status, reason = "ok", f"{len(drifted)}/{len(measured)} features drifted (< {share_threshold:g})"
    return GroupVerdict(name, status, [f.feature for f in measured], drifted, share, share_threshold, reason)


def register_stattests() -> None:
    """Register ``chi2_two_sample`` with Evidently (idempotent)."""
    from evidently.legacy.calculations.stattests import registry
    from evidently.legacy.core import ColumnType

    if CHI2_TWO_SAMPLE in registry._registered_stat_tests:
        return

    def chi2_two_sample(reference, current, feature_type, threshold):
        import numpy as np
        from scipy.stats import chi2_contingency

        ref_counts, cur_counts = reference.value_counts(), current.value_counts()
        keys = sorted(set(ref_counts.index) | set(cur_counts.index), key=str)
        table = np.array([[ref_counts.get(k, 0) for k in keys], [cur_counts.get(k, 0) for k in keys]])
        if len(keys) < 2:
            return 1.0, False
        p_value = float(chi2_contingency(table, correction=False)[1])
        return p_value, p_value < threshold

    registry.register_stattest(
        registry.StatTest(name=CHI2_TWO_SAMPLE, display_name="chi-square two-sample p_value",
                          allowed_feature_types=[ColumnType.Categorical]),
        default_impl=chi2_two_sample,
    )


def _datasets(ref: "pd.DataFrame", cur: "pd.DataFrame", config: DriftConfig):
    from evidently import DataDefinition, Dataset
    from evidently.descriptors import TextLength, WordCount

    kinds: dict[str, str] = {}
    for column in NUMERICAL:
        if column in ref and column in cur:
            kinds[column] = "numerical"
    for column in CATEGORICAL:
        if column in ref and column in cur:
            kinds[column] = "categorical"
    text_columns, descriptors = [], []
    if config.text_descriptors:
        for text, (length, count, oov) in DESCRIPTORS.items():
            if text in ref and text in cur:
                text_columns.append(text)
                descriptors += [TextLength(text, alias=length), WordCount(text, alias=count)]
                kinds.update({length: "numerical", count: "numerical", oov: "numerical"})
    plain_numerical = [c for c, k in kinds.items() if k == "numerical" and c in ref]

    def dataset(frame):
        frame = frame[[c for c in frame.columns if c in kinds or c in text_columns]]
        definition = DataDefinition(
            numerical_columns=[c for c in plain_numerical if c in frame],
            categorical_columns=[c for c, k in kinds.items() if k == "categorical"],
            text_columns=text_columns,
        )
        return Dataset.from_pandas(frame, data_definition=definition, descriptors=descriptors or None)

    return dataset(ref), dataset(cur), kinds


def _value_drift_scores(snapshot: dict) -> dict[str, float]:
    scores = {}
    for metric in snapshot.get("metrics", []):
        config = metric.get("config", {})
        if config.get("type", "").endswith(":ValueDrift"):
            value = metric.get("value")
            scores[config["column"]] = float(value) if value is not None else math.nan
    return scores


def compare_series(reference: "pd.DataFrame", current: "pd.DataFrame") -> list[SeriesComparison]:
    out = []
    for series in sorted(set(reference.columns) | set(current.columns)):
        r = reference[series].dropna() if series in reference else reference.iloc[:0, :0]
        c = current[series].dropna() if series in current else current.iloc[:0, :0]
        r_mean = float(r.mean()) if len(r) else None
        c_mean = float(c.mean()) if len(c) else None
        ratio = c_mean / r_mean if r_mean and c_mean is not None else None
        out.append(SeriesComparison(series, r_mean, c_mean, ratio, len(r), len(c)))
    return out


def _stem(route: str, variant: str | None, created_at: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created_at))
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{route}-{variant or 'all'}")
    return f"drift-{safe}-{stamp}"


def _finish(result: DriftResult, out_dir, stem: str, snapshot, started: float) -> DriftResult:
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if snapshot is not None or result.content:
            html = out / f"{stem}.html"
            sections = _groups_section(result) + _content_section(result.content)
            if result.prometheus:
                sections += _series_section(result.prometheus)
            _write_html(html, snapshot, sections)
            result.html_path = str(html)
        result.json_path = str(out / f"{stem}.json")
    result.duration_s = time.perf_counter() - started
    if result.json_path:
        atomic_write(Path(result.json_path), json.dumps(finite(result.to_dict()), indent=2))
    return result


def _write_html(html: Path, snapshot, sections: str) -> None:
    """Evidently's report with loragate's own sections on top (its verdict, not Evidently's pooled
    dataset banner, is the one that counts), written whole: a reader never sees half a report."""
    text = "<html><body></body></html>"
    if snapshot is not None:
        scratch = html.with_name(html.name + ".evidently.tmp")
        try:
            snapshot.save_html(str(scratch))
            text = scratch.read_text()
        finally:
            scratch.unlink(missing_ok=True)
    body = re.search(r"<body[^>]*>", text)
    at = body.end() if body else 0
    atomic_write(html, text[:at] + sections + text[at:])


def _series_section(series: list[SeriesComparison]) -> str:
    def cell(v):
        return "" if v is None else f"{v:.6g}"

    rows = "".join(
        f"<tr><td>{s.series}</td><td>{cell(s.reference_mean)}</td><td>{cell(s.current_mean)}</td>"
        f"<td>{cell(s.ratio)}</td><td>{s.reference_points}/{s.current_points}</td></tr>" for s in series)
    return ("<section style='font-family:sans-serif;margin:24px'><h3>Prometheus series (mean per step)</h3>"
            "<table border=1 cellpadding=4><tr><th>series</th><th>reference</th><th>current</th>"
            f"<th>ratio</th><th>points</th></tr>{rows}</table></section>")


def _groups_section(result: DriftResult) -> str:
    rows = "".join(
        f"<tr><td>{g.group}</td><td><b>{g.status}</b></td><td>{escape(g.reason)}</td>"
        f"<td>{escape(', '.join(g.drifted_features)) or '-'}</td></tr>" for g in result.groups)
    drifted = ", ".join(g.group for g in result.groups if g.status == "drift")
    verdict = f"drift in {drifted}" if drifted else "no drift"
    return ("<section style='font-family:sans-serif;margin:24px'>"
            f"<h2>loragate verdict: {escape(verdict)}</h2>"
            "<p>Per signal group, below; Evidently's pooled &quot;Dataset Drift&quot; banner further down "
            "counts every column alike and is not the verdict.</p><h3>Verdict per signal group</h3>"
            "<table border=1 cellpadding=4><tr><th>group</th><th>status</th><th>why</th><th>drifted</th></tr>"
            f"{rows}</table></section>")


def _content_section(content: list[ContentDrift]) -> str:
    parts = []
    for c in content:
        def terms(items):
            return "".join(f"<tr><td>{escape(t.term)}</td><td>{t.weight:+.2f}</td><td>{t.reference_share:.1%}</td>"
                           f"<td>{t.current_share:.1%}</td></tr>" for t in items)

        def examples(items):
            return "".join(f"<li>{escape(e)}</li>" for e in items)

        head = "<tr><th>term</th><th>weight</th><th>reference rows</th><th>current rows</th></tr>"
        parts.append(
            f"<h3>Text content: {c.column} ({'DRIFT' if c.drifted else 'no drift'})</h3>"
            f"<p>Domain classifier (TF-IDF, logistic regression fitted on one half of the rows, scored on the "
            f"other): held-out ROC AUC {c.auc:.3f}, "
            f"drift above {c.threshold:.3f}; p-value {c.p_value:.3g}; {c.reference_rows} reference and "
            f"{c.current_rows} current rows.</p>"
            f"<h4>Terms most typical of the current window</h4><table border=1 cellpadding=4>{head}"
            f"{terms(c.current_terms)}</table>"
            f"<h4>Terms most typical of the reference</h4><table border=1 cellpadding=4>{head}"
            f"{terms(c.reference_terms)}</table>"
            f"<h4>Current rows most unlike the reference</h4><ul>{examples(c.current_examples)}</ul>"
            f"<h4>Reference rows most unlike the current window</h4><ul>{examples(c.reference_examples)}</ul>")
    return f"<section style='font-family:sans-serif;margin:24px'>{''.join(parts)}</section>" if parts else ""

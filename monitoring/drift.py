"""Drift of live traffic against a reference, as an Evidently 0.7 report and a typed result.

Features per request: token counts, latency, TTFT, cost in micro-dollars (numerical); finish reason,
fallback yes/no, status class, refusal yes/no and the prompt's script (categorical); length, word
count and out-of-vocabulary share of the prompt and the response text (numerical descriptors),
and the content of both texts (a TF-IDF domain classifier, monitoring/textdrift.py), all offline.

The check runs here; its settings are monitoring/driftconfig.py's, its features monitoring/driftfeatures.py's,
its result monitoring/driftresult.py's and its HTML report monitoring/drifthtml.py's.

Verdicts per signal group, each with its own features and threshold (``GROUPS``, monitoring/driftconfig.py):
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
from pathlib import Path
from typing import TYPE_CHECKING

from loragate.common.atomicio import atomic_write
from loragate.common.jsonable import finite
from loragate.monitoring.driftconfig import CHI2_TWO_SAMPLE, GROUPS, P_VALUE_METHODS, DriftConfig, GroupName
from loragate.monitoring.driftfeatures import CATEGORICAL, CONTENT, DESCRIPTORS, NUMERICAL, oov_shares, prepare
from loragate.monitoring.drifthtml import write_report
from loragate.monitoring.driftresult import DriftResult, FeatureDrift, GroupVerdict, SeriesComparison
from loragate.monitoring.textdrift import content_drift

if TYPE_CHECKING:
    import pandas as pd


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


# --- the run --------------------------------------------------------------------------------


def run_drift(
    reference: "pd.DataFrame",
    current: "pd.DataFrame",
    *,
    route: str,
    variant: str | None = None,
    config: DriftConfig | None = None,
    out_dir: str | Path | None = None,
    prometheus: tuple["pd.DataFrame", "pd.DataFrame"] | None = None,
    name: str | None = None,
    window_rows: tuple[int | None, int | None] = (None, None),
) -> DriftResult:
    """Compare ``current`` with ``reference`` (request-log or reference-dataset frames).

    ``window_rows``: the (reference, current) windows' true row counts when the frames are samples of them.
    With ``out_dir`` the Evidently HTML report and a JSON summary are written there
    (``<name>.html``, ``<name>.json``). ``prometheus`` is a pair of frames from
    ``Prometheus.variant_series`` (reference window, current window).
    """
    config = config or DriftConfig()
    started = time.perf_counter()
    result = DriftResult(
        route=route,
        variant=variant,
        status="ok",
        reference_rows=len(reference),
        current_rows=len(current),
        drift_share_threshold=config.drift_share,
        reference_window_rows=window_rows[0],
        current_window_rows=window_rows[1],
    )
    if prometheus is not None:
        result.prometheus = compare_series(*prometheus)
    stem = name or _stem(route, variant, result.created_at)
    if len(reference) < config.min_rows or len(current) < config.min_rows:
        result.status = "insufficient_data"
        result.reason = (
            f"need at least {config.min_rows} rows on each side, have "
            f"{len(reference)} reference and {len(current)} current"
        )
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
                    ref[text].tolist(),
                    cur[text].tolist(),
                    column=text,
                    alpha=config.content_alpha,
                    min_auc=config.content_min_auc,
                    max_rows=config.content_max_rows,
                    min_rows=config.min_rows,
                    top_terms=config.top_terms,
                    examples=config.text_examples,
                )
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
            columns=[f for f, _, _ in columns],
            drift_share=config.drift_share,
            per_column_method={f: m for f, (m, _) in methods.items()},
            per_column_threshold={f: t for f, (_, t) in methods.items()},
        )
        snapshot = Report([preset]).run(current_data=cur_ds, reference_data=ref_ds)
        scores = _value_drift_scores(snapshot.dict())
    group_of = {f: name for name in GROUPS for f in config.group(name)[0]}
    for feature, found in content.items():
        result.features.append(
            FeatureDrift(
                feature,
                "text",
                "domain_classifier",
                found.auc,
                found.threshold,
                found.drifted,
                "distance",
                group_of.get(feature, ""),
                found.p_value,
            )
        )
    result.content = list(content.values())
    for feature, kind, _ in columns:
        method, threshold = methods[feature]
        score = scores.get(feature, math.nan)
        drifted, test = FeatureDrift.judge(method, score, threshold)
        result.features.append(
            FeatureDrift(
                feature,
                kind,
                method,
                float(score),
                float(threshold),
                bool(drifted and math.isfinite(score)),
                test,
                group_of.get(feature, ""),
            )
        )
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
        return GroupVerdict(
            name, "insufficient_data", [], [], 0.0, share_threshold, "none of its features could be measured"
        )
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
        registry.StatTest(
            name=CHI2_TWO_SAMPLE,
            display_name="chi-square two-sample p_value",
            allowed_feature_types=[ColumnType.Categorical],
        ),
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
            write_report(html, snapshot, result)
            result.html_path = str(html)
        result.json_path = str(out / f"{stem}.json")
    result.duration_s = time.perf_counter() - started
    if result.json_path:
        atomic_write(Path(result.json_path), json.dumps(finite(result.to_dict()), indent=2))
    return result

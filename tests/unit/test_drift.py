"""Drift statistics: false positives, known shifts, small windows (synthetic request logs), verdicts
per signal group, and the text-content test on real questions (chatterbot-corpus, the dev extra)."""

import argparse
import json

import pandas as pd
import pytest

from loragate.monitoring.commands import moment, summary_text
from loragate.monitoring.drift import DriftConfig, FeatureDrift, run_drift
from loragate.monitoring.driftfeatures import oov_shares
from tests.synthetic import requests_frame
from loragate.monitoring.textdrift import content_drift
from tests.topics import prompts, window
from loragate.monitoring.triggers.policy import TriggerPolicy, decide
from loragate.monitoring.triggers.state import KeyState

PROMPT_FEATURES = {
    "prompt_tokens",
    "prompt_length",
    "prompt_words",
    "prompt_oov_share",
    "cost_micro_usd",
    "prompt_content",
}
LATENCY_FEATURES = {"latency_s", "ttft_s"}
UNSHIFTED = {
    "completion_tokens",
    "finish_reason",
    "fallback",
    "response_length",
    "response_words",
    "response_oov_share",
    "response_content",
    "response_refusal",
    "status_class",
    "prompt_script",
}


@pytest.mark.slow  # 20 drift reports, ~20 s
def test_same_distribution_false_positive_rate_is_low():
    # 20 pairs of independent windows from one distribution (bench/drift_fp_rate.py runs 50
    # and bigger windows). Each p-value test flags ~5% of unchanged columns by design;
    # the dataset verdict (share >= drift_share) should almost never fire.
    # A run drifts when any signal group does; each group has its own threshold.
    pairs, flagged, columns, dataset_drift = 20, 0, 0, 0
    for i in range(pairs):
        result = run_drift(requests_frame(150, seed=100 + 2 * i), requests_frame(150, seed=101 + 2 * i), route="r")
        numerical = [f for f in result.features if f.kind != "text"]
        flagged += sum(f.drifted for f in numerical)
        columns += len(numerical)
        dataset_drift += result.dataset_drift
    assert flagged / columns <= 0.10
    assert dataset_drift <= 1


@pytest.mark.parametrize("rows", [300, 2000])  # below and above the 1,000-row method switch
def test_known_shift_flags_the_shifted_features_only(rows, tmp_path):
    reference = requests_frame(rows, seed=1)
    current = requests_frame(rows, seed=2, prompt_words=30, new_vocabulary=0.4, latency_scale=1.6)
    result = run_drift(reference, current, route="support", variant="v1", out_dir=tmp_path)
    drifted = set(result.drifted_features)
    assert PROMPT_FEATURES | LATENCY_FEATURES <= drifted
    assert not drifted & UNSHIFTED
    assert result.status == "drift" and result.dataset_drift
    verdicts = {g.group: g.status for g in result.groups}
    assert verdicts == {"inputs": "drift", "outputs": "ok", "operations": "drift"}, result.groups
    assert result.group("inputs").reason == "prompt_content drifted"
    large = rows >= 1000
    assert result.feature("prompt_tokens").method == ("wasserstein" if large else "ks")
    assert result.feature("finish_reason").method == ("jensenshannon" if large else "chi2_two_sample")

    summary = json.loads((tmp_path / result.json_path.split("/")[-1]).read_text())
    assert summary["dataset_drift"] is True and summary["status"] == "drift"
    assert summary["drifted_groups"] == ["inputs", "operations"]
    assert {g["group"] for g in summary["groups"]} == {"inputs", "outputs", "operations"}
    for feature in summary["features"]:
        assert set(feature) >= {"feature", "method", "score", "threshold", "drifted"}
        assert feature["drifted"] == FeatureDrift.judge(feature["method"], feature["score"], feature["threshold"])[0]
    assert "<html" in open(result.html_path).read()[:2000].lower()


def test_same_distribution_large_windows_flag_nothing():
    result = run_drift(requests_frame(2000, seed=5), requests_frame(2000, seed=6), route="r")
    assert result.status == "ok" and result.share <= 0.1


def test_judge_direction_follows_the_method():
    assert FeatureDrift.judge("ks", 0.01, 0.05) == (True, "p_value")
    assert FeatureDrift.judge("ks", 0.5, 0.05) == (False, "p_value")
    assert FeatureDrift.judge("wasserstein", 0.3, 0.1) == (True, "distance")
    assert FeatureDrift.judge("jensenshannon", 0.01, 0.1) == (False, "distance")


@pytest.mark.parametrize("ref_rows, cur_rows", [(29, 500), (500, 10), (0, 0)])
def test_insufficient_data_is_a_result_not_an_alarm(ref_rows, cur_rows, tmp_path):
    reference = requests_frame(ref_rows, seed=1) if ref_rows else requests_frame(1, seed=1).iloc[:0]
    current = requests_frame(cur_rows, seed=2) if cur_rows else requests_frame(1, seed=2).iloc[:0]
    result = run_drift(reference, current, route="r", out_dir=tmp_path)
    assert result.status == "insufficient_data" and not result.dataset_drift
    assert result.features == [] and "30 rows" in result.reason
    assert json.loads(open(result.json_path).read())["status"] == "insufficient_data"
    assert result.html_path is None


def test_columns_missing_from_a_training_set_reference_are_left_out():
    # A training set has text only: the text descriptors are compared, nothing else.
    train = requests_frame(400, seed=1)[["prompt_text", "response_text"]]
    result = run_drift(train, requests_frame(400, seed=2, prompt_words=30), route="r")
    assert {f.feature for f in result.features} == {
        "prompt_length",
        "prompt_words",
        "prompt_oov_share",
        "response_length",
        "response_words",
        "response_oov_share",
        "prompt_content",
        "response_content",
        "prompt_script",
        "response_refusal",
    }
    assert {"prompt_length", "prompt_words"} <= set(result.drifted_features)
    assert result.group("operations").status == "insufficient_data" and result.drifted_groups == ["inputs"]


def test_oov_share_scores_the_reference_leave_one_out():
    ref, cur = oov_shares(["a b", "a c", "b c"], ["a b", "zzz a", None])
    assert ref == [0.0, 0.0, 0.0]  # every word is in some other row
    assert cur[:2] == [0.0, 0.5] and cur[2] != cur[2]  # NaN without words
    ref, _ = oov_shares(["a rare", "a b"], [])
    assert ref == [0.5, 0.5]  # "rare" and "b" appear in no other row


# --- verdicts per signal group -----------------------------------------------------------------


def test_latency_noise_is_operations_drift_only_and_a_retraining_policy_ignores_it():
    reference, current = requests_frame(400, seed=11), requests_frame(400, seed=12, latency_scale=2.5)
    current["status"] = [500 if i % 5 == 0 else 200 for i in range(len(current))]
    result = run_drift(reference, current, route="r")
    assert {g.group: g.status for g in result.groups} == {"inputs": "ok", "outputs": "ok", "operations": "drift"}
    assert {"latency_s", "ttft_s", "status_class"} <= set(result.group("operations").drifted_features)
    assert result.status == "drift"

    retrain, ops = (
        TriggerPolicy(groups=["inputs", "outputs"], consecutive_runs=1),
        TriggerPolicy(groups=["operations"], consecutive_runs=1),
    )
    kept = decide(retrain, KeyState(), result, now=1000.0)
    assert not kept.fire and "drifted groups operations" in kept.reason
    assert decide(ops, KeyState(), result, now=1000.0).fire


def test_group_thresholds_and_members_are_configurable_and_checked():
    config = DriftConfig(groups={"operations": {"features": ["latency_s"], "drift_share": 1.0}})
    assert config.group("operations") == (("latency_s",), (), 1.0)
    assert config.group("inputs")[2] == 0.5  # the others keep their defaults
    with pytest.raises(ValueError, match="groups.inputs.features: unknown features"):
        DriftConfig(groups={"inputs": {"features": ["prompt_colour"]}})


# --- text content on real questions --------------------------------------------------------------


def test_a_change_of_topic_at_equal_lengths_is_input_drift_and_the_report_says_what_changed(tmp_path):
    reference = pd.DataFrame({"prompt_text": window(150, seed=1)})
    current = pd.DataFrame({"prompt_text": window(150, seed=2, shifted=1.0)})  # trivia, psychology, small talk
    result = run_drift(reference, current, route="r", out_dir=tmp_path)
    assert result.group("inputs").status == "drift" and result.group("inputs").reason == "prompt_content drifted"
    assert not result.feature("prompt_words").drifted  # same word counts: length alone would not tell
    content = result.content[0]
    assert content.auc > 0.85 and content.auc > content.threshold and content.p_value < 1e-6
    everyday, tech = set(prompts("everyday")), set(prompts("tech"))
    assert content.current_examples and all(e in everyday for e in content.current_examples)
    assert content.reference_examples and all(e in tech for e in content.reference_examples)
    assert all(t.current_share > t.reference_share for t in content.current_terms)
    assert all(t.reference_share > t.current_share for t in content.reference_terms)
    assert {"write", "computer"} & {t.term for t in content.reference_terms}
    html = open(result.html_path).read()
    assert "Text content: prompt_text" in html and content.current_terms[0].term in html
    assert "prompt_content drifted" in summary_text(result)


@pytest.mark.parametrize("rows", [150, 1000])
def test_same_population_content_stays_quiet(rows):
    # 10 pairs of independent windows from one population (bench/drift_topics.py runs 50).
    results = [content_drift(window(rows, seed=500 + 2 * i), window(rows, seed=501 + 2 * i)) for i in range(10)]
    assert sum(r.drifted for r in results) <= 1
    assert 0.45 < sum(r.auc for r in results) / len(results) < 0.55


def test_half_the_window_on_another_topic_is_detected_and_tiny_windows_are_not_judged():
    found = content_drift(window(300, seed=7), window(300, seed=8, shifted=0.5))
    assert found.drifted and 0.6 < found.auc < 0.9  # half the rows are indistinguishable
    assert content_drift(window(20, seed=7), window(400, seed=8, shifted=1.0), min_rows=30) is None


# --- command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1764547200", "2025-12-01T00:00:00+00:00"),
        ("1764547200.5", "2025-12-01T00:00:00.500000+00:00"),
        ("2025-12-01T01:00:00+01:00", "2025-12-01T00:00:00+00:00"),
        ("2025-12-01T00:00:00Z", "2025-12-01T00:00:00+00:00"),
        ("2025-12-01 00:00", "2025-12-01T00:00:00+00:00"),
    ],
)
def test_times_are_unix_seconds_or_iso(text, expected):
    assert moment(text).isoformat() == expected


def test_a_bad_time_names_both_forms():
    with pytest.raises(argparse.ArgumentTypeError, match="unix seconds .* or ISO"):
        moment("yesterday")

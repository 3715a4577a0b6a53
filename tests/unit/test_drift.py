"""Drift statistics on synthetic request logs: false positives, known shifts, small windows."""

import json

import pytest

from loragate.monitoring.drift import DriftConfig, FeatureDrift, oov_shares, run_drift
from loragate.monitoring.synthetic import requests_frame

PROMPT_FEATURES = {"prompt_tokens", "prompt_length", "prompt_words", "prompt_oov_share", "cost_micro_usd"}
LATENCY_FEATURES = {"latency_s", "ttft_s"}
UNSHIFTED = {"completion_tokens", "finish_reason", "fallback", "response_length", "response_words",
             "response_oov_share"}


def test_same_distribution_false_positive_rate_is_low():
    # 20 pairs of independent windows from one distribution (bench/drift_fp_rate.py runs 50
    # and bigger windows). Each p-value test flags ~5% of unchanged columns by design;
    # the dataset verdict (share >= drift_share) should almost never fire.
    pairs, flagged, columns, dataset_drift = 20, 0, 0, 0
    for i in range(pairs):
        result = run_drift(requests_frame(150, seed=100 + 2 * i), requests_frame(150, seed=101 + 2 * i),
                           route="r", config=DriftConfig(drift_share=0.3))
        flagged += len(result.drifted_features)
        columns += len(result.features)
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
    large = rows >= 1000
    assert result.feature("prompt_tokens").method == ("wasserstein" if large else "ks")
    assert result.feature("finish_reason").method == ("jensenshannon" if large else "chi2_two_sample")

    summary = json.loads((tmp_path / result.json_path.split("/")[-1]).read_text())
    assert summary["dataset_drift"] is True and summary["status"] == "drift"
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
        "prompt_length", "prompt_words", "prompt_oov_share", "response_length", "response_words", "response_oov_share"}
    assert {"prompt_length", "prompt_words"} <= set(result.drifted_features)


def test_oov_share_scores_the_reference_leave_one_out():
    ref, cur = oov_shares(["a b", "a c", "b c"], ["a b", "zzz a", None])
    assert ref == [0.0, 0.0, 0.0]  # every word is in some other row
    assert cur[:2] == [0.0, 0.5] and cur[2] != cur[2]  # NaN without words
    ref, _ = oov_shares(["a rare", "a b"], [])
    assert ref == [0.5, 0.5]  # "rare" and "b" appear in no other row

"""Alert rules (promtool check / unit tests), the Prometheus config, and the Grafana dashboards."""

from __future__ import annotations

import importlib.util
import re
import subprocess

import pytest

from tests.deploy.promql import DASHBOARDS, RULES, dashboards, rule_groups
from tests.deploy.tools import tool
from tests.processes import ROOT

PROMETHEUS = ROOT / "deploy" / "prometheus"
BOARDS = {"loragate-gateway.json", "loragate-rollouts.json", "loragate-drift.json", "loragate-vllm.json"}


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_generated_files_are_up_to_date():
    """Dashboards JSON from deploy/grafana/dashboards.py, and the chart's copies of dashboards and rules."""
    spec = importlib.util.spec_from_file_location("deploy_build", ROOT / "deploy" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.stale_files() == [], "run: python deploy/build.py"


def test_chart_dashboards_equal_deploy_grafana():
    chart = {p.name: p.read_bytes() for p in (ROOT / "helm" / "loragate" / "dashboards").glob("*.json")}
    assert chart == {p.name: p.read_bytes() for p in DASHBOARDS.glob("*.json")}
    assert set(chart) == BOARDS


def test_promtool_check_rules():
    files = sorted(str(p) for p in RULES.glob("*.yml"))
    assert files
    output = _run(tool("promtool"), "check", "rules", *files)
    assert "SUCCESS" in output


def test_promtool_rule_unit_tests():
    files = sorted(str(p) for p in (PROMETHEUS / "tests").glob("*.yml"))
    assert files
    _run(tool("promtool"), "test", "rules", *files)


def test_every_alert_has_a_unit_test_and_the_required_alerts_exist():
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    assert {
        "LoragateHighErrorRate",
        "LoragateFallbackSpike",
        "LoragateLatencySLOBurnFast",
        "LoragateLatencySLOBurnSlow",
        "LoragateUpstreamDown",
        "LoragateCircuitOpen",
        "LoragateDriftDetected",
        "LoragateRequestLogDrops",
        "LoragateRolloutRolledBack",
        "LoragateRolloutStuck",
    } <= alerts
    tested = set(re.findall(r"alertname: (\w+)", "".join(p.read_text() for p in (PROMETHEUS / "tests").glob("*.yml"))))
    untested = (
        alerts
        - tested
        - {
            "LoragateLatencySLOBurnSlow",
            "LoragateAdapterLoadFailures",
            "LoragateEngineKVCacheFull",
            "LoragateRetrainingTriggerFailing",
        }
    )
    assert not untested
    for group in rule_groups():
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("warning", "critical")
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_promtool_check_config():
    _run(tool("promtool"), "check", "config", "--syntax-only", str(PROMETHEUS / "prometheus.yml"))


def test_dashboards_parse_and_every_panel_has_targets():
    boards = dashboards()
    assert set(boards) == BOARDS
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        variables = {v["name"] for v in board["templating"]["list"]}
        assert "datasource" in variables, name
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{name}: {panel['title']} has no targets"
            assert panel["datasource"]["uid"] == "${datasource}"
            assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            for target in panel["targets"]:
                assert target["expr"].strip(), f"{name}: {panel['title']}"
                used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", target["expr"])) - {"__rate_interval", "__range"}
                assert used <= variables, f"{name}: {panel['title']} uses undefined {used - variables}"


@pytest.mark.parametrize(
    "board, needles",
    [
        (
            "loragate-gateway.json",
            [
                "loragate_request_duration_seconds_bucket",
                "loragate_time_to_first_token_seconds_bucket",
                "loragate_time_per_output_token_seconds_bucket",
                "loragate_reference_cost_usd_total",
                "loragate_fallbacks_total",
                "loragate_requests_in_flight",
                "loragate_upstream_healthy",
                "loragate_adapter_loads_total",
                "histogram_quantile(0.99",
                "loragate_admission_waiting_requests",
                "loragate_admission_shed_total",
                "loragate_admission_wait_seconds_bucket",
            ],
        ),
        (
            "loragate-rollouts.json",
            [
                "loragate_rollout_weight",
                "$canary",
                "$stable",
                "loragate_rollout_state",
                "loragate_rollout_step",
                "loragate_rollout_transitions_total",
                'check="fallback_rate"',
                'check="error_rate"',
                'check="latency"',
                'figure="lower"',
                "loragate_rollout_decision",
                "loragate_rollout_stalled",
            ],
        ),
        (
            "loragate-drift.json",
            [
                "loragate_drift_share",
                "loragate_drift_detected",
                "loragate_drift_feature_score",
                "loragate_retraining_triggers_total",
            ],
        ),
        (
            "loragate-vllm.json",
            [
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc",
                "vllm:generation_tokens_total",
                "vllm:prompt_tokens_total",
                "vllm:e2e_request_latency_seconds_bucket",
                "vllm:time_to_first_token_seconds_bucket",
            ],
        ),
    ],
)
def test_dashboards_cover_what_they_promise(board, needles):
    exprs = " ".join(t["expr"] for p in dashboards()[board]["panels"] for t in p.get("targets", []))
    for needle in needles:
        assert needle in exprs, f"{board} lacks {needle}"

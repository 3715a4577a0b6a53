"""Every PromQL expression of the dashboards and alert rules, evaluated by a real Prometheus that
scrapes the real gateway and the real vLLM under test traffic.

The drift series come from a real ``loragate monitor`` (scrape job ``loragate-monitor``) that
checks one route/variant of the second gateway's request log against a small JSONL reference
every two seconds, with a policy that fires its (dataset) retraining action on every run, and
the rollout series from a rollout of the ``split`` route's v2 over v1 analysed every second. The
monitor writes its weights to a copy of the routes file (the session gateway's own routes, which
other tests rely on, are not moved).

Each expression must parse and return data. Alert expressions are evaluated with their
comparisons turned into ``bool`` ones (so they return their series whether or not the threshold
is crossed); where a label filter selects series that only exist after a failure (e.g. reloads
with result="error", failing retraining triggers), the metrics the rule reads must exist.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.promql import (
    Expression,
    boolify,
    dashboard_expressions,
    label_values_query,
    rule_expressions,
    substitute,
)
from tests.processes import Service, free_port, shipped_rules_every_second, start_gateway, start_prometheus, wait_http

pytestmark = pytest.mark.integration
HELLO = [{"role": "user", "content": "Tell me about the weather today."}]
# The route/variant the monitor checks: the logging gateway gets MONITORED_REQUESTS of it.
MONITORED = ("adapter", "a1")
MONITORED_REQUESTS = 4
# Series a gateway exports only for what its deployment configures: spend budgets need keys with budgets,
# which these gateways (no keys file) have not. Their alert is tested by promtool (deploy/prometheus/tests).
CONFIGURED_ONLY = {"loragate_budget_spent_usd", "loragate_budget_limit_usd"}


def _query(prometheus: str, expr: str) -> dict:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400/422: the expression does not parse or evaluate
        return json.loads(exc.read())


def _wait_for(prometheus: str, expr: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _query(prometheus, expr).get("data", {}).get("result"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus never returned data for {expr}")


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def _send_traffic(gateway: str, logging_gateway: str) -> None:
    def chat(model: str, i: int, stream: bool = False, url: str = gateway) -> str:
        body = {"model": model, "messages": HELLO, "max_tokens": 8, "temperature": 0}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        headers = {"x-user-id": f"user-{i}"}
        with httpx.Client(timeout=60) as client:
            if stream:
                with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
                    for _ in resp.iter_bytes():
                        pass
            else:
                resp = client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            return resp.headers.get("x-request-id", "")

    jobs = [(model, i, i % 3 == 0) for i in range(8) for model in ("adapter", "base", "split")]
    jobs += [("split", 100 + i, True) for i in range(8)]  # sticky users spread over v1 and v2
    jobs += [
        ("lazy", 200, False),
        ("lazy", 201, True),
        ("broken", 300, False),
        ("broken", 301, True),
        ("no-such-route", 400, False),
    ]
    jobs += [(MONITORED[0], 600 + i, i % 2 == 0, logging_gateway) for i in range(MONITORED_REQUESTS)]
    # Shadow traffic (a2 shadows a1): the gateway series, a same_variant drop (pinned to the shadow), and
    # logged pairs with repeated prompts (the noise floor) for the monitor's shadow comparison.
    jobs += [("shadowed", 700 + i, i % 2 == 0) for i in range(4)] + [("shadowed:v2", 710, False)]
    jobs += [("shadowed", 720 + i, i % 2 == 0, logging_gateway) for i in range(6)]
    jobs += [("split", 500 + i, i % 2 == 0, logging_gateway) for i in range(8)]  # last: feedback below
    with ThreadPoolExecutor(max_workers=6) as pool:
        request_ids = list(pool.map(lambda job: chat(*job), jobs))
    # Feedback (needs the request log): loragate_feedback_total{label}.
    with httpx.Client(timeout=30) as client:
        for request_id, label in zip(request_ids[-8:], ["good", "bad"] * 4):
            resp = client.post(
                f"{logging_gateway}/v1/feedback",
                json={"request_id": request_id, "label": label, "score": 1.0 if label == "good" else 0.0},
            )
            assert resp.status_code == 200, resp.text


def _routes_file(tmp_path_factory) -> Path:
    found = [
        path
        for path in sorted(tmp_path_factory.getbasetemp().glob("gateway[0-9]*/routes.yaml"))
        if "broken:" in path.read_text()
    ]
    if not found:
        pytest.fail("cannot find the routes file of the `gateway` fixture")
    return found[0]


def _touch(path: Path) -> None:
    """Same content, new mtime: the gateways reload it (loragate_catalog_reloads_total)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def _monitor_config(directory: Path, request_log: Path, prometheus: str, port: int, routes: Path, engine: str) -> Path:
    """``loragate monitor`` config: MONITORED against a small JSONL training-set stand-in, every 2 s;
    every run with data fires the dataset export (so the trigger counter has a series); and a
    rollout of split/v2 over split/v1 analysed every second (its adapter probed on the engine), on a copy
    of ``routes``."""
    reference = directory / "reference.jsonl"
    topics = ["the invoice total", "a refund for order 42", "the delivery address", "my password reset"]
    reference.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Please help me with {topics[i % 4]}, ticket {i}."},
                        {"role": "assistant", "content": f"Sure, here is how to handle {topics[i % 4]}."},
                    ]
                }
            )
            + "\n"
            for i in range(12)
        )
    )
    routes_copy = directory / "routes.yaml"
    routes_copy.write_text(routes.read_text())
    config = {
        "request_log": str(request_log),
        "prometheus_url": prometheus,
        "output_dir": str(directory / "reports"),
        "state_file": str(directory / "state.json"),
        "interval_s": 2,
        "port": port,
        "drift": {"min_rows": 3},
        "checks": [
            {
                "route": MONITORED[0],
                "variant": MONITORED[1],
                "window_s": 900,
                "reference": {"path": str(reference)},
                "prometheus_step_s": 5,
                "policy": {"drift_share_above": -1, "consecutive_runs": 1, "cooldown_s": 0},
                "actions": [{"type": "dataset", "location": str(directory / "datasets")}],
            }
        ],
        "rollouts": {
            "routes_file": str(routes_copy),
            "state_file": str(directory / "rollouts.json"),
            "canaries": [
                {"route": "split", "stable": "v1", "canary": "v2", "interval_s": 1, "probe": {"engines": [engine]}}
            ],
        },
        "shadows": {"interval_s": 1, "window_s": 900},
    }
    path = directory / "monitor.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _start_monitor(config: Path, port: int) -> Service:
    log = config.parent / "monitor.log"
    service = Service([sys.executable, "-m", "loragate", "monitor", "--config", str(config)], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", service.process, 60, log)
    except Exception:
        service.stop()
        raise
    return service


def _wait_for_monitor_run(port: int, timeout_s: float = 60) -> None:
    """Until the monitor's own /metrics counts a finished drift run with data (ok or drift)."""
    route, variant = MONITORED
    wanted = [f'loragate_drift_runs_total{{route="{route}",status="{s}",variant="{variant}"}}' for s in ("ok", "drift")]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        if any(line.startswith(w) for line in text.splitlines() for w in wanted):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no drift run with data for {route}/{variant} in {timeout_s}s:\n{text}")


@pytest.fixture(scope="module")
def prometheus(gateway, engine, tmp_path_factory) -> str:
    """Prometheus scraping vLLM, the session gateway, a second gateway (same engine, same routes)
    with the request log on, for the request-log and feedback series, and a real ``loragate
    monitor`` reading that request log, for the drift and retraining-trigger series."""
    directory = tmp_path_factory.mktemp("prometheus")
    routes = _routes_file(tmp_path_factory)
    request_log = directory / "requestlog"
    logging_gateway, logging_url = start_gateway(
        routes,
        [engine],
        directory / "gateway-requestlog.log",
        extra_env={"LORAGATE_REQUEST_LOG_URL": str(request_log), "LORAGATE_REQUEST_LOG_FLUSH_INTERVAL_S": "1"},
    )
    monitor_port = free_port()
    service, url = start_prometheus(
        {
            "loragate-gateway": [_host(gateway), _host(logging_url)],
            "vllm": [_host(engine)],
            "loragate-monitor": [f"127.0.0.1:{monitor_port}"],
        },
        directory,
        rule_files=shipped_rules_every_second(directory),
        scrape_interval_s=1,
    )
    monitor = None
    try:
        monitor_dir = directory / "monitor"
        monitor_dir.mkdir()
        monitor = _start_monitor(
            _monitor_config(monitor_dir, request_log, url, monitor_port, routes, engine), monitor_port
        )
        # Scraped at least once before the traffic, so rate() and increase() see it.
        _wait_for(url, 'count(up{job=~"loragate-gateway|vllm|loragate-monitor"} == 1) == 4')
        _send_traffic(gateway, logging_url)
        _touch(routes)
        _wait_for(url, "loragate_catalog_reloads_total", timeout_s=15)
        _wait_for(url, "sum(increase(loragate_time_to_first_token_seconds_count[1m])) > 0")
        _wait_for(url, 'loragate_requestlog_records_total{result="written"}', timeout_s=15)
        _wait_for_monitor_run(monitor_port)
        _wait_for(url, 'loragate_drift_share{job="loragate-monitor"}', timeout_s=15)
        # Two scrapes of the trigger counter, so increase() over it has data.
        _wait_for(url, "count_over_time(loragate_retraining_triggers_total[1m]) > 1", timeout_s=15)
        # A rollout analysis of split (every second), and two scrapes of its decisions counter.
        _wait_for(
            url, 'loragate_rollout_analysis{job="loragate-monitor", check="error_rate", figure="samples"}', timeout_s=15
        )
        _wait_for(url, "count_over_time(loragate_rollout_transitions_total[1m]) > 1", timeout_s=15)
        _wait_for(url, 'loragate_shadow_noise_floor_similarity_ratio{job="loragate-monitor"}', timeout_s=15)
        time.sleep(3)  # a few more scrapes and rule evaluations
        yield url
    finally:
        if monitor is not None:
            monitor.stop()
        service.stop()
        logging_gateway.stop()


def _evaluate(prometheus: str, item: Expression) -> tuple[str, str]:
    """-> (outcome, detail); outcome is "ok" or "failed"."""
    if item.kind == "variable":
        expr = substitute(label_values_query(item.expr))
    elif item.kind == "alert":
        expr = boolify(substitute(item.expr))
    else:
        expr = substitute(item.expr)
    answer = _query(prometheus, expr)
    if answer.get("status") != "success":
        return "failed", f"does not evaluate: {answer.get('error')}\n    {expr}"
    if answer["data"]["result"]:
        return "ok", ""
    if item.kind == "alert":
        missing = [
            m for m in sorted(item.metrics) if not _query(prometheus, f'count({{__name__="{m}"}})')["data"]["result"]
        ]
        if not missing:
            return "ok", "the metrics exist; the series its filter selects appear on failures only"
        if set(missing) <= CONFIGURED_ONLY:
            return "ok", "its metrics appear only where the feature is configured (promtool unit tests cover it)"
        return "failed", f"no data, missing metrics {missing}\n    {expr}"
    return "failed", f"returns no data\n    {expr}"


def test_every_dashboard_and_rule_expression_returns_data(prometheus):
    expressions = dashboard_expressions() + rule_expressions()
    assert len(expressions) > 80
    results = {item: _evaluate(prometheus, item) for item in expressions}
    failed = sorted(f"{item.source}: {detail}" for item, (outcome, detail) in results.items() if outcome == "failed")
    print(f"\n{len(expressions)} expressions: {len(expressions) - len(failed)} return data, {len(failed)} failed")
    assert not failed, "\n".join(failed)


def test_rules_evaluate_without_errors(prometheus):
    with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10) as resp:
        groups = json.loads(resp.read())["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(rule_expressions())
    broken = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] not in ("ok", "unknown")]
    assert not broken
    # The recording rules the SLO alerts read produce a 0 ratio (not no data) for healthy routes.
    answer = _query(prometheus, 'loragate:request_errors:ratio_rate5m{route="adapter"}')
    assert [float(r["value"][1]) for r in answer["data"]["result"]] == [0.0]


def test_fallback_and_vllm_series_come_from_the_real_processes(prometheus):
    fallbacks = _query(prometheus, 'sum by (reason) (increase(loragate_fallbacks_total{route="broken"}[1m]))')
    assert fallbacks["data"]["result"], "the broken route should have fallen back"
    running = _query(prometheus, 'vllm:num_requests_running{job="vllm"}')
    assert running["data"]["result"] and running["data"]["result"][0]["metric"]["model_name"] == "base"


def test_drift_series_come_from_the_real_monitor(prometheus):
    """The drift dashboard's and rules' series are the monitor's: its scrape job, the checked
    route/variant, a completed run, features, and a retraining action that succeeded."""
    route, variant = MONITORED
    labels = f'job="loragate-monitor", route="{route}", variant="{variant}"'
    share = _query(prometheus, f"loragate_drift_share{{{labels}}}")["data"]["result"]
    assert len(share) == 1 and 0 <= float(share[0]["value"][1]) <= 1
    features = _query(prometheus, f"count(loragate_drift_feature_score{{{labels}}})")["data"]["result"]
    assert features and int(features[0]["value"][1]) >= 2
    triggers = _query(prometheus, f"loragate_retraining_triggers_total{{{labels}}}")["data"]["result"]
    assert {(r["metric"]["action"], r["metric"]["result"]) for r in triggers} == {("dataset", "ok")}


def test_rollout_series_come_from_the_real_monitor(prometheus):
    """The rollouts dashboard's and rules' monitor series: one state at a time, a step, analysis values."""
    labels = 'job="loragate-monitor", route="split", canary="v2"'
    states = _query(prometheus, f"loragate_rollout_state{{{labels}}}")["data"]["result"]
    assert {r["metric"]["state"] for r in states} == {"progressing", "promoted", "rolled_back"}
    assert sum(float(r["value"][1]) for r in states) == 1
    step = _query(prometheus, f"loragate_rollout_step{{{labels}}}")["data"]["result"]
    assert step and float(step[0]["value"][1]) in (0, 5, 25, 50, 100)
    checks = _query(prometheus, f"loragate_rollout_analysis{{{labels}}}")["data"]["result"]
    assert {r["metric"]["check"] for r in checks} == {"error_rate", "fallback_rate", "latency", "latency_tail"}
    assert {r["metric"]["figure"] for r in checks} == {
        "estimate",
        "lower",
        "upper",
        "min_effect",
        "samples",
        "min_samples",
    }
    decisions = _query(prometheus, f"loragate_rollout_decision{{{labels}}}")["data"]["result"]
    assert {r["metric"]["check"] for r in decisions} == {
        "analysis",
        "error_rate",
        "fallback_rate",
        "latency",
        "latency_tail",
    }

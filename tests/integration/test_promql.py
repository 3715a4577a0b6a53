"""Every PromQL expression of the dashboards and alert rules, evaluated by a real Prometheus that
scrapes the real gateway and the real vLLM under test traffic.

Each expression must parse and return data. Alert expressions are evaluated with their
comparisons turned into ``bool`` ones (so they return their series whether or not the threshold
is crossed); where a label filter selects series that only exist after a failure (e.g. reloads
with result="error"), the metrics the rule reads must exist. Expressions over metrics of
components still being built are listed as waiting on that component, not failed.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.promql import (
    PENDING,
    RULES,
    Expression,
    boolify,
    dashboard_expressions,
    label_values_query,
    rule_expressions,
    substitute,
)
from tests.processes import start_gateway, start_prometheus

pytestmark = pytest.mark.integration
HELLO = [{"role": "user", "content": "Tell me about the weather today."}]


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


def _rules_for_test(directory: Path) -> list[Path]:
    """The shipped rule files with group intervals dropped, so they evaluate every second here."""
    paths = []
    for path in sorted(RULES.glob("*.yml")):
        data = yaml.safe_load(path.read_text())
        for group in data["groups"]:
            group.pop("interval", None)
        copy = directory / path.name
        copy.write_text(yaml.safe_dump(data, sort_keys=False))
        paths.append(copy)
    return paths


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
    jobs += [("lazy", 200, False), ("lazy", 201, True), ("broken", 300, False), ("broken", 301, True),
             ("no-such-route", 400, False)]
    jobs += [("split", 500 + i, i % 2 == 0, logging_gateway) for i in range(8)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        request_ids = list(pool.map(lambda job: chat(*job), jobs))
    # Feedback (needs the request log): loragate_feedback_total{label}.
    with httpx.Client(timeout=30) as client:
        for request_id, label in zip(request_ids[-8:], ["good", "bad"] * 4):
            resp = client.post(f"{logging_gateway}/v1/feedback", json={"request_id": request_id, "label": label,
                                                                       "score": 1.0 if label == "good" else 0.0})
            assert resp.status_code == 200, resp.text


def _routes_file(tmp_path_factory) -> Path:
    found = [path for path in sorted(tmp_path_factory.getbasetemp().glob("gateway[0-9]*/routes.yaml"))
             if "broken:" in path.read_text()]
    if not found:
        pytest.fail("cannot find the routes file of the `gateway` fixture")
    return found[0]


def _touch(path: Path) -> None:
    """Same content, new mtime: the gateways reload it (loragate_catalog_reloads_total)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.fixture(scope="module")
def prometheus(gateway, engine, tmp_path_factory) -> str:
    """Prometheus scraping vLLM, the session gateway, and a second gateway (same engine, same routes)
    with the request log on, for the request-log and feedback series."""
    directory = tmp_path_factory.mktemp("prometheus")
    routes = _routes_file(tmp_path_factory)
    logging_gateway, logging_url = start_gateway(
        routes, [engine], directory / "gateway-requestlog.log",
        extra_env={"LORAGATE_REQUEST_LOG_URL": str(directory / "requestlog"),
                   "LORAGATE_REQUEST_LOG_FLUSH_INTERVAL_S": "1"})
    service, url = start_prometheus({"loragate-gateway": [_host(gateway), _host(logging_url)], "vllm": [_host(engine)]},
                                    directory, rule_files=_rules_for_test(directory), scrape_interval_s=1)
    try:
        # Scraped at least once before the traffic, so rate() and increase() see it.
        _wait_for(url, 'count(up{job=~"loragate-gateway|vllm"} == 1) == 3')
        _send_traffic(gateway, logging_url)
        _touch(routes)
        _wait_for(url, "loragate_catalog_reloads_total", timeout_s=15)
        _wait_for(url, "sum(increase(loragate_time_to_first_token_seconds_count[1m])) > 0")
        _wait_for(url, 'loragate_requestlog_records_total{result="written"}', timeout_s=15)
        time.sleep(3)  # a few more scrapes and rule evaluations
        yield url
    finally:
        service.stop()
        logging_gateway.stop()


def _evaluate(prometheus: str, item: Expression) -> tuple[str, str]:
    """-> (outcome, detail); outcome is "ok", "waiting" or "failed"."""
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
        missing = [m for m in sorted(item.metrics) if not _query(prometheus, f'count({{__name__="{m}"}})')["data"]["result"]]
        if not missing:
            return "ok", "the metrics exist; the series its filter selects appear on failures only"
        if all(m in PENDING for m in missing):
            return "waiting", f"waiting on {', '.join(sorted(item.pending_on))}: no {missing}"
        return "failed", f"no data, missing metrics {missing}\n    {expr}"
    if item.pending_on:
        return "waiting", f"waiting on {', '.join(sorted(item.pending_on))}"
    return "failed", f"returns no data\n    {expr}"


def test_every_dashboard_and_rule_expression_returns_data(prometheus):
    expressions = dashboard_expressions() + rule_expressions()
    assert len(expressions) > 80
    results = {item: _evaluate(prometheus, item) for item in expressions}
    waiting = sorted(f"{item.source}: {detail}" for item, (outcome, detail) in results.items() if outcome == "waiting")
    failed = sorted(f"{item.source}: {detail}" for item, (outcome, detail) in results.items() if outcome == "failed")
    print(f"\n{len(expressions)} expressions: {len(expressions) - len(waiting) - len(failed)} return data, "
          f"{len(waiting)} waiting on other components, {len(failed)} failed")
    print("EXPRESSIONS WAITING ON A COMPONENT:\n  " + "\n  ".join(waiting))
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

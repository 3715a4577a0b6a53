"""Rollouts end to end on real parts: a real gateway in front of a STUB upstream (tests/stub_upstream.py,
not vLLM: its adapter names choose its behaviour), a real Prometheus scraping the gateway and the
monitor every second with the shipped alert rules, and a real ``loragate monitor`` whose rollouts
rewrite the routes file the gateway watches.

Two rollouts run side by side, on two routes of one routes file, under a bounded background load:

* A, ``canary-ok``: the canary adapter is healthy -> 5 -> 25 -> 50 -> promoted (canary 100 %),
  and the gateway's loragate_rollout_weight follows each step;
* B, ``canary-bad``: the canary adapter is ``fail-500``. The gateway falls back to the base model,
  so clients only ever see 200s; the analysis sees the canary's fallbacks and rolls back within
  one or two analysis intervals (canary 0 %), and LoragateRolloutRolledBack fires.

A third route is never touched.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter

import httpx
import pytest
import yaml

from loragate.common.catalog import parse_catalog
from tests.metrics_text import sample_sum, scrape
from tests.processes import (
    Service,
    free_port,
    shipped_rules_every_second,
    start_gateway,
    start_prometheus,
    start_stub,
    wait_http,
)

pytestmark = pytest.mark.integration
INTERVAL_S = 3.0
STEPS = [5, 25, 50, 100]
ROUTES = """\
# Rollout e2e routes (the monitor rewrites the weights of canary-ok and canary-bad).
routes:
  canary-ok:
    variants:
      - {name: v1, adapter: good-v1, path: /adapters/good-v1, weight: 100}
      - {name: v2, adapter: good-v2, path: /adapters/good-v2, weight: 0}
    fallback: [base]
  canary-bad:
    variants:
      - {name: v1, adapter: good-v1, path: /adapters/good-v1, weight: 100}
      - {name: v2, adapter: fail-500-v2, path: /adapters/fail-500-v2, weight: 0}
    fallback: [base]
  bystander:
    sticky_key: x-user-id
    variants:
      - {name: base, weight: 1}
    pricing: {prompt_per_1k: 0.001}
"""


class LoadLoop:
    """Chat requests to the gateway on loopback from a background thread, ``concurrency`` at a time,
    until stopped, ``max_requests`` were sent or ``max_s`` passed. Counts statuses per route."""

    def __init__(self, url: str, routes: list[str], *, concurrency: int = 8, max_requests: int = 30_000,
                 max_s: float = 75) -> None:
        assert urllib.parse.urlsplit(url).hostname == "127.0.0.1"
        self.url, self.routes, self.concurrency = url, routes, concurrency
        self.max_requests, self.max_s = max_requests, max_s
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> "LoadLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}

        async def worker(client: httpx.AsyncClient, index: int) -> None:
            while not self._stop.is_set() and self.sent < self.max_requests and time.monotonic() < deadline:
                route = self.routes[(self.sent + index) % len(self.routes)]
                self.sent += 1
                try:
                    resp = await client.post(f"{self.url}/v1/chat/completions", json={"model": route, **body})
                    self.statuses[(route, resp.status_code)] += 1
                except httpx.HTTPError:
                    self.statuses[(route, 0)] += 1

        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(*(worker(client, i) for i in range(self.concurrency)))


def _query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["data"]["result"]


def _wait_query(prometheus: str, expr: str, results: int = 1, timeout_s: float = 15) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = _query(prometheus, expr)
        if len(found) >= results or time.monotonic() > deadline:
            assert len(found) >= results, f"Prometheus: {expr} -> {found}"
            return found
        time.sleep(0.5)


def _healthz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        return json.loads(resp.read())["rollouts"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rollout-e2e")
    routes = directory / "routes.yaml"
    routes.write_text(ROUTES)
    started: list[Service] = []
    try:
        stub, stub_url = start_stub(directory / "stub.log")
        started.append(stub)
        gateway, url = start_gateway(routes, [stub_url], directory / "gateway.log")
        started.append(gateway)
        monitor_port = free_port()
        prometheus, prometheus_url = start_prometheus(
            {"loragate-gateway": [urllib.parse.urlsplit(url).netloc], "loragate-monitor": [f"127.0.0.1:{monitor_port}"]},
            directory, rule_files=shipped_rules_every_second(directory), scrape_interval_s=1)
        started.append(prometheus)
        canary = {"stable": "v1", "canary": "v2", "steps": STEPS, "interval_s": INTERVAL_S, "min_requests": 5}
        config = directory / "monitor.yaml"
        config.write_text(yaml.safe_dump({
            "request_log": str(directory / "requestlog"),  # no drift checks here: only rollouts
            "prometheus_url": prometheus_url,
            "state_file": str(directory / "monitor-state.json"),
            "interval_s": 600,
            "port": monitor_port,
            "rollouts": {"routes_file": str(routes), "state_file": str(directory / "rollouts.json"),
                         "canaries": [{"route": "canary-ok", **canary}, {"route": "canary-bad", **canary}]},
        }, sort_keys=False))
        yield {"directory": directory, "routes": routes, "url": url, "prometheus": prometheus_url,
               "config": config, "monitor_port": monitor_port, "services": started}
    finally:
        for service in reversed(started):
            service.stop()


def test_rollouts_promote_a_healthy_canary_and_roll_back_a_failing_one(setup):
    url, port, prometheus = setup["url"], setup["monitor_port"], setup["prometheus"]
    begun = time.monotonic()
    with LoadLoop(url, ["canary-ok", "canary-bad", "bystander"]) as load:
        # Traffic flows, and Prometheus has scraped it (its first scrapes come a few seconds after
        # it starts), before the rollouts start.
        _wait_query(prometheus, 'up{job="loragate-monitor"} == 0')  # the monitor is not started yet
        _wait_query(prometheus, 'sum(rate(loragate_requests_total{route="canary-bad",variant="v1"}[5s])) > 0')
        log = setup["directory"] / "monitor.log"
        monitor = Service([sys.executable, "-m", "loragate", "monitor", "--config", str(setup["config"])], log)
        setup["services"].append(monitor)
        wait_http(f"http://127.0.0.1:{port}/healthz", monitor.process, 60, log)

        # The gateway's own view of the canary weights while the rollouts run.
        seen: dict[str, list[float]] = {"canary-ok": [], "canary-bad": []}
        deadline = time.monotonic() + 12 * INTERVAL_S
        status = {}
        while time.monotonic() < deadline:
            text = scrape(url)
            for route, values in seen.items():
                weight = sample_sum(text, "loragate_rollout_weight", route=route, variant="v2")
                if not values or values[-1] != weight:
                    values.append(weight)
            status = _healthz(port)
            if (status["canary-ok"].get("state"), status["canary-bad"].get("state")) == ("promoted", "rolled_back") \
                    and seen["canary-ok"][-1] == 1.0 and seen["canary-bad"][-1] == 0.0:
                break
            time.sleep(0.2)
        sent_during_rollouts = load.sent

    ok, bad = status["canary-ok"], status["canary-bad"]
    assert ok["state"] == "promoted", json.dumps(ok, indent=1) + log.read_text()[-3000:]
    assert bad["state"] == "rolled_back", json.dumps(bad, indent=1) + log.read_text()[-3000:]

    # A: every step in order (holds for too little traffic allowed), then promotion.
    moves = [(h["action"], h["weight"]) for h in ok["history"] if h["action"] != "hold"]
    assert moves == [("step", 5), ("step", 25), ("step", 50), ("promote", 100)], ok["history"]
    # The gateway reloaded the routes file at each step: its canary weight went 0.05 -> 0.25 -> 0.5 -> 1.
    assert [w for w in seen["canary-ok"] if w] == [0.05, 0.25, 0.5, 1.0], seen

    # B: rolled back on a failing analysis within two analysis intervals of its start.
    (started,) = [h["at"] for h in bad["history"] if h["action"] == "step"]
    (rolled_back,) = [h for h in bad["history"] if h["action"] == "rollback"]
    assert rolled_back["at"] - started <= 2 * INTERVAL_S + 1.5, bad["history"]
    assert "fallback_rate" in bad["last_analysis"]["failed"] and bad["last_analysis"]["values"]["fallback_rate"] > 0.5
    assert seen["canary-bad"][-1] == 0.0 and 0.05 in seen["canary-bad"], seen
    # The fallback hid the failing canary from the clients: they only saw 200s.
    assert {status for (route, status) in load.statuses if route == "canary-bad"} == {200}, load.statuses

    # The routes file: valid, the canaries' weights moved, the bystander untouched.
    text = setup["routes"].read_text()
    assert text.startswith("# Rollout e2e routes")
    catalog = parse_catalog(text)
    assert {v.name: v.weight for v in catalog.routes["canary-ok"].variants} == {"v1": 0, "v2": 100, "base": 0}
    assert {v.name: v.weight for v in catalog.routes["canary-bad"].variants} == {"v1": 100, "v2": 0, "base": 0}
    assert yaml.safe_load(text)["routes"]["bystander"] == yaml.safe_load(ROUTES)["routes"]["bystander"]

    # Prometheus has the monitor's rollout series, and the rolled-back rollout's alert fires.
    firing = _wait_query(prometheus, 'ALERTS{alertname="LoragateRolloutRolledBack", alertstate="firing"}')
    assert [(a["metric"]["route"], a["metric"]["canary"]) for a in firing] == [("canary-bad", "v2")]
    _wait_query(prometheus, 'loragate_rollout_state{route="canary-ok", state="promoted"} == 1')
    _wait_query(prometheus, 'loragate_rollout_step{route="canary-bad"} == 0')
    transitions = _wait_query(prometheus, 'loragate_rollout_transitions_total{action=~"promote|rollback"} > 0', 2)
    assert {(t["metric"]["route"], t["metric"]["action"]) for t in transitions} == {
        ("canary-ok", "promote"), ("canary-bad", "rollback")}
    print(f"\nrollouts done in {time.monotonic() - begun:.1f} s with {sent_during_rollouts} requests; "
          f"A history {moves}; B rolled back {rolled_back['at'] - started:.1f} s after its start")

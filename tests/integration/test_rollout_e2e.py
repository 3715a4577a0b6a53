"""Rollouts end to end on real parts: a real gateway in front of a STUB upstream (tests/stub_upstream.py,
not vLLM: its adapter names choose its behaviour), a real Prometheus scraping the gateway and the
monitor every second with the shipped alert rules, and a real ``loragate monitor`` whose rollouts
rewrite the routes file the gateway watches, judged by the statistical judge (monitoring/judge.py)
with min effects sized for a short test.

Four rollouts run side by side, on four routes of one routes file, under a bounded background load:

* ``canary-ok``: the canary adapter is healthy -> 10 -> 50 -> promoted (canary 100 %) once every
  check rules out a regression, and the gateway's loragate_rollout_weight follows each step;
* ``canary-bad``: the canary adapter is ``fail-500``. The gateway falls back to the base model, so
  clients only ever see 200s; the fallback_rate check fails the canary: rolled back (0 %), and
  LoragateRolloutRolledBack fires;
* ``canary-slow``: the canary adapter answers after 400 ms (the stable in milliseconds): the
  latency check fails it, rolled back;
* ``canary-quiet``: healthy, but the route gets a trickle: too few canary requests to rule anything
  out, so every analysis holds; after max_holds it stalls (held for good, never promoted) and
  LoragateRolloutStalled fires.

A fifth route is never touched.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
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
STEPS = [10, 50, 100]
QUIET_HOLDS = 4
# Min effects for a short test on a stub (the defaults are sized for production traffic).
JUDGE = {
    "error_rate": {"min_effect": 0.1, "min_samples": 30},
    "fallback_rate": {"min_effect": 0.1, "min_samples": 30},
    "latency": {"min_effect": 0.2, "min_samples": 30, "floor_s": 0.25},
    "latency_tail": {"min_ratio": 10, "min_samples": 30, "floor_s": 0.25},
}
ROUTES = """\
# Rollout e2e routes (the monitor rewrites the weights of the canary-* routes).
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
  canary-slow:
    variants:
      - {name: v1, adapter: good-v1, path: /adapters/good-v1, weight: 100}
      - {name: v2, adapter: slow-400, path: /adapters/slow-400, weight: 0}
    fallback: [base]
  canary-quiet:
    variants:
      - {name: v1, adapter: good-v1, path: /adapters/good-v1, weight: 100}
      - {name: v2, adapter: good-v2, path: /adapters/good-v2, weight: 0}
    fallback: [base]
  bystander:
    sticky_key: x-user-id
    variants:
      - {name: base, weight: 1}
    pricing: {prompt_per_1k: 0.001}
"""
CANARIES = ("canary-ok", "canary-bad", "canary-slow", "canary-quiet")
FINAL = {"canary-ok": "promoted", "canary-bad": "rolled_back", "canary-slow": "rolled_back", "canary-quiet": "stalled"}


class LoadLoop:
    """Chat requests to the gateway on loopback from a background thread, ``concurrency`` at a time
    (each worker pausing ``pause_s`` between two), until stopped, ``max_requests`` were sent or
    ``max_s`` passed. Counts statuses per route."""

    def __init__(
        self,
        url: str,
        routes: list[str],
        *,
        concurrency: int = 8,
        max_requests: int = 40_000,
        max_s: float = 150,
        pause_s: float = 0.0,
    ) -> None:
        assert urllib.parse.urlsplit(url).hostname == "127.0.0.1"
        self.url, self.routes, self.concurrency, self.pause_s = url, routes, concurrency, pause_s
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
                if self.pause_s:
                    await asyncio.sleep(self.pause_s)

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
            {
                "loragate-gateway": [urllib.parse.urlsplit(url).netloc],
                "loragate-monitor": [f"127.0.0.1:{monitor_port}"],
            },
            directory,
            rule_files=shipped_rules_every_second(directory),
            scrape_interval_s=1,
        )
        started.append(prometheus)
        canary = {"stable": "v1", "canary": "v2", "steps": STEPS, "interval_s": INTERVAL_S, "judge": JUDGE}
        config = directory / "monitor.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "request_log": str(directory / "requestlog"),  # no drift checks here: only rollouts
                    "prometheus_url": prometheus_url,
                    "state_file": str(directory / "monitor-state.json"),
                    "interval_s": 600,
                    "port": monitor_port,
                    "rollouts": {
                        "routes_file": str(routes),
                        "state_file": str(directory / "rollouts.json"),
                        "canaries": [
                            {
                                "route": route,
                                **canary,
                                **({"max_holds": QUIET_HOLDS} if route == "canary-quiet" else {}),
                            }
                            for route in CANARIES
                        ],
                    },
                },
                sort_keys=False,
            )
        )
        yield {
            "directory": directory,
            "routes": routes,
            "url": url,
            "prometheus": prometheus_url,
            "config": config,
            "monitor_port": monitor_port,
            "services": started,
        }
    finally:
        for service in reversed(started):
            service.stop()


def _state(body: dict) -> str:
    return "stalled" if body.get("stalled") else body.get("state", "?")


def test_rollouts_promote_a_healthy_canary_roll_back_bad_ones_and_hold_a_quiet_one(setup):
    url, port, prometheus = setup["url"], setup["monitor_port"], setup["prometheus"]
    begun = time.monotonic()
    with (
        LoadLoop(url, ["canary-ok", "canary-bad", "canary-slow", "bystander"]) as load,
        LoadLoop(url, ["canary-quiet"], concurrency=1, pause_s=1.0) as trickle,
    ):
        # Traffic flows, and Prometheus has scraped it (its first scrapes come a few seconds after
        # it starts), before the rollouts start.
        _wait_query(prometheus, 'up{job="loragate-monitor"} == 0')  # the monitor is not started yet
        _wait_query(prometheus, 'sum(rate(loragate_requests_total{route="canary-bad",variant="v1"}[5s])) > 0')
        log = setup["directory"] / "monitor.log"
        monitor = Service([sys.executable, "-m", "loragate", "monitor", "--config", str(setup["config"])], log)
        setup["services"].append(monitor)
        wait_http(f"http://127.0.0.1:{port}/healthz", monitor.process, 60, log)

        # The gateway's own view of the canary weights while the rollouts run.
        seen: dict[str, list[float]] = {route: [] for route in CANARIES}
        deadline = time.monotonic() + 30 * INTERVAL_S
        status = {}
        while time.monotonic() < deadline:
            text = scrape(url)
            for route, values in seen.items():
                weight = sample_sum(text, "loragate_rollout_weight", route=route, variant="v2")
                if not values or values[-1] != weight:
                    values.append(weight)
            status = _healthz(port)
            if (
                {route: _state(status[route]) for route in CANARIES} == FINAL
                and [seen[r][-1] for r in CANARIES] == [1.0, 0.0, 0.0, 0.1]
                and status["canary-quiet"].get("plan") is not None
            ):  # made off the loop: may come late
                break
            time.sleep(0.2)
        sent_during_rollouts = load.sent + trickle.sent

    states = {route: _state(status[route]) for route in CANARIES}
    assert states == FINAL, json.dumps(status, indent=1) + log.read_text()[-3000:]
    ok, bad, slow, quiet = (status[route] for route in CANARIES)

    # ok: every step in order (holds while the data is not enough yet), then promotion; every check
    # of the last analysis ruled out a regression that matters.
    moves = [(h["action"], h["weight"]) for h in ok["history"] if h["action"] not in ("hold", "plan")]
    assert moves == [("step", 10), ("step", 50), ("promote", 100)], ok["history"]
    assert [w for w in seen["canary-ok"] if w] == [0.1, 0.5, 1.0], seen  # the gateway reloaded at each step
    last = ok["last_analysis"]
    assert last["verdict"] == "pass" and {c["decision"] for c in last["checks"].values()} == {"pass"}
    for check in last["checks"].values():
        assert check["samples"] >= check["min_samples"] and check["upper"] < check["min_effect"], check

    # bad: rolled back on the fallback rate within three analyses of its start (the first, over a window
    # of a few scrapes, may hold: a handful of failures is not yet proof); clients only saw 200s.
    (started,) = [h["at"] for h in bad["history"] if h["action"] == "step"]
    (rolled_back,) = [h for h in bad["history"] if h["action"] == "rollback"]
    assert (
        len([h for h in bad["history"] if h["action"] != "plan"]) <= 4
        and rolled_back["at"] - started <= 4 * INTERVAL_S + 3
    ), bad["history"]
    fallback = bad["last_analysis"]["checks"]["fallback_rate"]
    assert fallback["decision"] == "fail" and fallback["lower"] > 0 and fallback["estimate"] > 0.5, fallback
    assert seen["canary-bad"][-1] == 0.0 and 0.1 in seen["canary-bad"], seen
    assert {code for (route, code) in load.statuses if route == "canary-bad"} == {200}, load.statuses

    # slow: rolled back on latency (the share of requests slower than 0.25 s), not on errors.
    checks = slow["last_analysis"]["checks"]
    assert checks["latency"]["decision"] == "fail" and checks["latency"]["figures"]["bound_s"] >= 0.25, checks
    assert checks["latency"]["figures"]["canary_slower_share"] > 0.9 and checks["error_rate"]["decision"] != "fail"
    assert "rollback" in [h["action"] for h in slow["history"]]

    # quiet: never enough data: only holds, then stalled at its first step; never promoted.
    # The plan, from the route's traffic in the real Prometheus, says the quiet rollout cannot finish (a history
    # entry when it was recorded; it is made off the loop, so analyses may come before it).
    assert quiet["plan"]["feasible"] is False, quiet["plan"]
    actions = [h["action"] for h in quiet["history"]]
    assert [a for a in actions if a != "plan"] == ["step"] + ["hold"] * QUIET_HOLDS and "plan" in actions, actions
    assert quiet["state"] == "progressing" and quiet["weight"] == 10 and seen["canary-quiet"][-1] == 0.1
    assert quiet["last_analysis"]["verdict"] == "inconclusive"
    assert all(c["samples"] < c["min_samples"] for c in quiet["last_analysis"]["checks"].values())

    # The routes file: valid, the canaries' weights moved, the bystander untouched.
    text = setup["routes"].read_text()
    assert text.startswith("# Rollout e2e routes")
    catalog = parse_catalog(text)
    assert {v.name: v.weight for v in catalog.routes["canary-ok"].variants} == {"v1": 0, "v2": 100, "base": 0}
    assert {v.name: v.weight for v in catalog.routes["canary-bad"].variants} == {"v1": 100, "v2": 0, "base": 0}
    assert {v.name: v.weight for v in catalog.routes["canary-quiet"].variants} == {"v1": 90, "v2": 10, "base": 0}
    assert yaml.safe_load(text)["routes"]["bystander"] == yaml.safe_load(ROUTES)["routes"]["bystander"]

    # `loragate rollout status` explains each last analysis check by check.
    out = subprocess.run(
        [sys.executable, "-m", "loragate", "rollout", "status", "--config", str(setup["config"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "canary-quiet: progressing" in out.stdout and "STALLED after 4 inconclusive analyses" in out.stdout
    assert "fallback_rate fail" in " ".join(out.stdout.split()), out.stdout

    # Prometheus has the monitor's rollout series, the decisions and intervals, and the alerts fire.
    firing = _wait_query(prometheus, 'ALERTS{alertname="LoragateRolloutRolledBack", alertstate="firing"}', 2)
    assert sorted(a["metric"]["route"] for a in firing) == ["canary-bad", "canary-slow"]
    stalled = _wait_query(prometheus, 'ALERTS{alertname="LoragateRolloutStalled", alertstate="firing"}')
    assert [(a["metric"]["route"], a["metric"]["canary"]) for a in stalled] == [("canary-quiet", "v2")]
    _wait_query(prometheus, 'loragate_rollout_state{route="canary-ok", state="promoted"} == 1')
    _wait_query(prometheus, 'loragate_rollout_step{route="canary-bad"} == 0')
    _wait_query(prometheus, 'loragate_rollout_decision{route="canary-bad", check="fallback_rate"} == -1')
    _wait_query(prometheus, 'loragate_rollout_analysis{route="canary-bad", check="fallback_rate", figure="lower"} > 0')
    _wait_query(prometheus, 'loragate_rollout_decision{route="canary-ok", check="analysis"} == 1')
    transitions = _wait_query(prometheus, 'loragate_rollout_transitions_total{action=~"promote|rollback"} > 0', 3)
    assert {(t["metric"]["route"], t["metric"]["action"]) for t in transitions} == {
        ("canary-ok", "promote"),
        ("canary-bad", "rollback"),
        ("canary-slow", "rollback"),
    }
    print(
        f"\nrollouts done in {time.monotonic() - begun:.1f} s with {sent_during_rollouts} requests; "
        f"ok history {moves} after {len(ok['history']) - 1} analyses; bad rolled back "
        f"{rolled_back['at'] - started:.1f} s after its start"
    )

"""Rollouts: canary analysis, the promote / roll-back state machine, the routes sources, the CLI.

Prometheus is faked by a MetricsSource that returns programmed Observed counts (the PromQL itself
runs against a real Prometheus in tests/integration/test_rollout_e2e.py); the routes ConfigMap
by a stand-in for kubernetes.client.CoreV1Api: no cluster exists on this machine. The judge's
statistics have their own tests (tests/unit/test_judge.py).
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from aiohttp import web
from prometheus_client import generate_latest
from scipy.special import ndtr  # the standard normal CDF (scipy.stats.norm.cdf), without importing scipy.stats

from loragate.monitoring.commands import rollout_command
from loragate.monitoring.judge import Observed
from loragate.monitoring.prometheus import Prometheus
from loragate.monitoring.rollout.analysis import PrometheusAnalysis, analysis_queries
from loragate.monitoring.rollout.config import CanaryConfig, ConfigMapRef, RolloutsConfig
from loragate.monitoring.rollout.controller import RolloutController
from loragate.monitoring.rollout.errors import RolloutError
from loragate.monitoring.rollout.judge import analyse
from loragate.monitoring.rollout.metrics import RolloutMetrics
from loragate.monitoring.rollout.plan import RouteTraffic, plan
from loragate.monitoring.rollout.routes import RoutesConfigMap, RoutesFile, set_weights
from loragate.monitoring.config import MonitorConfig
from loragate.monitoring.service import Monitor
from loragate.common.catalog import parse_catalog
from tests.local_http import serve

ROUTES = """\
# The routes catalog (header comment: kept by rewrites).
routes:
  support:
    sticky_key: x-user-id
    variants:
      - {name: v1, adapter: support-v1, path: /adapters/support-v1, weight: 90}
      - {name: v2, adapter: support-v2, path: /adapters/support-v2, weight: 10}
    fallback: [v1, base]
    pricing: {prompt_per_1k: 0.0001, completion_per_1k: 0.0002}
  plain:
    variants:
      - {name: base, weight: 1}
"""


def latency(n: float, slow: float = 0.0) -> dict[float, float]:
    """Cumulative buckets: ``slow`` of ``n`` requests took 1-2.5 s, the rest under 0.1 s."""
    return {0.1: n - slow, 0.25: n - slow, 1.0: n - slow, 2.5: n, math.inf: n}


def observed(canary: float, stable: float, *, errors=(0, 0), fallbacks=(0, 0), slow=(0, 0)) -> Observed:
    return Observed(
        canary_routed=canary,
        canary_errors=errors[0],
        canary_fallbacks=fallbacks[0],
        stable_routed=stable,
        stable_errors=errors[1],
        stable_fallbacks=fallbacks[1],
        canary_latency=latency(canary - fallbacks[0], slow[0]),
        stable_latency=latency(stable - fallbacks[1], slow[1]),
    )


HEALTHY = observed(2000, 8000, errors=(20, 80), slow=(100, 400))  # the same shares on both sides
FAILING = observed(200, 8000, fallbacks=(100, 0))  # clients got the fallback's 200s
QUIET = observed(3, 50)


class FakePrometheus:
    """A MetricsSource that answers each analysis with the next programmed Observed counts."""

    def __init__(self, *answers: Observed | Exception) -> None:
        self.answers = list(answers)
        self.windows: list[float] = []

    async def measure(self, config, window_s):
        self.windows.append(window_s)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def spec(**overrides) -> CanaryConfig:
    return CanaryConfig(
        **{"route": "support", "stable": "v1", "canary": "v2", "steps": [5, 25, 50, 100], "interval_s": 60, **overrides}
    )


def controller(tmp_path, source, *, routes=None, **spec_overrides) -> RolloutController:
    path = tmp_path / "routes.yaml"
    if not path.exists():
        path.write_text(ROUTES)
    config = RolloutsConfig(
        routes_file=str(path), state_file=str(tmp_path / "rollouts.json"), canaries=[spec(**spec_overrides)]
    )
    return RolloutController(config, source, routes=routes)


def weights(tmp_path, route="support") -> dict[str, float]:
    catalog = parse_catalog((tmp_path / "routes.yaml").read_text())
    return {v.name: v.weight for v in catalog.routes[route].variants}


def sample(c: RolloutController, name: str, **labels) -> float | None:
    return c.metrics.registry.get_sample_value(name, {"route": "support", "canary": "v2", **labels})


# --- the rollout's judge -------------------------------------------------------------------------


def test_the_rollout_judges_with_its_canary_settings():
    assert analyse(spec(), HEALTHY).decision == "pass"
    failing = analyse(spec(), FAILING)
    assert failing.decision == "fail" and [c.check for c in failing.checks if c.decision == "fail"] == ["fallback_rate"]
    assert analyse(spec(), QUIET).decision == "inconclusive"
    # A stricter min effect on errors and more samples: the same counts no longer pass.
    strict = spec(judge={"error_rate": {"min_effect": 0.001}, "latency": {"min_samples": 5000}})
    verdict = analyse(strict, HEALTHY)
    assert verdict.decision == "inconclusive"
    assert {c.check: c.decision for c in verdict.checks} == {
        "error_rate": "inconclusive",
        "fallback_rate": "pass",
        "latency": "inconclusive",
        "latency_tail": "pass",
    }
    # alpha is shared over the steps the rollout analyses: fewer steps, wider share each.
    two = analyse(spec(steps=[50, 100]), HEALTHY).check("error_rate")
    three = analyse(spec(), HEALTHY).check("error_rate")
    assert two.alpha_fail == pytest.approx(3 * three.alpha_fail)


# --- the state machine -------------------------------------------------------------------------


async def test_passing_analyses_step_up_to_promotion(tmp_path):
    c = controller(tmp_path, FakePrometheus(HEALTHY))
    (start,) = await c.tick(now=1000)
    assert start.action == "step" and weights(tmp_path)["v2"] == 5 and weights(tmp_path)["v1"] == 95
    assert await c.tick(now=1030) == []  # not due before interval_s
    seen = []
    for now in (1060, 1120, 1180):
        (transition,) = await c.tick(now=now)
        seen.append((transition.action, weights(tmp_path)["v2"], weights(tmp_path)["v1"]))
    assert seen == [("step", 25, 75), ("step", 50, 50), ("promote", 100, 0)]
    assert await c.tick(now=1300) == []  # promoted: nothing more to do
    status = c.status()["support"]
    assert status["state"] == "promoted" and status["weight"] == 100
    assert [h["action"] for h in status["history"]] == ["step", "step", "step", "promote"]
    assert sample(c, "loragate_rollout_step") == 100
    assert sample(c, "loragate_rollout_state", state="promoted") == 1
    assert sample(c, "loragate_rollout_state", state="progressing") == 0
    assert sample(c, "loragate_rollout_transitions_total", action="step") == 3
    assert sample(c, "loragate_rollout_transitions_total", action="promote") == 1
    assert sample(c, "loragate_rollout_transitions_total", action="rollback") == 0
    assert sample(c, "loragate_rollout_decision", check="analysis") == 1
    assert sample(c, "loragate_rollout_decision", check="latency") == 1
    assert sample(c, "loragate_rollout_analysis", check="latency", figure="estimate") == 0.0
    assert sample(c, "loragate_rollout_analysis", check="latency", figure="min_effect") == 0.1
    assert sample(c, "loragate_rollout_analysis", check="error_rate", figure="samples") == 2000
    assert sample(c, "loragate_rollout_analysis", check="feedback", figure="estimate") is None  # not configured
    checks = status["last_analysis"]["checks"]
    assert status["last_analysis"]["verdict"] == "pass" and set(checks) == {
        "error_rate",
        "fallback_rate",
        "latency",
        "latency_tail",
    }
    assert checks["error_rate"]["lower"] < 0 < checks["error_rate"]["upper"] < checks["error_rate"]["min_effect"]


async def test_a_failing_analysis_rolls_back(tmp_path):
    c = controller(tmp_path, FakePrometheus(HEALTHY, FAILING))
    await c.tick(now=0)
    await c.tick(now=60)  # pass: 25 %
    (transition,) = await c.tick(now=120)
    assert transition.action == "rollback" and transition.analysis.check("fallback_rate").decision == "fail"
    assert weights(tmp_path)["v2"] == 0 and weights(tmp_path)["v1"] == 100
    assert c.status()["support"]["state"] == "rolled_back"
    assert sample(c, "loragate_rollout_state", state="rolled_back") == 1
    assert sample(c, "loragate_rollout_analysis", check="fallback_rate", figure="estimate") == 0.5
    assert sample(c, "loragate_rollout_analysis", check="fallback_rate", figure="lower") > 0.02
    assert sample(c, "loragate_rollout_decision", check="fallback_rate") == -1
    assert sample(c, "loragate_rollout_transitions_total", action="rollback") == 1
    assert await c.tick(now=500) == []  # rolled back stays rolled back


async def test_failure_limit_holds_before_rolling_back(tmp_path):
    c = controller(tmp_path, FakePrometheus(FAILING, HEALTHY), failure_limit=2)
    await c.tick(now=0)
    (first,) = await c.tick(now=60)
    assert first.action == "hold" and "failure 1 of 2" in first.reason and weights(tmp_path)["v2"] == 5
    (second,) = await c.tick(now=120)  # a pass resets the count
    assert second.action == "step" and c.status()["support"]["failures"] == 0


async def test_low_traffic_holds_the_step_and_the_window_grows(tmp_path):
    prometheus = FakePrometheus(QUIET, QUIET, HEALTHY)
    c = controller(tmp_path, prometheus)
    await c.tick(now=0)
    for now in (60, 120):
        (transition,) = await c.tick(now=now)
        assert transition.action == "hold" and weights(tmp_path)["v2"] == 5
    (transition,) = await c.tick(now=180)
    assert transition.action == "step" and weights(tmp_path)["v2"] == 25
    assert prometheus.windows == [60, 120, 180]  # the step's traffic so far
    assert sample(c, "loragate_rollout_transitions_total", action="hold") == 2
    assert sample(c, "loragate_rollout_analysis", check="error_rate", figure="samples") == 2000


async def test_a_rollout_that_never_gets_enough_data_stalls_and_is_never_promoted(tmp_path):
    prometheus = FakePrometheus(QUIET, QUIET, QUIET, HEALTHY)
    c = controller(tmp_path, prometheus, max_holds=3)
    await c.tick(now=0)
    for now in (60, 120, 180):
        (transition,) = await c.tick(now=now)
        assert transition.action == "hold"
    assert "stalled after 3 analyses" in transition.reason
    status = c.status()["support"]
    assert status["stalled"] and status["state"] == "progressing" and weights(tmp_path)["v2"] == 5
    assert sample(c, "loragate_rollout_stalled") == 1
    assert await c.tick(now=240) == [] and await c.tick(now=600) == []  # no more analyses: healthy data waits
    assert len(prometheus.windows) == 3 and weights(tmp_path)["v2"] == 5
    await c.override("support", "rollback", reason="never got traffic", now=700)
    assert sample(c, "loragate_rollout_stalled") == 0 and c.status()["support"]["stalled"] is False


async def test_prometheus_errors_hold(tmp_path):
    c = controller(tmp_path, FakePrometheus(RolloutError("prometheus: down")))
    await c.tick(now=0)
    (transition,) = await c.tick(now=60)
    assert transition.action == "hold" and "prometheus: down" in transition.reason
    assert c.status()["support"]["state"] == "progressing" and weights(tmp_path)["v2"] == 5


async def test_a_restart_resumes_from_the_state_file(tmp_path):
    first = controller(tmp_path, FakePrometheus(HEALTHY))
    await first.tick(now=0)
    await first.tick(now=60)  # 25 %
    restarted = controller(tmp_path, FakePrometheus(HEALTHY))
    assert await restarted.tick(now=90) == []  # resumes at 25 %: not restarted at 5 %, not due yet
    assert sample(restarted, "loragate_rollout_step") == 25
    (transition,) = await restarted.tick(now=120)
    assert (transition.action, transition.weight) == ("step", 50)


async def test_a_restart_reapplies_weights_the_state_says(tmp_path):
    """A crash between two writes (or a hand edit) left the routes behind the state: fixed at start."""
    c = controller(tmp_path, FakePrometheus(HEALTHY))
    await c.tick(now=0)
    await c.tick(now=60)
    path = tmp_path / "routes.yaml"
    path.write_text(set_weights(path.read_text(), "support", {"v1": 90, "v2": 10}))
    await controller(tmp_path, FakePrometheus(HEALTHY)).tick(now=70)
    assert weights(tmp_path)["v2"] == 25 and weights(tmp_path)["v1"] == 75


async def test_a_new_canary_starts_a_new_rollout(tmp_path):
    c = controller(tmp_path, FakePrometheus(FAILING))
    await c.tick(now=0)
    await c.tick(now=60)
    assert c.status()["support"]["state"] == "rolled_back"
    path = tmp_path / "routes.yaml"
    data = yaml.safe_load(path.read_text())
    data["routes"]["support"]["variants"].append({"name": "v3", "adapter": "support-v3", "weight": 0})
    path.write_text(yaml.safe_dump(data))
    again = controller(tmp_path, FakePrometheus(HEALTHY), canary="v3")
    again.metrics = c.metrics  # same process: the old canary's series go away
    (start,) = await again.tick(now=100)
    assert start.action == "step" and weights(tmp_path) == {"v1": 95, "v2": 0, "v3": 5, "base": 0}
    assert sample(again, "loragate_rollout_step") is None
    assert again.metrics.registry.get_sample_value("loragate_rollout_step", {"route": "support", "canary": "v3"}) == 5


async def test_a_missing_variant_is_an_error_of_that_rollout_only(tmp_path):
    c = controller(tmp_path, FakePrometheus(HEALTHY), canary="v9")
    assert await c.tick(now=0) == []
    assert "no variant 'v9'" in c.status()["support"]["error"]
    assert weights(tmp_path)["v2"] == 10  # untouched


async def test_manual_promote_and_rollback(tmp_path):
    c = controller(tmp_path, FakePrometheus(HEALTHY))
    await c.tick(now=0)
    status = await c.override("support", "rollback", reason="bad answers", now=10)
    assert status.state == "rolled_back" and weights(tmp_path)["v2"] == 0
    assert status.history[-1]["reason"] == "bad answers"
    status = await c.override("support", "promote", now=20)
    assert status.state == "promoted" and weights(tmp_path) == {"v1": 0, "v2": 100, "base": 0}


# --- the routes source -------------------------------------------------------------------------


async def test_the_routes_file_is_replaced_atomically_valid_and_otherwise_untouched(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    os.chmod(path, 0o640)
    before_inode, before = path.stat().st_ino, yaml.safe_load(ROUTES)
    c = controller(tmp_path, FakePrometheus(HEALTHY))
    await c.tick(now=0)
    text = path.read_text()
    assert path.stat().st_ino != before_inode  # a new file renamed over the old one
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    assert text.startswith("# The routes catalog (header comment: kept by rewrites).\n")
    parse_catalog(text)
    after = yaml.safe_load(text)
    assert after["routes"]["plain"] == before["routes"]["plain"]
    for key in ("sticky_key", "fallback", "pricing"):
        assert after["routes"]["support"][key] == before["routes"]["support"][key]
    for old, new in zip(before["routes"]["support"]["variants"], after["routes"]["support"]["variants"]):
        assert {k: v for k, v in old.items() if k != "weight"} == {k: v for k, v in new.items() if k != "weight"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.json", "routes.yaml"]  # no temp files left


def test_set_weights_adds_the_implicit_base_variant_and_refuses_bad_input():
    text = set_weights(ROUTES, "support", {"v2": 0, "base": 100})
    variants = yaml.safe_load(text)["routes"]["support"]["variants"]
    assert [(v["name"], v["weight"]) for v in variants] == [("v1", 90), ("v2", 0), ("base", 100)]
    with pytest.raises(RolloutError, match="no variant 'v7'"):
        set_weights(ROUTES, "support", {"v7": 5})
    with pytest.raises(RolloutError, match="no route 'nope'"):
        set_weights(ROUTES, "nope", {"v1": 5})
    with pytest.raises(RolloutError, match="would make the routes invalid"):
        set_weights(ROUTES, "support", {"v1": 0, "v2": 0})
    with pytest.raises(RolloutError, match="invalid now"):
        set_weights("routes: {support: {variants: []}}", "support", {"v1": 5})


def test_an_invalid_routes_file_is_left_alone(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text("routes: [not, a, mapping]\n")
    source = RoutesFile(path)
    c = controller(tmp_path, FakePrometheus(HEALTHY))
    with pytest.raises(RolloutError):
        c._write_weights(c.config.canaries[0], 5)
    assert path.read_text() == "routes: [not, a, mapping]\n" and source.read().text == path.read_text()


class ApiException(Exception):
    """Like kubernetes.client.exceptions.ApiException: the HTTP status in ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(f"({status})")
        self.status = status


class FakeCoreV1Api:
    """Stands in for kubernetes.client.CoreV1Api: no cluster exists on this machine."""

    def __init__(self, text: str, conflicts: int = 0) -> None:
        self.data, self.version, self.conflicts = {"routes.yaml": text}, 7, conflicts
        self.patches: list[tuple[str, str, dict]] = []

    def read_namespaced_config_map(self, name, namespace):
        return SimpleNamespace(data=dict(self.data), metadata=SimpleNamespace(resource_version=str(self.version)))

    def patch_namespaced_config_map(self, name, namespace, body):
        self.patches.append((name, namespace, body))
        if self.conflicts:
            self.conflicts -= 1
            self.version += 1  # someone else wrote in between
            raise ApiException(409)
        assert body["metadata"]["resourceVersion"] == str(self.version)
        self.data.update(body["data"])
        self.version += 1


async def test_the_routes_configmap_is_patched_with_its_resource_version(tmp_path):
    api = FakeCoreV1Api(ROUTES, conflicts=1)
    config = RolloutsConfig(
        configmap=ConfigMapRef(name="lg-loragate-routes", namespace="llm"),
        state_file=str(tmp_path / "rollouts.json"),
        canaries=[spec()],
    )
    c = RolloutController(config, FakePrometheus(HEALTHY), k8s_api=api)
    assert isinstance(c.routes, RoutesConfigMap)
    await c.tick(now=0)
    assert [(n, ns, b["metadata"]["resourceVersion"]) for n, ns, b in api.patches] == [
        ("lg-loragate-routes", "llm", "7"),
        ("lg-loragate-routes", "llm", "8"),
    ]  # a conflict, read again
    catalog = parse_catalog(api.data["routes.yaml"])
    assert {v.name: v.weight for v in catalog.routes["support"].variants} == {"v1": 95, "v2": 5, "base": 0}
    await c.tick(now=60)
    assert parse_catalog(api.data["routes.yaml"]).routes["support"].variant("v2").weight == 25


# --- PromQL and the Prometheus client ----------------------------------------------------------


def test_analysis_queries_select_the_route_and_variants():
    queries = analysis_queries("support", "v2", "v1", 59.2)
    assert queries["canary_errors"] == (
        'sum(increase(loragate_requests_total{route="support",variant="v2",status_class="5xx"}[60s]))'
    )
    assert queries["canary_fallbacks"] == 'sum(increase(loragate_fallbacks_total{route="support",variant="v2"}[60s]))'
    assert queries["stable_routed"] == (
        '(sum(increase(loragate_requests_total{route="support",variant="v1"}[60s])) or vector(0))'
        ' + (sum(increase(loragate_fallbacks_total{route="support",variant="v1"}[60s])) or vector(0))'
    )
    assert queries["stable_latency"] == (
        'sum by (le) (increase(loragate_request_duration_seconds_bucket{route="support",variant="v1"}[60s]))'
    )
    assert set(queries) == {
        f"{r}_{k}"
        for r in ("canary", "stable")
        for k in ("routed", "errors", "fallbacks", "latency", "feedback_sum", "feedback_count")
    }


async def test_prometheus_analysis_reads_counts_and_buckets():
    answers = {"canary_routed": "50", "canary_fallbacks": "10", "stable_routed": "400", "canary_feedback_sum": "NaN"}
    queries = {q: answers.get(name) for name, q in analysis_queries("support", "v2", "v1", 60).items()}
    latency = analysis_queries("support", "v2", "v1", 60)["canary_latency"]
    buckets = [({"le": "0.25"}, "30"), ({"le": "1.0"}, "38.5"), ({"le": "+Inf"}, "40")]

    async def query(request):
        expr = request.query["query"]
        if expr == latency:
            result = [{"metric": labels, "value": [0, v]} for labels, v in buckets]
        else:
            value = queries[expr]
            result = [] if value is None else [{"metric": {}, "value": [0, value]}]
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    async with serve(app) as port:
        m = await PrometheusAnalysis(Prometheus(f"http://127.0.0.1:{port}")).measure(spec(), 60)
    assert (m.canary_routed, m.canary_fallbacks, m.stable_routed, m.canary_errors) == (50, 10, 400, 0)
    assert m.canary_feedback_sum == 0 and m.stable_latency == {}
    assert m.canary_latency == {0.25: 30, 1.0: 38.5, math.inf: 40}


# --- configuration, the monitor, the CLI ----------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"steps": [25, 5]}, "steps must increase"),
        ({"steps": [0, 50]}, "0 < w <= 100"),
        ({"steps": []}, "at least one"),
        ({"canary": "v1"}, "both 'v1'"),
        ({"judge": {"fallback_rate": {"min_efect": 0.1}}}, "min_efect"),
        ({"judge": {"latency": {"min_effect": 1.5}}}, "less than 1"),
        ({"judge": {"alpha": 0}}, "alpha"),
        ({"judge": {"feedback": {"score_range": [5, 1]}}}, "score_range"),
        (
            {"judge": {"error_rate": None, "fallback_rate": None, "latency": None, "latency_tail": None}},
            "at least one check",
        ),
        ({"thresholds": {"max_fallback_rate": 0.1}}, "replaced by the statistical judge"),
        ({"min_requests": 50}, "min_requests: the threshold judge was replaced"),
        ({"max_holds": 20, "interval_s": 300, "max_window_s": 3600}, r"max_holds x interval_s \(20 x 300 s\)"),
    ],
)
def test_bad_canary_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        spec(**bad)


def test_rollouts_need_one_routes_source_and_prometheus():
    with pytest.raises(ValueError, match="exactly one routes source"):
        RolloutsConfig(canaries=[spec()])
    with pytest.raises(ValueError, match="one rollout per route"):
        RolloutsConfig(routes_file="r.yaml", canaries=[spec(), spec(canary="v3")])
    base = {"request_log": "/tmp/rl", "rollouts": {"routes_file": "r.yaml", "canaries": [spec().model_dump()]}}
    with pytest.raises(ValueError, match="set prometheus_url"):
        MonitorConfig.model_validate(base)
    config = MonitorConfig.model_validate({**base, "prometheus_url": "http://p:9090"})
    assert config.checks == [] and config.rollouts.canaries[0].steps == [5, 25, 50, 100]


async def test_the_monitor_runs_rollouts_and_exports_their_metrics(tmp_path):
    (tmp_path / "routes.yaml").write_text(ROUTES)
    config = MonitorConfig.model_validate(
        {
            "request_log": str(tmp_path / "rl"),
            "prometheus_url": "http://127.0.0.1:9",
            "state_file": str(tmp_path / "s.json"),
            "rollouts": {
                "routes_file": str(tmp_path / "routes.yaml"),
                "state_file": str(tmp_path / "rollouts.json"),
                "canaries": [spec().model_dump()],
            },
        }
    )
    monitor = Monitor(config)
    monitor.rollouts.source = FakePrometheus(HEALTHY)
    await monitor.rollouts.tick(now=0)
    text = generate_latest(monitor.metrics.registry).decode()
    assert 'loragate_rollout_state{canary="v2",route="support",state="progressing"} 1.0' in text
    assert 'loragate_rollout_transitions_total{action="hold",canary="v2",route="support"} 0.0' in text
    assert monitor.rollouts.status()["support"]["weight"] == 5


def test_rollout_cli_status_promote_rollback(tmp_path, capsys):
    (tmp_path / "routes.yaml").write_text(ROUTES)
    config = tmp_path / "monitor.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "request_log": str(tmp_path / "rl"),
                "prometheus_url": "http://127.0.0.1:9",
                "rollouts": {
                    "routes_file": str(tmp_path / "routes.yaml"),
                    "state_file": str(tmp_path / "rollouts.json"),
                    "canaries": [spec().model_dump()],
                },
            }
        )
    )
    args = {"config": config, "route": None, "reason": "manual", "json": False}
    assert rollout_command(SimpleNamespace(action="status", **args)) == 0
    assert "support: pending canary=v2 stable=v1" in capsys.readouterr().out
    assert rollout_command(SimpleNamespace(action="promote", **args)) == 0
    assert "support: promoted, v2 at 100%, v1 at 0%" in capsys.readouterr().out
    assert weights(tmp_path)["v2"] == 100
    assert rollout_command(SimpleNamespace(action="status", **{**args, "json": True})) == 0
    assert json.loads(capsys.readouterr().out)["support"]["state"] == "promoted"
    assert rollout_command(SimpleNamespace(action="rollback", **{**args, "route": "nope"})) == 2


async def test_rollout_metrics_pass_promtool_check_metrics(tmp_path):
    import shutil
    import subprocess

    c = controller(tmp_path, FakePrometheus(HEALTHY))
    await c.tick(now=0)
    await c.tick(now=60)
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (apt-get install prometheus)"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=generate_latest(c.metrics.registry), capture_output=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert isinstance(c.metrics, RolloutMetrics)


async def test_a_manual_override_during_an_analysis_wins(tmp_path):
    """`loragate rollout rollback` (another process) lands while the monitor's analysis runs."""
    cli = controller(tmp_path, None)

    class RollbackMeanwhile(FakePrometheus):
        async def measure(self, config, window_s):
            await cli.override("support", "rollback", now=61)
            return HEALTHY

    c = controller(tmp_path, RollbackMeanwhile(HEALTHY))
    await c.tick(now=0)
    assert await c.tick(now=60) == []  # the pass does not step: the state moved under it
    assert "changed meanwhile" in c.status()["support"]["error"]
    assert c.status()["support"]["state"] == "rolled_back" and weights(tmp_path)["v2"] == 0
    await c.tick(now=200)
    assert sample(c, "loragate_rollout_state", state="rolled_back") == 1


async def test_status_explains_the_last_analysis_check_by_check(tmp_path):
    c = controller(tmp_path, FakePrometheus(QUIET))
    await c.tick(now=0)
    await c.tick(now=60)
    body = c.status()["support"]
    lines = c.explain("support", body)
    assert lines[0] == "support: progressing canary=v2 stable=v1 weight=5.0%"
    assert lines[1] == "  last analysis: inconclusive over 60 s at 5%"
    error = next(line for line in lines if line.strip().startswith("error_rate"))
    assert "inconclusive" in error and "not enough data yet" in error and "3 of min 200 samples" in error
    assert "[" in error and "min effect 2.00 pp" in error  # the interval and the threshold
    checks = body["last_analysis"]["checks"]  # the same in /healthz and `status --json`
    assert checks["error_rate"]["upper"] > checks["error_rate"]["min_effect"] == 0.02
    assert json.loads(json.dumps(body))["last_analysis"]["checks"]["latency"]["test"].startswith("slower share")


def test_a_shadowed_canary_that_becomes_primary_ends_its_shadow_stage():
    shadowed = ROUTES.replace(
        "    fallback: [v1, base]\n", "    fallback: [v1, base]\n    shadow: {variant: v2, percent: 10}\n"
    )
    still_small = yaml.safe_load(set_weights(shadowed, "support", {"v1": 75, "v2": 25}))["routes"]["support"]
    assert still_small["shadow"]["variant"] == "v2"  # a canary's smaller share keeps its shadow copies
    half = yaml.safe_load(set_weights(shadowed, "support", {"v1": 50, "v2": 50}))["routes"]["support"]
    assert "shadow" not in half  # v2 is now a primary: the catalog would refuse it as a shadow
    assert [(v["name"], v["weight"]) for v in half["variants"]] == [("v1", 50), ("v2", 50)]


# --- the plan --------------------------------------------------------------------------------------


def route_traffic(rps: float) -> RouteTraffic:
    """A route of ``rps`` requests a second: 1 % 5xx, no fallbacks, lognormal latency (median 0.6 s, sigma 0.5)."""
    bounds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
    below = ndtr((np.log(bounds) - math.log(0.6)) / 0.5)
    return RouteTraffic(rps, 0.01, 0.0, dict(zip(bounds, below)), window_s=3600)


def test_the_plan_says_what_each_step_needs_and_flags_a_route_too_small_to_finish():
    busy = plan(spec(interval_s=300), route_traffic(20))
    assert busy.feasible and not busy.suggestions
    assert [s.weight for s in busy.steps] == [5, 25, 50]  # the 100 % step is not analysed
    first = busy.steps[0]
    assert first.canary_per_analysis == pytest.approx(300) and first.analyses == math.ceil(first.samples / 300)
    assert first.samples >= 200 and first.bottleneck in first.per_check  # min_samples at least
    assert first.slow_samples > first.samples  # a slow rollout (1 in 10) needs more: feasibility is judged on it
    # The slow rollout decides: a route where the median rollout fits max_holds but a slow one does not is flagged.
    edge = plan(spec(interval_s=300), route_traffic(4), suggest=False)
    assert all(s.analyses <= 12 for s in edge.steps) and not edge.feasible
    assert busy.promote_s == busy.analyses * 300
    # 40 canary requests an analysis at 5 % (2.67 req/s): the first step needs more than 12 analyses.
    small = plan(spec(interval_s=300), route_traffic(2.67))
    assert not small.feasible and small.steps[0].analyses > 12
    assert any("CANNOT FINISH" in line for line in small.lines())
    changes = [s["change"].split(":")[0] for s in small.suggestions]
    assert changes == ["interval_s", "min effects x2", "steps"]
    for suggestion in small.suggestions:  # each suggested setting makes it feasible
        fixed = CanaryConfig.model_validate({**spec(interval_s=300).model_dump(), **suggestion["update"]})
        assert plan(fixed, route_traffic(2.67)).feasible, suggestion["change"]
    # A route without traffic cannot be planned for; a judge with feedback on a route without it never passes.
    assert not plan(spec(), route_traffic(0), suggest=False).feasible
    silent = plan(spec(interval_s=300, judge={"feedback": {}}), route_traffic(20), suggest=False)
    assert not silent.feasible and silent.steps[0].samples is None and silent.steps[0].bottleneck == "feedback"


def test_the_plans_need_is_the_judges_own_rule():
    """At the planned sample size the judge passes the expected counts; a little below it, it does not."""
    traffic, weight = route_traffic(20), 25
    need = plan(spec(interval_s=300), traffic).steps[1].samples
    for n, decision in ((need, "pass"), (need * 0.9, "inconclusive")):
        c, s = traffic.expected(np.array(n)), traffic.expected(np.array(n * (100 - weight) / weight))
        cumulative = {**{b: float(c.below[i]) for i, b in enumerate(traffic.latency)}, math.inf: float(n)}
        stable = {**{b: float(s.below[i]) for i, b in enumerate(traffic.latency)}, math.inf: float(s.n)}
        verdict = analyse(
            spec(interval_s=300),
            Observed(
                canary_routed=n,
                canary_errors=float(c.errors),
                stable_routed=float(s.n),
                stable_errors=float(s.errors),
                canary_latency=cumulative,
                stable_latency=stable,
            ),
        )
        assert verdict.decision == decision


class PlannedPrometheus(FakePrometheus):
    """A source that also tells the route's recent traffic, as PrometheusAnalysis does."""

    def __init__(self, traffic: RouteTraffic, *answers) -> None:
        super().__init__(*answers)
        self.route_traffic = traffic

    async def traffic(self, route, window_s):
        return self.route_traffic


async def started_and_planned(c: RolloutController) -> None:
    """The start, then the next round once the plan (made off the loop) is done: it is recorded there."""
    await c.tick(now=1000)
    started = c.status()["support"]
    assert started["weight"] == 5 and started.get("plan") is None  # the start waits for no plan
    await c._planning["support"]
    assert await c.tick(now=1001) == []  # not an analysis: the interval has not passed


async def test_a_rollout_that_cannot_finish_is_flagged_at_its_start(tmp_path):
    c = controller(tmp_path, PlannedPrometheus(route_traffic(2.67), QUIET), interval_s=300)
    await started_and_planned(c)
    status = c.status()["support"]
    assert status["plan"]["feasible"] is False and status["weight"] == 5  # flagged, not stopped
    assert status["history"][-1]["action"] == "plan" and "STALLS" in status["history"][-1]["reason"]
    assert sample(c, "loragate_rollout_plan_feasible") == 0
    assert math.isnan(sample(c, "loragate_rollout_plan_promote_seconds"))
    text = "\n".join(c.explain("support", status))
    assert "CANNOT FINISH" in text and "feasible with: interval_s" in text
    (tmp_path / "busy").mkdir()
    busy = controller(tmp_path / "busy", PlannedPrometheus(route_traffic(20), QUIET), interval_s=300)
    await started_and_planned(busy)
    assert busy.status()["support"]["plan"]["feasible"] is True
    assert sample(busy, "loragate_rollout_plan_feasible") == 1
    assert sample(busy, "loragate_rollout_plan_promote_seconds") == busy.status()["support"]["plan"]["promote_s"]


async def test_a_plan_that_cannot_be_made_does_not_stop_the_start(tmp_path):
    class Down(PlannedPrometheus):
        async def traffic(self, route, window_s):
            raise OSError("connection refused")

    c = controller(tmp_path, Down(route_traffic(20), QUIET), interval_s=300)
    await started_and_planned(c)
    status = c.status()["support"]
    assert status["weight"] == 5 and "connection refused" in status["plan"]["error"]
    assert "plan: no plan: connection refused" in "\n".join(c.explain("support", status))


async def test_prometheus_analysis_reads_the_whole_routes_traffic():
    seen = []

    async def query(request):
        expr = request.query["query"]
        seen.append(expr)
        if "bucket" in expr:
            result = [
                {"metric": {"le": le}, "value": [0, v]} for le, v in (("0.5", "600"), ("1.0", "900"), ("+Inf", "1000"))
            ]
        elif "feedback" in expr:
            result = []
        elif "5xx" in expr:
            result = [{"metric": {}, "value": [0, "10"]}]
        else:
            result = [{"metric": {}, "value": [0, "1000" if "requests" in expr else "0"]}]
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    async with serve(app) as port:
        traffic = await PrometheusAnalysis(Prometheus(f"http://127.0.0.1:{port}")).traffic("support", 500)
    assert all('route="support"' in q and "variant" not in q for q in seen) and len(seen) == 6
    assert traffic.requests_per_s == pytest.approx(2.0) and traffic.error_rate == pytest.approx(0.01)
    assert traffic.latency == {0.5: 0.6, 1.0: 0.9} and traffic.feedback_mean is None


def test_rollout_cli_plan(tmp_path, capsys, monkeypatch):
    (tmp_path / "routes.yaml").write_text(ROUTES)
    config = tmp_path / "monitor.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "request_log": str(tmp_path / "rl"),
                "prometheus_url": "http://127.0.0.1:9",
                "rollouts": {
                    "routes_file": str(tmp_path / "routes.yaml"),
                    "state_file": str(tmp_path / "rollouts.json"),
                    "canaries": [spec().model_dump()],
                },
            }
        )
    )
    args = {"config": config, "route": None, "reason": "manual", "json": False, "lookback": 600}
    assert rollout_command(SimpleNamespace(action="plan", **args)) == 2  # nothing listens on :9
    assert "cannot read its traffic" in capsys.readouterr().err
    assert rollout_command(SimpleNamespace(action="plan", **{**args, "route": "nope"})) == 2
    asked = []

    async def traffic(self, route, window_s):  # PrometheusAnalysis.traffic's PromQL is tested above
        asked.append((route, window_s))
        return route_traffic(2.67 if len(asked) == 1 else 100)

    monkeypatch.setattr(PrometheusAnalysis, "traffic", traffic)
    capsys.readouterr()
    assert rollout_command(SimpleNamespace(action="plan", **args)) == 1  # 1: a rollout cannot finish
    out = capsys.readouterr().out
    assert "support: plan for v2" in out and "CANNOT FINISH" in out and "feasible with: interval_s: 720" in out
    assert rollout_command(SimpleNamespace(action="plan", **{**args, "json": True})) == 0
    assert json.loads(capsys.readouterr().out)["support"]["feasible"] is True
    assert asked == [("support", 600), ("support", 600)]

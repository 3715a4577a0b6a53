"""Rollouts: canary analysis, the promote / roll-back state machine, the routes sources, the CLI.

Prometheus is faked by a MetricsSource that returns programmed Measurements (the PromQL itself
runs against a real Prometheus in tests/integration/test_rollout_e2e.py); the routes ConfigMap
by a stand-in for kubernetes.client.CoreV1Api: no cluster exists on this machine.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import yaml
from aiohttp import web
from prometheus_client import generate_latest

from loragate.monitoring.commands import rollout_command
from loragate.monitoring.prometheus import Prometheus
from loragate.monitoring.rollout.analysis import Measurements, PrometheusAnalysis, analysis_queries
from loragate.monitoring.rollout.config import CanaryConfig, ConfigMapRef, RolloutsConfig
from loragate.monitoring.rollout.controller import RolloutController
from loragate.monitoring.rollout.errors import RolloutError
from loragate.monitoring.rollout.judge import judge
from loragate.monitoring.rollout.metrics import RolloutMetrics
from loragate.monitoring.rollout.routes import RoutesConfigMap, RoutesFile, set_weights
from loragate.monitoring.service import Monitor, MonitorConfig
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
HEALTHY = Measurements(canary_answered=100, stable_answered=900, canary_p95_s=0.4, stable_p95_s=0.4)
FAILING = Measurements(canary_answered=0, canary_fallbacks=100, stable_answered=900, stable_p95_s=0.4)
QUIET = Measurements(canary_answered=3, stable_answered=50)


class FakePrometheus:
    """A MetricsSource that answers each analysis with the next programmed Measurements."""

    def __init__(self, *answers: Measurements | Exception) -> None:
        self.answers = list(answers)
        self.windows: list[float] = []

    async def measure(self, config, window_s):
        self.windows.append(window_s)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def spec(**overrides) -> CanaryConfig:
    return CanaryConfig(**{"route": "support", "stable": "v1", "canary": "v2", "steps": [5, 25, 50, 100],
                           "interval_s": 60, "min_requests": 20, **overrides})


def controller(tmp_path, source, *, routes=None, **spec_overrides) -> RolloutController:
    path = tmp_path / "routes.yaml"
    if not path.exists():
        path.write_text(ROUTES)
    config = RolloutsConfig(routes_file=str(path), state_file=str(tmp_path / "rollouts.json"),
                            canaries=[spec(**spec_overrides)])
    return RolloutController(config, source, routes=routes)


def weights(tmp_path, route="support") -> dict[str, float]:
    catalog = parse_catalog((tmp_path / "routes.yaml").read_text())
    return {v.name: v.weight for v in catalog.routes[route].variants}


def sample(c: RolloutController, name: str, **labels) -> float | None:
    return c.metrics.registry.get_sample_value(name, {"route": "support", "canary": "v2", **labels})


# --- judging -----------------------------------------------------------------------------------

def test_judge_passes_a_healthy_canary_and_reports_every_check():
    analysis = judge(spec(), HEALTHY)
    assert analysis.verdict == "pass"
    assert analysis.values == {"canary_requests": 100, "error_rate_increase": 0.0, "latency_p95_ratio": 1.0,
                               "fallback_rate": 0.0, "feedback_score": None}


def test_judge_fails_a_canary_hidden_by_the_fallback():
    """Clients got 200s from the fallback; only the fallback rate shows the canary fails."""
    analysis = judge(spec(), FAILING)
    assert analysis.verdict == "fail" and analysis.failed == ["fallback_rate"]
    assert analysis.values["fallback_rate"] == 1.0 and analysis.values["canary_requests"] == 100


@pytest.mark.parametrize("measured, failed", [
    (Measurements(canary_answered=100, canary_errors=5, stable_answered=900, stable_errors=9), ["error_rate_increase"]),
    (Measurements(canary_answered=100, canary_errors=1, stable_answered=900, stable_errors=9), []),  # same rate
    (Measurements(canary_answered=100, stable_answered=900, canary_p95_s=1.0, stable_p95_s=0.5), ["latency_p95_ratio"]),
    # Under the floor (0.1 s) latency differences are noise: 0.004 vs 0.001 s is no regression.
    (Measurements(canary_answered=100, stable_answered=900, canary_p95_s=0.004, stable_p95_s=0.001), []),
    # No stable traffic: latency is not judged, errors are compared with 0.
    (Measurements(canary_answered=100, canary_p95_s=3.0), []),
    (Measurements(canary_answered=100, canary_errors=2), ["error_rate_increase"]),
])
def test_judge_thresholds(measured, failed):
    analysis = judge(spec(), measured)
    assert analysis.failed == failed and analysis.verdict == ("fail" if failed else "pass")


def test_judge_feedback_only_when_configured_and_with_enough_scores():
    thresholds = {"min_feedback_score": 0.6, "min_feedback": 10}
    low = Measurements(canary_answered=100, feedback_count=20, feedback_sum=8)
    assert judge(spec(thresholds=thresholds), low).failed == ["feedback_score"]
    assert judge(spec(), low).verdict == "pass"  # no feedback threshold configured
    few = Measurements(canary_answered=100, feedback_count=5, feedback_sum=0)
    assert judge(spec(thresholds=thresholds), few).values["feedback_score"] is None


def test_judge_is_inconclusive_with_too_little_canary_traffic():
    analysis = judge(spec(), QUIET)
    assert analysis.verdict == "inconclusive" and "3 canary requests, 20 needed" in analysis.reason


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
    assert sample(c, "loragate_rollout_analysis", check="latency_p95_ratio") == 1.0
    assert math.isnan(sample(c, "loragate_rollout_analysis", check="feedback_score"))


async def test_a_failing_analysis_rolls_back(tmp_path):
    c = controller(tmp_path, FakePrometheus(HEALTHY, FAILING))
    await c.tick(now=0)
    await c.tick(now=60)  # pass: 25 %
    (transition,) = await c.tick(now=120)
    assert transition.action == "rollback" and transition.analysis.failed == ["fallback_rate"]
    assert weights(tmp_path)["v2"] == 0 and weights(tmp_path)["v1"] == 100
    assert c.status()["support"]["state"] == "rolled_back"
    assert sample(c, "loragate_rollout_state", state="rolled_back") == 1
    assert sample(c, "loragate_rollout_analysis", check="fallback_rate") == 1.0
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
    assert sample(c, "loragate_rollout_analysis", check="canary_requests") == 100


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
    config = RolloutsConfig(configmap=ConfigMapRef(name="lg-loragate-routes", namespace="llm"),
                            state_file=str(tmp_path / "rollouts.json"), canaries=[spec()])
    c = RolloutController(config, FakePrometheus(HEALTHY), k8s_api=api)
    assert isinstance(c.routes, RoutesConfigMap)
    await c.tick(now=0)
    assert [(n, ns, b["metadata"]["resourceVersion"]) for n, ns, b in api.patches] == [
        ("lg-loragate-routes", "llm", "7"), ("lg-loragate-routes", "llm", "8")]  # a conflict, read again
    catalog = parse_catalog(api.data["routes.yaml"])
    assert {v.name: v.weight for v in catalog.routes["support"].variants} == {"v1": 95, "v2": 5, "base": 0}
    await c.tick(now=60)
    assert parse_catalog(api.data["routes.yaml"]).routes["support"].variant("v2").weight == 25


# --- PromQL and the Prometheus client ----------------------------------------------------------

def test_analysis_queries_select_the_route_and_variants():
    queries = analysis_queries("support", "v2", "v1", 59.2)
    assert queries["canary_errors"] == (
        'sum(increase(loragate_requests_total{route="support",variant="v2",status_class="5xx"}[60s]))')
    assert queries["canary_fallbacks"] == 'sum(increase(loragate_fallbacks_total{route="support",variant="v2"}[60s]))'
    assert queries["stable_p95_s"].startswith("histogram_quantile(0.95, sum by (le) (increase(")
    assert set(queries) == {f"{r}_{k}" for r in ("canary", "stable") for k in ("answered", "errors", "fallbacks", "p95_s")} | {
        "feedback_count", "feedback_sum"}


async def test_prometheus_analysis_reads_instant_queries():
    answers = {"canary_answered": "40", "canary_fallbacks": "10", "stable_answered": "400", "canary_p95_s": "NaN"}
    queries = {q: answers.get(name) for name, q in analysis_queries("support", "v2", "v1", 60).items()}

    async def query(request):
        value = queries[request.query["query"]]
        result = [] if value is None else [{"metric": {}, "value": [0, value]}]
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    async with serve(app) as port:
        m = await PrometheusAnalysis(Prometheus(f"http://127.0.0.1:{port}")).measure(spec(), 60)
    assert (m.canary_answered, m.canary_fallbacks, m.stable_answered, m.canary_errors) == (40, 10, 400, 0)
    assert m.canary_p95_s is None and m.stable_p95_s is None and m.canary_routed == 50


# --- configuration, the monitor, the CLI ----------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    ({"steps": [25, 5]}, "steps must increase"),
    ({"steps": [0, 50]}, "0 < w <= 100"),
    ({"steps": []}, "at least one"),
    ({"canary": "v1"}, "both 'v1'"),
    ({"thresholds": {"max_fallback_rat": 0.1}}, "extra"),
])
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
    config = MonitorConfig.model_validate({
        "request_log": str(tmp_path / "rl"), "prometheus_url": "http://127.0.0.1:9", "state_file": str(tmp_path / "s.json"),
        "rollouts": {"routes_file": str(tmp_path / "routes.yaml"), "state_file": str(tmp_path / "rollouts.json"),
                     "canaries": [spec().model_dump()]}})
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
    config.write_text(yaml.safe_dump({
        "request_log": str(tmp_path / "rl"), "prometheus_url": "http://127.0.0.1:9",
        "rollouts": {"routes_file": str(tmp_path / "routes.yaml"), "state_file": str(tmp_path / "rollouts.json"),
                     "canaries": [spec().model_dump()]}}))
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
    result = subprocess.run([promtool, "check", "metrics"], input=generate_latest(c.metrics.registry),
                            capture_output=True)
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

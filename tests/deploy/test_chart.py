"""The Helm chart: lint, render for several values files, and validate every manifest with the
Kubernetes schemas (kubernetes-validate --strict). Helm runs in-process through helm-python-sdk
(the Helm v4 library); there is no cluster, so `lookup` returns nothing and Capabilities are
Helm's defaults (no monitoring.coreos.com/v1)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from loragate.monitoring.config import MonitorConfig
from loragate.common.catalog import parse_catalog
from tests.deploy.tools import tool
from tests.processes import ROOT

CHART = ROOT / "helm" / "loragate"
VALUES_FILES = [None, *sorted((CHART / "ci").glob("*-values.yaml"))]
IDS = ["default", *(p.name.removesuffix("-values.yaml") for p in VALUES_FILES[1:])]
# Custom resources the Kubernetes schemas do not know; kubernetes-validate skips them with a
# warning, so they are checked here by structure and their rules by promtool (test_monitoring.py);
# KEDA's ScaledObject against a JSON schema of the fields the chart uses (schemas/, from KEDA's reference).
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


def _values(path: Path | None) -> dict | None:
    return yaml.safe_load(path.read_text()) if path else None


def render(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="lg", namespace="llm", is_install=True)
    documents = []
    for name, text in rendered.items():
        if name.endswith("NOTES.txt"):
            continue
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def by_kind(documents: list[dict], kind: str) -> list[dict]:
    return [doc for doc in documents if doc["kind"] == kind]


def pod_specs(documents: list[dict]) -> list[tuple[str, dict]]:
    return [
        (doc["metadata"]["name"], doc["spec"]["template"]["spec"])
        for doc in documents
        if doc["kind"] in ("Deployment", "StatefulSet")
    ]


@pytest.fixture(scope="module", params=VALUES_FILES, ids=IDS)
def rendered(request) -> tuple[dict | None, list[dict]]:
    values = _values(request.param)
    return values, render(values)


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=IDS)
def test_helm_lint_strict_is_clean(values_file):
    report = helm.lint(CHART, _values(values_file), strict=True, namespace="llm", kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors; info passes
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=IDS)
def test_values_match_the_schema(values_file):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(_values(values_file))


@pytest.mark.parametrize(
    "bad",
    [
        {"engine": {"adapterSource": {"type": "nfs"}}},
        {"gateway": {"replicas": 0}},
        {"routes": [{"name": "support", "variants": [{"name": "v1", "wieght": 1}]}]},
        {"routes": [{"variants": [{"name": "v1", "weight": 1}]}]},
        {"auth": {"enabled": True, "existingSecret": ""}},
        {"metrics": {"prometheusOperator": "yes"}},
        {"monitor": {"checks": [{"route": "support", "variant": "v1"}]}},  # no reference
        {"monitor": {"checks": [{"route": "support", "reference": {"path": "a.jsonl", "window_s": 60}}]}},
        {
            "monitor": {
                "checks": [
                    {
                        "route": "support",
                        "reference": {"window_s": 60},
                        "actions": [{"type": "webhook", "url": "https://x.example", "secret": "inline"}],
                    }
                ]
            }
        },
        {
            "monitor": {
                "checks": [{"route": "support", "reference": {"window_s": 60}, "actions": [{"type": "dataset"}]}]
            }
        },
        {"monitor": {"port": 0}},
        {"limits": {"redis": {"mode": "external"}}},  # no url
        {"limits": {"redis": {"mode": "external", "url": "http://cache:6379"}}},
        {"limits": {"redis": {"mode": "cluster"}}},
        {"monitor": {"rollouts": [{"route": "support", "canary": "v2"}]}},  # no stable
        {"monitor": {"rollouts": [{"route": "support", "stable": "v1", "canary": "v2", "steps": [5, 250]}]}},
        {
            "monitor": {
                "rollouts": [
                    {"route": "support", "stable": "v1", "canary": "v2", "judge": {"error_rate": {"min_efect": 0.02}}}
                ]
            }
        },  # typo: rejected
        {
            "monitor": {
                "checks": [{"route": "support", "reference": {"window_s": 60}, "actions": [{"type": "pipeline"}]}]
            }
        },
        {
            "monitor": {
                "checks": [
                    {
                        "route": "support",
                        "reference": {"window_s": 60},
                        "actions": [
                            {
                                "type": "pipeline",
                                "pipeline": {
                                    "registry": "/r",
                                    "base_model": "/m",
                                    "state_dir": "/s",
                                    "engines": ["http://e:8000"],
                                    "rollout": {"canary": "v9"},
                                },
                            }
                        ],
                    }
                ]
            }
        },  # set by the pipeline
        {"monitor": {"training": {"enabled": True, "registry": {"existingClaim": ""}}}},
        {"monitor": {"training": {"gpu": 2}}},  # typo: rejected
        {"monitor": {"training": {"gpus": 0}}},
        {"monitor": {"training": {"backoffLimit": 0}}},  # an evicted run must be retried (it resumes)
        {"engine": {"keda": {"enabled": "yes"}}},
        {"engine": {"keda": {"kvCacheUsage": 80}}},  # a share, 0-1
        {"gateway": {"keda": {"minReplicas": 0}}},
        {"gateway": {"keda": {"inFlightPerPod": 10}}},  # typo: rejected
    ],
)
def test_schema_rejects_bad_values(bad):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError):
        chart.validate_schema(bad)


def test_every_manifest_validates_strictly_against_kubernetes_schemas(rendered, tmp_path):
    _, documents = rendered
    files = []
    for i, doc in enumerate(documents):
        if doc["kind"] in CRD_KINDS:
            continue
        path = tmp_path / f"{i:02d}-{doc['kind']}-{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    assert files
    for version in ("1.30.0", "1.37.0"):
        result = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *files], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_no_duplicate_keys_and_every_object_namespaced(rendered):
    _, documents = rendered
    for doc in documents:
        assert doc["metadata"]["namespace"] == "llm", (doc["kind"], doc["metadata"]["name"])
    names = [(d["kind"], d["metadata"]["name"]) for d in documents]
    assert len(names) == len(set(names))


def test_pods_are_hardened_and_have_resources_and_probes(rendered):
    _, documents = rendered
    for name, spec in pod_specs(documents):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert container["resources"]["requests"]["memory"], (name, container["name"])
        for container in spec["containers"]:
            assert container["readinessProbe"] and container["livenessProbe"], (name, container["name"])


def test_gateway_one_worker_probes_routes_and_auth(rendered):
    values, documents = rendered
    (gateway,) = [d for d in by_kind(documents, "Deployment") if d["metadata"]["name"] == "lg-loragate-gateway"]
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["LORAGATE_WORKERS"]["value"] == "1"
    assert env["LORAGATE_HOST"]["value"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    auth = (values or {}).get("auth", {}).get("enabled", True)
    assert ("LORAGATE_API_KEYS_FILE" in env) is auth
    assert env["LORAGATE_AUTH"]["value"] == str(auth).lower()
    request_log = (values or {}).get("requestLog", {})
    if request_log.get("enabled"):
        expected = request_log.get("url") or "/var/lib/loragate/requestlog"
        assert env["LORAGATE_REQUEST_LOG_URL"]["value"] == expected
        assert env["LORAGATE_REQUEST_LOG_WRITER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    else:
        assert "LORAGATE_REQUEST_LOG_URL" not in env
    if auth:
        assert "secretKeyRef" in env["LORAGATE_ADMIN_TOKEN"]["valueFrom"]
    # The routes ConfigMap is mounted as a directory (updates propagate) and is a valid catalog.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "routes")
    assert "subPath" not in mount and env["LORAGATE_ROUTES_FILE"]["value"].startswith(mount["mountPath"] + "/")
    (routes,) = [d for d in by_kind(documents, "ConfigMap") if d["metadata"]["name"] == "lg-loragate-routes"]
    catalog = parse_catalog(routes["data"]["routes.yaml"])
    given = (values or {}).get("routes") or render_defaults()["routes"]
    assert set(catalog.routes) == {route["name"] for route in given}  # a list: replaced, never merged
    engine_enabled = (values or {}).get("engine", {}).get("enabled", True)
    upstreams = env["LORAGATE_UPSTREAMS"]["value"].split(",")
    if engine_enabled:  # the headless Service: the gateways re-resolve it (DNS discovery), whatever the replicas
        assert upstreams == ["http://lg-loragate-engine.llm.svc:8000"]
        (headless,) = [d for d in by_kind(documents, "Service") if d["metadata"]["name"] == "lg-loragate-engine"]
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    # Scale by replicas: the HPA (or KEDA's ScaledObject) owns the count when enabled.
    hpa = by_kind(documents, "HorizontalPodAutoscaler") + [
        d for d in by_kind(documents, "ScaledObject") if d["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    ]
    assert ("replicas" in gateway["spec"]) is (not hpa)


def test_shared_limits_redis_only_the_gateways_reach(rendered):
    values, documents = rendered
    values = values or {}
    (gateway,) = [d for d in by_kind(documents, "Deployment") if d["metadata"]["name"] == "lg-loragate-gateway"]
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    redis = values.get("limits", {}).get("redis", {})
    mode = redis.get("mode", "internal") if values.get("auth", {}).get("enabled", True) else "none"
    statefulsets = [d for d in by_kind(documents, "StatefulSet") if d["metadata"]["name"] == "lg-loragate-redis"]
    assert bool(statefulsets) is (mode == "internal")
    if mode == "none":
        assert not any(name.startswith("LORAGATE_LIMITS_") for name in env)
        return
    expected = redis["url"] if mode == "external" else "redis://lg-loragate-redis.llm.svc:6379/0"
    assert env["LORAGATE_LIMITS_URL"]["value"] == expected
    assert env["LORAGATE_LIMITS_FAIL_CLOSED"]["value"] == str(redis.get("failClosed", False)).lower()
    secret = redis.get("passwordSecret", {}).get("name")
    assert ("LORAGATE_LIMITS_PASSWORD" in env) is bool(secret)
    if secret:
        assert env["LORAGATE_LIMITS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == secret
    if mode == "internal" and values.get("networkPolicy", {}).get("enabled", True):
        (policy,) = [d for d in by_kind(documents, "NetworkPolicy") if d["metadata"]["name"] == "lg-loragate-redis"]
        (rule,) = policy["spec"]["ingress"]
        assert rule["from"] == [
            {
                "podSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/name": "loragate",
                        "app.kubernetes.io/instance": "lg",
                        "app.kubernetes.io/component": "gateway",
                    }
                }
            }
        ]


def test_internal_redis_with_a_password_from_a_secret():
    documents = render({"limits": {"redis": {"passwordSecret": {"name": "loragate-redis"}}}})
    (redis,) = [d for d in by_kind(documents, "StatefulSet") if d["metadata"]["name"] == "lg-loragate-redis"]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "loragate-redis", "key": "password"}


def render_defaults() -> dict:
    with helm.Chart.load(CHART) as chart:
        return chart.values


def test_engine_runs_vllm_with_lora_on_gpus(rendered):
    values, documents = rendered
    statefulsets = [d for d in by_kind(documents, "StatefulSet") if d["metadata"]["name"] != "lg-loragate-redis"]
    if (values or {}).get("engine", {}).get("enabled", True) is False:
        assert not statefulsets
        return
    (engine,) = statefulsets
    spec = engine["spec"]["template"]["spec"]
    vllm = spec["containers"][0]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    args = vllm["args"]
    for flag in ("--enable-lora", "--lora-modules"):
        assert flag in args
    assert any(a.startswith("--max-loras=") for a in args) and any(a.startswith("--max-lora-rank=") for a in args)
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] >= 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"]["path"] == "/health"
    mounts = {m["mountPath"] for m in vllm["volumeMounts"]}
    assert {"/models", "/adapters"} <= mounts
    assert engine["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "model-cache"
    source = (values or {}).get("engine", {}).get("adapterSource", {}).get("type", "pvc")
    adapters = next(v for v in spec["volumes"] if v["name"] == "adapters")
    if source == "objectStore":
        assert "emptyDir" in adapters and spec["initContainers"][0]["command"][:3] == ["aws", "s3", "sync"]
    else:
        assert adapters["persistentVolumeClaim"]["readOnly"] is True


def test_monitor_rbac_is_least_privilege(rendered):
    values, documents = rendered
    roles = by_kind(documents, "Role")
    if (values or {}).get("monitor", {}).get("enabled", True) is False:
        assert not roles and not by_kind(documents, "RoleBinding")
        return
    (role,) = roles
    training = (values or {}).get("monitor", {}).get("training", {}).get("enabled", False)
    job_verbs = ["create", "get", "list", "watch"] if training else ["create"]  # follows its training Jobs
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": job_verbs},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["lg-loragate-routes"],
            "verbs": ["get", "patch"],
        },
    ]
    assert not by_kind(documents, "ClusterRole") and not by_kind(documents, "ClusterRoleBinding")


def _monitor(documents: list[dict]) -> tuple[dict, dict, MonitorConfig]:
    (deployment,) = [d for d in by_kind(documents, "Deployment") if d["metadata"]["name"] == "lg-loragate-monitor"]
    (configmap,) = [d for d in by_kind(documents, "ConfigMap") if d["metadata"]["name"] == "lg-loragate-monitor"]
    return deployment, configmap, MonitorConfig.model_validate(yaml.safe_load(configmap["data"]["monitor.yaml"]))


def test_monitor_runs_the_real_cli_with_its_rendered_config(rendered):
    """The ConfigMap is a valid monitoring/service.py MonitorConfig and agrees with the pod, the
    Service, the gateway's request log and the probes; the webhook key comes from a Secret."""
    values, documents = rendered
    values = values or {}
    monitor_values = render_defaults()["monitor"] | values.get("monitor", {})
    if not monitor_values["enabled"]:
        assert not [d for d in documents if d["metadata"]["name"].startswith("lg-loragate-monitor")]
        return
    deployment, configmap, config = _monitor(documents)
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["command"] == ["loragate"]
    assert container["args"] == ["monitor", "--config", "/etc/loragate/monitor.yaml"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/loragate/monitor.yaml"]["subPath"] == "monitor.yaml"
    assert config.host == "0.0.0.0" and config.port == monitor_values["port"]
    assert [p["containerPort"] for p in container["ports"]] == [config.port]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    (service,) = [d for d in by_kind(documents, "Service") if d["metadata"]["name"] == "lg-loragate-monitor"]
    assert service["spec"]["ports"][0]["port"] == config.port
    assert config.prometheus_url == (monitor_values["prometheusUrl"] or None)
    assert len(config.checks) == len(monitor_values["checks"])
    # The request log the monitor reads is the one the gateways write.
    (gateway,) = [d for d in by_kind(documents, "Deployment") if d["metadata"]["name"] == "lg-loragate-gateway"]
    gateway_env = {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    if "LORAGATE_REQUEST_LOG_URL" in gateway_env:
        assert config.request_log == gateway_env["LORAGATE_REQUEST_LOG_URL"]
        if not config.request_log.startswith("s3://"):
            assert mounts[config.request_log]["readOnly"] is True
    # Reports and trigger state are on the data volume (the root filesystem is read-only).
    data_dir = monitor_values["dataDir"]
    assert mounts[data_dir]["name"] == "data"
    assert config.output_dir.startswith(data_dir + "/") and config.state_file.startswith(data_dir + "/")
    (data,) = [v for v in spec["volumes"] if v["name"] == "data"]
    if monitor_values["persistence"].get("enabled", True):
        claim = data["persistentVolumeClaim"]["claimName"]
        if not monitor_values["persistence"].get("existingClaim"):
            assert claim in {d["metadata"]["name"] for d in by_kind(documents, "PersistentVolumeClaim")}
    else:
        assert "emptyDir" in data
    env = {e["name"]: e for e in container.get("env", [])}
    for check in config.checks:
        for action in check.actions:
            if action.type == "webhook":
                assert action.secret is None
                assert env[action.secret_env]["valueFrom"]["secretKeyRef"]["name"]
            if action.type == "k8s_job" and action.template.startswith("/etc/loragate/"):
                assert mounts[action.template]["subPath"] in configmap["data"]
                assert action.namespace == "llm"  # where the Role lets it create Jobs
    # A new config rolls the pod (the monitor reads it at start).
    assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    # Rollouts patch the routes ConfigMap the gateways mount, in the release namespace, which the
    # monitor's Role may get and patch; each rollout names a route and variants of the catalog.
    rollouts = monitor_values.get("rollouts") or []
    pipelines = [a for c in config.checks for a in c.actions if a.type == "pipeline"]  # add rollouts at run time
    assert (config.rollouts is not None) is bool(rollouts or pipelines)
    if rollouts or pipelines:
        (routes_cm,) = [d for d in by_kind(documents, "ConfigMap") if d["metadata"]["name"] == "lg-loragate-routes"]
        source = config.rollouts.configmap
        assert (source.name, source.namespace, source.key) == ("lg-loragate-routes", "llm", "routes.yaml")
        assert config.rollouts.routes_file is None and config.rollouts.state_file.startswith(data_dir + "/")
        catalog = parse_catalog(routes_cm["data"][source.key])
        for canary in config.rollouts.canaries:
            route = catalog.routes[canary.route]
            assert route.variant(canary.canary) and route.variant(canary.stable)
        (role,) = [d for d in by_kind(documents, "Role") if d["metadata"]["name"] == "lg-loragate-monitor"]
        assert {
            "resources": ["configmaps"],
            "resourceNames": ["lg-loragate-routes"],
            "verbs": ["get", "patch"],
            "apiGroups": [""],
        } in role["rules"]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"monitor": {"checks": [{"route": "support", "reference": {"window_s": 60}}]}}, "requestLog.enabled"),
        (
            {
                "requestLog": {"enabled": True, "url": "s3://b/p"},
                "monitor": {
                    "checks": [
                        {
                            "route": "support",
                            "reference": {"window_s": 60},
                            "actions": [
                                {
                                    "type": "webhook",
                                    "url": "https://ci.example/hook",
                                    "secret_env": "LORAGATE_WEBHOOK_SECRET",
                                }
                            ],
                        }
                    ]
                },
            },
            "webhookSecret.existingSecret",
        ),
        (
            {
                "requestLog": {"enabled": True, "url": "s3://b/p"},
                "monitor": {
                    "checks": [
                        {
                            "route": "support",
                            "reference": {"window_s": 60},
                            "actions": [
                                {"type": "k8s_job", "template": "/etc/loragate/retrain-job.yaml", "namespace": "llm"}
                            ],
                        }
                    ]
                },
            },
            "retrainJobTemplate",
        ),
        (
            {
                "requestLog": {"enabled": True, "url": "s3://b/p"},
                "monitor": {
                    "retrainJobTemplate": "kind: Job",
                    "checks": [
                        {
                            "route": "support",
                            "reference": {"window_s": 60},
                            "actions": [
                                {"type": "k8s_job", "template": "/etc/loragate/retrain-job.yaml", "namespace": "ml"}
                            ],
                        }
                    ],
                },
            },
            "release namespace",
        ),
        (
            {"monitor": {"prometheusUrl": "", "rollouts": [{"route": "support", "stable": "v1", "canary": "v2"}]}},
            "monitor.prometheusUrl",
        ),
        (
            {
                "requestLog": {"enabled": True, "url": "s3://b/p"},
                "monitor": {
                    "checks": [
                        {
                            "route": "support",
                            "reference": {"window_s": 60},
                            "actions": [
                                {"type": "k8s_job", "template": "/etc/loragate/training-job.yaml", "namespace": "llm"}
                            ],
                        }
                    ]
                },
            },
            "monitor.training.enabled",
        ),
        (
            {
                "requestLog": {"enabled": True, "url": "s3://b/p"},
                "monitor": {
                    "prometheusUrl": "",
                    "checks": [
                        {
                            "route": "support",
                            "reference": {"window_s": 60},
                            "actions": [
                                {
                                    "type": "pipeline",
                                    "pipeline": {
                                        "registry": "/r",
                                        "base_model": "/m",
                                        "state_dir": "/s",
                                        "engines": ["http://e:8000"],
                                    },
                                }
                            ],
                        }
                    ],
                },
            },
            "check support: a pipeline action .* monitor.prometheusUrl",
        ),
    ],
)
def test_monitor_config_mistakes_fail_the_render(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_dashboards_network_policies_and_operator_resources(rendered):
    values, documents = rendered
    values = values or {}
    dashboards = [d for d in by_kind(documents, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    if values.get("grafana", {}).get("dashboards", {}).get("enabled", True):
        shipped = {p.name: p.read_text() for p in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")}
        assert {k: v + "\n" for d in dashboards for k, v in d["data"].items()} == shipped
    else:
        assert not dashboards
    policies = by_kind(documents, "NetworkPolicy")
    assert bool(policies) is values.get("networkPolicy", {}).get("enabled", True)
    operator = values.get("metrics", {}).get("prometheusOperator", "auto") is True
    monitors, rules = by_kind(documents, "ServiceMonitor"), by_kind(documents, "PrometheusRule")
    assert bool(monitors) is operator and bool(rules) is operator
    for monitor in monitors:
        endpoint = monitor["spec"]["endpoints"][0]
        assert endpoint["path"] == "/metrics" and endpoint["relabelings"][0]["targetLabel"] == "job"
    if operator:
        shipped = [
            g
            for p in sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
            for g in yaml.safe_load(p.read_text())["groups"]
        ]
        assert rules[0]["spec"]["groups"] == shipped


def test_prometheus_operator_resources_follow_the_capability_by_default():
    """metrics.prometheusOperator=auto renders them only where monitoring.coreos.com/v1 is served;
    offline Helm has no such API, so nothing is rendered; true forces them."""
    assert not by_kind(render(), "ServiceMonitor")
    forced = render({"metrics": {"prometheusOperator": True}})
    assert {d["metadata"]["name"] for d in by_kind(forced, "ServiceMonitor")} == {
        "lg-loragate-gateway",
        "lg-loragate-engine",
        "lg-loragate-monitor",
    }


def test_notes_say_one_worker_per_pod():
    with helm.Chart.load(CHART) as chart:
        notes = chart.render(name="lg", namespace="llm")["loragate/templates/NOTES.txt"]
    assert "ONE uvicorn worker" in notes and "lg-loragate-gateway" in notes


def test_every_loragate_setting_the_deployments_set_exists(rendered):
    """A misspelt LORAGATE_* variable is silently ignored by pydantic-settings: catch it here."""
    from loragate.service.settings import Settings

    known = {f"LORAGATE_{name.upper()}" for name in Settings.model_fields}
    _values, documents = rendered
    for name, spec in pod_specs(documents):
        for container in spec["containers"]:
            for env in container.get("env", []):
                if env["name"].startswith("LORAGATE_") and "gateway" in name:
                    assert env["name"] in known, f"{name}: {env['name']} is not a gateway setting"


def test_compose_and_dockerfile_set_only_real_gateway_settings():
    import re

    from loragate.service.settings import Settings

    known = {f"LORAGATE_{name.upper()}" for name in Settings.model_fields}
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    gateway_env = compose["services"]["gateway"].get("environment", {})
    names = set(gateway_env) if isinstance(gateway_env, dict) else {e.split("=")[0] for e in gateway_env}
    dockerfile = (ROOT / "Dockerfile").read_text()
    names |= set(re.findall(r"\b(LORAGATE_[A-Z_]+)=", dockerfile))
    unknown = {n for n in names if n.startswith("LORAGATE_") and n not in known}
    assert not unknown, unknown


def test_training_job_template_runs_the_pipeline_on_a_gpu_with_the_monitor_image(tmp_path):
    """monitor.training: the Job template in the monitor's ConfigMap, filled by the real k8s_job action
    the rendered config builds, is a strictly valid batch/v1 Job: the monitor's image, `loragate
    pipeline run` for the trigger's route/run/dataset, one GPU, the registry claim at the registry path
    (also in the monitor, and read-only in the engine, where the gate loads the candidate from)."""
    import asyncio
    from types import SimpleNamespace

    from loragate.monitoring.triggers.kube_job import KubernetesJobAction

    values = _values(CHART / "ci" / "training-values.yaml")
    training = values["monitor"]["training"]
    documents = render(values)
    deployment, configmap, config = _monitor(documents)
    assert config.adapter_registry == "/registry"
    (check,) = [c for c in config.checks if c.route == "support"]
    job_action = check.actions[1]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[job_action.template]["subPath"] == "training-job.yaml" and "training-job.yaml" in configmap["data"]
    assert mounts["/registry"]["name"] == "registry" and not mounts["/registry"].get("readOnly")

    created = []
    api = SimpleNamespace(create_namespaced_job=lambda ns, body: created.append((ns, body)) or body)
    # The file the action reads in the pod is this ConfigMap key (mounted by subPath).
    action = KubernetesJobAction(configmap["data"]["training-job.yaml"], job_action.namespace, api=api)
    ctx = SimpleNamespace(
        route="support",
        variant="v1",
        run_id="20261201024500",
        dataset_location="/registry/datasets/support-20261201024500.jsonl",
        result=SimpleNamespace(html_path="/r.html", json_path="/r.json"),
    )
    assert asyncio.run(action.run(ctx)).ok
    ((namespace, job),) = created
    assert namespace == "llm" and job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    assert job["metadata"]["generateName"] == "lg-loragate-train-"
    assert job["metadata"]["labels"]["loragate.io/route"] == "support"
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump({**job, "metadata": {**job["metadata"], "name": "lg-loragate-train-x", "namespace": "llm"}})
    )
    for version in ("1.30.0", "1.37.0"):
        result = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (train,) = pod["containers"]
    assert train["image"] == container["image"]  # the monitor's image
    assert train["securityContext"]["readOnlyRootFilesystem"] is True
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == training["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert train["command"] == ["loragate"]
    assert train["args"] == [
        "pipeline",
        "run",
        "--state-file=/registry/pipelines/support-20261201024500.json",
        "--route=support",
        "--dataset=/registry/datasets/support-20261201024500.jsonl",
        "--base-model=/models/llama-3.1-8b-instruct",
        "--registry=/registry",
        "--name=support",
        "--version=r20261201024500",
        "--stable=/registry/support/v1",
        "--engine=http://lg-loragate-engine-0.lg-loragate-engine.llm.svc:8000",
        "--train-arg=--checkpoint-every=100",
        "--train-arg=--epochs=2",
    ]
    # The same command line parses with the real CLI.
    import argparse

    from loragate.pipeline.commands import add_pipeline_arguments

    parser = argparse.ArgumentParser(prog="loragate")
    add_pipeline_arguments(parser.add_subparsers(dest="command").add_parser("pipeline"))
    parsed = parser.parse_args(train["args"])
    assert (parsed.route, parsed.version, parsed.train_arg) == (
        "support",
        "r20261201024500",
        ["--checkpoint-every=100", "--epochs=2"],
    )
    # Evicted pods are retried and resume from the checkpoint: backoffLimit > 0, time to save it on SIGTERM.
    assert job["spec"]["backoffLimit"] >= 1 and pod["terminationGracePeriodSeconds"] >= 60
    assert train["resources"]["requests"]["nvidia.com/gpu"] == 1 and "/dev/shm" not in {
        m["mountPath"] for m in train["volumeMounts"]
    }
    job_mounts = {m["mountPath"]: m["name"] for m in train["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims[job_mounts["/registry"]] == "loragate-registry" and claims[job_mounts["/models"]] == "loragate-models"
    assert job_mounts["/tmp"] == "tmp"
    # The dataset the monitor exports lands on the registry claim the Job mounts.
    assert check.actions[0].location.startswith("/registry/")

    (engine,) = [d for d in by_kind(documents, "StatefulSet") if d["metadata"]["name"] == "lg-loragate-engine"]
    engine_spec = engine["spec"]["template"]["spec"]
    vllm_mounts = {m["mountPath"]: m for m in engine_spec["containers"][0]["volumeMounts"]}
    assert vllm_mounts["/registry"]["readOnly"] is True
    (registry,) = [v for v in engine_spec["volumes"] if v["name"] == vllm_mounts["/registry"]["name"]]
    assert registry["persistentVolumeClaim"] == {"claimName": "loragate-registry", "readOnly": True}
    # Without training: no template, no registry anywhere.
    default = render()
    _, default_cm, default_config = _monitor(default)
    assert "training-job.yaml" not in default_cm["data"] and default_config.adapter_registry is None


# --- KEDA autoscaling -------------------------------------------------------------------------------

KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-scaledobject.schema.json"
KEDA_VALUES = CHART / "ci" / "keda-values.yaml"
# What each component exports (vLLM 0.32's /metrics, service/metrics.py): the queries must name these.
EXPORTED = {
    "engine": {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"},
    "gateway": {"loragate_requests_in_flight"},
}


def _keda_validator():
    import json

    import jsonschema

    schema = json.loads(KEDA_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_keda_is_off_offline_by_default_and_the_replicas_stay_the_charts():
    """engine.keda=auto renders only where keda.sh/v1alpha1 is served (offline Helm: not); the gateway's is off."""
    documents = render()
    assert not by_kind(documents, "ScaledObject")
    assert [h["spec"]["scaleTargetRef"]["name"] for h in by_kind(documents, "HorizontalPodAutoscaler")] == [
        "lg-loragate-gateway"
    ]
    engine = next(d for d in by_kind(documents, "StatefulSet") if d["metadata"]["name"] == "lg-loragate-engine")
    assert engine["spec"]["replicas"] == 1


def test_keda_scaled_objects_match_kedas_schema_and_scale_what_the_chart_renders():
    documents = render(_values(KEDA_VALUES))
    scaled = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in by_kind(documents, "ScaledObject")}
    assert set(scaled) == {"engine", "gateway"}
    validator = _keda_validator()
    targets = {(d["kind"], d["metadata"]["name"]): d for d in documents if d["kind"] in ("Deployment", "StatefulSet")}
    for component, scaled_object in scaled.items():
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(scaled_object)]
        assert not errors, (component, errors)
        spec = scaled_object["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        ref = spec["scaleTargetRef"]
        target = targets[(ref["kind"], ref["name"])]  # the chart's own workload, in the same namespace
        assert target["metadata"]["labels"]["app.kubernetes.io/component"] == component
        assert "replicas" not in target["spec"]  # else every helm upgrade would undo KEDA's count
        for trigger in spec["triggers"]:
            if trigger["type"] == "cpu":  # KEDA refuses a CPU trigger on containers without a CPU request
                assert all(c["resources"]["requests"]["cpu"] for c in target["spec"]["template"]["spec"]["containers"])
        queries = [t["metadata"]["query"] for t in spec["triggers"] if t["type"] == "prometheus"]
        named = {m for q in queries for m in re.findall(r"[a-z_:]+(?=\{)", q)}
        assert named == EXPORTED[component], queries
        assert all('namespace="llm"' in q for q in queries)  # this release's pods only
    # KEDA makes its own HPA for the gateway: the chart's CPU HPA would fight it.
    assert not by_kind(documents, "HorizontalPodAutoscaler")
    engine_triggers = {t["name"]: t for t in scaled["engine"]["spec"]["triggers"]}
    assert engine_triggers["queue-depth"]["metadata"]["threshold"] == "2.5"  # the values file's, as a string
    assert engine_triggers["queue-depth"]["metricType"] == "AverageValue"  # per replica
    assert engine_triggers["kv-cache-usage"]["metricType"] == "Value"  # a mean share, not per replica
    gateway_servers = {
        t["metadata"]["serverAddress"] for t in scaled["gateway"]["spec"]["triggers"] if t["type"] == "prometheus"
    }
    assert gateway_servers == {"http://prometheus.monitoring.svc:9090"}


def test_keda_queries_are_valid_promql(tmp_path):
    documents = render(_values(KEDA_VALUES))
    queries = [
        t["metadata"]["query"]
        for d in by_kind(documents, "ScaledObject")
        for t in d["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]
    rules = {
        "groups": [{"name": "keda", "rules": [{"record": f"keda:query{i}", "expr": q} for i, q in enumerate(queries)]}]
    }
    (tmp_path / "keda.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(tmp_path / "keda.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0 and f"{len(queries)} rules found" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize(
    "mistake",
    [
        lambda so: so["spec"]["triggers"][0]["metadata"].update(threshold=4),  # a number: the CRD wants strings
        lambda so: so["spec"].update(minReplicas=so["spec"].pop("minReplicaCount")),  # HPA's name, not KEDA's
        lambda so: so["spec"]["triggers"][0]["metadata"].pop("serverAddress"),
        lambda so: so["spec"]["triggers"].append({"type": "cpu", "metricType": "Value", "metadata": {"value": "70"}}),
        lambda so: so["spec"]["triggers"][0].update(metricType="Average"),
        lambda so: so.update(apiVersion="keda.sh/v1"),
    ],
    ids=["numeric-threshold", "hpa-field-name", "no-server", "cpu-value", "bad-metric-type", "bad-version"],
)
def test_the_keda_schema_catches_the_mistakes_it_is_for(mistake):
    import copy

    (scaled_object, *_) = by_kind(render(_values(KEDA_VALUES)), "ScaledObject")
    validator = _keda_validator()
    assert not list(validator.iter_errors(scaled_object))
    broken = copy.deepcopy(scaled_object)
    mistake(broken)
    assert list(validator.iter_errors(broken))


def test_training_job_with_several_gpus_runs_as_many_processes(tmp_path):
    """monitor.training.gpus: N GPUs on one node, `loragate train --processes N` (torchrun), /dev/shm for
    NCCL; the rendered Job stays strictly valid and its train arguments parse with the real CLI."""
    import argparse

    from loragate.pipeline.commands import add_pipeline_arguments, add_train_arguments

    values = _values(CHART / "ci" / "training-values.yaml")
    values["monitor"]["training"].update(
        gpus=4, checkpointEvery=50, resources={"requests": {"cpu": "16"}, "limits": {"memory": "256Gi"}}
    )
    _, configmap, _ = _monitor(render(values))
    job = yaml.safe_load(configmap["data"]["training-job.yaml"].replace("${", "x{"))
    pod = job["spec"]["template"]["spec"]
    (train,) = pod["containers"]
    assert train["resources"] == {
        "requests": {"cpu": "16", "memory": "32Gi", "nvidia.com/gpu": 4},
        "limits": {"memory": "256Gi", "nvidia.com/gpu": 4},
    }
    shm = {m["mountPath"]: m["name"] for m in train["volumeMounts"]}["/dev/shm"]
    assert {v["name"]: v for v in pod["volumes"]}[shm]["emptyDir"]["medium"] == "Memory"
    parser = argparse.ArgumentParser(prog="loragate")
    add_pipeline_arguments(parser.add_subparsers(dest="command").add_parser("pipeline"))
    train_args = parser.parse_args(train["args"]).train_arg
    assert "--processes=4" in train_args and "--checkpoint-every=50" in train_args
    train_parser = argparse.ArgumentParser()
    add_train_arguments(train_parser)
    parsed = train_parser.parse_args(
        ["--dataset", "d", "--base-model", "b", "--registry", "r", "--name", "n", "--version", "v", *train_args]
    )
    assert (parsed.processes, parsed.checkpoint_every, parsed.epochs) == (4, 50, 2)
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump({**job, "metadata": {**job["metadata"], "name": "lg-loragate-train-x", "namespace": "llm"}})
    )
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", "1.30.0", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr

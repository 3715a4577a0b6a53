"""Start and stop the real processes the tests talk to (gateway, vLLM, stub, Prometheus)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen | None, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {process.returncode}\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{url} not ready after {timeout_s}s\n{tail}")


class Service:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._log_file = open(log, "ab")
        self.process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env or dict(os.environ),
            cwd=ROOT,
            start_new_session=True,
        )

    def stop(self, timeout_s: float = 20) -> int | None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_file.close()
        return self.process.returncode


def start_gateway(
    routes: Path, upstreams: list[str], log: Path, *, workers: int = 1, extra_env: dict[str, str] | None = None
) -> tuple[Service, str]:
    port = free_port()
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        {
            "LORAGATE_ROUTES_FILE": str(routes),
            "LORAGATE_UPSTREAMS": ",".join(upstreams),
            "LORAGATE_PORT": str(port),
            "LORAGATE_WORKERS": str(workers),
            "LORAGATE_HEALTH_INTERVAL_S": "1",
            "LORAGATE_ROUTES_RELOAD_INTERVAL_S": "0.5",
            **(extra_env or {}),
        }
    )
    service = Service([sys.executable, "-m", "loragate", "serve"], log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", service.process, 60, log)
    except Exception:
        service.stop()
        raise
    return service, url


def start_stub(log: Path, chunks: int = 16) -> tuple[Service, str]:
    port = free_port()
    service = Service(
        [sys.executable, str(ROOT / "tests" / "stub_upstream.py"), "--port", str(port), "--chunks", str(chunks)], log
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", service.process, 30, log)
    return service, url


def shipped_rules_every_second(directory: Path) -> list[Path]:
    """Copies of the shipped rule files with group intervals dropped, so they evaluate every scrape here."""
    import yaml

    paths = []
    for path in sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml")):
        data = yaml.safe_load(path.read_text())
        for group in data["groups"]:
            group.pop("interval", None)
        copy = directory / path.name
        copy.write_text(yaml.safe_dump(data, sort_keys=False))
        paths.append(copy)
    return paths


def start_prometheus(
    targets: dict[str, list[str]], directory: Path, *, rule_files: list[Path] = (), scrape_interval_s: float = 1
) -> tuple[Service, str]:
    """A real Prometheus (Debian package) scraping ``targets`` (job name -> ["host:port", ...])."""
    import shutil

    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed (apt-get install prometheus); scripts/setup.sh --test does it")
    port = free_port()
    config = directory / "prometheus.yml"
    lines = [
        "global:",
        f"  scrape_interval: {scrape_interval_s}s",
        f"  evaluation_interval: {scrape_interval_s}s",
    ]
    if rule_files:
        lines.append("rule_files:")
        lines += [f"  - {path}" for path in rule_files]
    lines.append("scrape_configs:")
    for job, hosts in targets.items():
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: {list(hosts)}"]
    config.write_text("\n".join(lines) + "\n")
    service = Service(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        directory / "prometheus.log",
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/-/ready", service.process, 30, directory / "prometheus.log")
    return service, url

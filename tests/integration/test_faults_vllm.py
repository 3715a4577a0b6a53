"""Faults made real on the real vLLM CPU engine: a replica killed mid-traffic, an engine stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import httpx
import pytest

from loragate.service.engine import engine_command, engine_env
from tests.metrics_text import sample_sum, scrape
from tests.processes import Service, free_port, start_gateway, wait_http

pytestmark = pytest.mark.integration
CHAT = [{"role": "user", "content": "Tell me a story about the sea."}]


@pytest.fixture(scope="module")
def second_engine(demo_model, tmp_path_factory):
    """Another vLLM replica (a1 registered), to be killed by the test."""
    port = free_port()
    log = tmp_path_factory.mktemp("engine-b") / "vllm.log"
    service = Service(
        engine_command(demo_model["base"], {"a1": demo_model["adapters"]["a1"]}, port=port, python=sys.executable),
        log,
        engine_env(),
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", service.process, 300, log)
    yield service, url
    service.stop()


def test_replica_killed_mid_traffic_loses_no_request(engine, second_engine, tmp_path):
    engine_b, url_b = second_engine
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  story:\n    variants: [{name: a1, adapter: a1, weight: 1}]\n")
    service, gateway = start_gateway(
        routes, [engine, url_b], tmp_path / "gw.log", extra_env={"LORAGATE_HEALTH_INTERVAL_S": "0.5"}
    )
    n = 60
    try:

        async def run() -> list[tuple[int, bool, str | None]]:
            finished = 0
            async with httpx.AsyncClient(timeout=120) as client:
                semaphore = asyncio.Semaphore(8)

                async def one(i: int):
                    nonlocal finished
                    async with semaphore:
                        stream = i % 2 == 0
                        response = await client.post(
                            f"{gateway}/v1/chat/completions",
                            json={"model": "story", "messages": CHAT, "max_tokens": 24, "stream": stream},
                        )
                        finished += 1
                        if finished == 15:
                            os.killpg(engine_b.process.pid, signal.SIGKILL)  # the replica dies mid-traffic
                        if stream:
                            complete = response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text
                        else:
                            complete = bool(response.json()["choices"][0]["message"]["content"])
                        return response.status_code, complete, response.headers.get("x-loragate-fallback")

                return await asyncio.gather(*(one(i) for i in range(n)))

        results = asyncio.run(run())
        assert [(status, complete) for status, complete, _ in results] == [(200, True)] * n
        engine_b.process.wait(timeout=30)
        time.sleep(1.5)  # a health check or two
        text = scrape(gateway)
        assert sample_sum(text, "loragate_requests_total", route="story", status_class="2xx") == n
        assert sample_sum(text, "loragate_upstream_healthy", upstream=url_b) == 0
        assert sample_sum(text, "loragate_upstream_healthy", upstream=engine) == 1
        assert sample_sum(text, "loragate_requests_in_flight") == 0
        assert httpx.get(f"{gateway}/readyz").status_code == 200

        # The stopped engine stays out: everything now goes to the live one.
        for _ in range(5):
            response = httpx.post(
                f"{gateway}/v1/completions", json={"model": "story", "prompt": "hi", "max_tokens": 2}, timeout=60
            )
            assert response.status_code == 200 and "x-loragate-fallback" not in response.headers
    finally:
        service.stop()


def test_gateway_whose_only_engine_is_stopped_says_503(second_engine, tmp_path):
    _engine_b, url_b = second_engine  # killed by the test above, or stopped here
    _engine_b.stop()
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  story:\n    variants: [{name: a1, adapter: a1, weight: 1}]\n")
    service, gateway = start_gateway(routes, [url_b], tmp_path / "gw.log")
    try:
        assert httpx.get(f"{gateway}/readyz").status_code == 503
        response = httpx.post(f"{gateway}/v1/completions", json={"model": "story", "prompt": "hi"}, timeout=10)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_healthy_upstream"
    finally:
        service.stop()

"""Gateway behaviour that needs faults on demand, against the STUB upstream (tests/stub_upstream.py).

The stub is not vLLM: a variant's adapter name picks its behaviour (fail-500, fail-429, slow-<ms>, reset).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.metrics_text import sample_sum, scrape
from tests.processes import free_port, start_gateway, start_stub

ROUTES = """
routes:
  ok:
    variants: [{name: v1, adapter: good, path: /adapters/good, weight: 1}]
  flaky:
    variants: [{name: v1, adapter: fail-500, path: /a, weight: 1}]
  busy:
    variants: [{name: v1, adapter: fail-429, path: /a, weight: 1}]
  reset:
    variants: [{name: v1, adapter: reset, path: /a, weight: 1}]
  dead:
    base_model: fail-500
    variants: [{name: base, weight: 1}]
  slow:
    base_model: slow-3000
    variants: [{name: base, weight: 1}]
    timeouts: {total_s: 0.5}
"""
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    service, url = start_stub(tmp_path_factory.mktemp("stub") / "stub.log")
    try:
        yield url
    finally:
        service.stop()


@pytest.fixture(scope="module")
def gateway(stub, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gw")
    (directory / "routes.yaml").write_text(ROUTES)
    service, url = start_gateway(
        directory / "routes.yaml", [stub], directory / "gateway.log", extra_env={"LORAGATE_MAX_BODY_BYTES": "4096"}
    )
    try:
        yield url
    finally:
        code = service.stop()
    assert code in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown
    assert "Traceback" not in (directory / "gateway.log").read_text()


def post(url: str, body, **kwargs) -> httpx.Response:
    content = body if not isinstance(body, dict) else json.dumps(body)
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **kwargs.pop("headers", {})},
        timeout=10,
        **kwargs,
    )


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if code:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    "route, reason", [("flaky", "upstream_5xx"), ("busy", "upstream_429"), ("reset", "disconnected")]
)
def test_failing_variant_falls_back_to_base_with_header(gateway, route, reason):
    before = scrape(gateway)
    response = post(gateway, {"model": route, **CHAT})
    assert response.status_code == 200
    assert response.headers["x-loragate-variant"] == "base"
    assert response.headers["x-loragate-fallback"] == reason
    assert response.json()["choices"][0]["message"]["content"]
    after = scrape(gateway)
    assert (
        sample_sum(after, "loragate_fallbacks_total", route=route, reason=reason)
        - sample_sum(before, "loragate_fallbacks_total", route=route, reason=reason)
    ) == 1


def test_streaming_fallback_before_first_byte(gateway):
    with httpx.stream(
        "POST", f"{gateway}/v1/chat/completions", json={"model": "flaky", "stream": True, **CHAT}, timeout=10
    ) as response:
        body = response.read().decode()
    assert response.headers["x-loragate-fallback"] == "upstream_5xx"
    assert body.endswith("data: [DONE]\n\n")
    assert '"usage"' not in body


def test_bad_json_is_400(gateway):
    assert_openai_error(post(gateway, b"{not json"), 400, "invalid_json")
    assert_openai_error(post(gateway, b"[1, 2]"), 400, "invalid_json")


def test_bad_params_are_400(gateway):
    assert_openai_error(post(gateway, {"messages": CHAT["messages"]}), 400, "missing_model")
    assert_openai_error(post(gateway, {"model": "ok", "messages": []}), 400, "invalid_messages")
    assert_openai_error(post(gateway, {"model": "ok", "stream": "yes", **CHAT}), 400, "invalid_stream")
    response = httpx.post(f"{gateway}/v1/completions", json={"model": "ok"}, timeout=10)
    assert_openai_error(response, 400, "missing_prompt")


def test_unknown_model_is_404(gateway):
    assert_openai_error(post(gateway, {"model": "nope", **CHAT}), 404, "model_not_found")


def test_body_too_large_is_413(gateway):
    big = {"model": "ok", "messages": [{"role": "user", "content": "x" * 10_000}]}
    assert_openai_error(post(gateway, big), 413, "request_too_large")

    def chunked():
        yield json.dumps(big).encode()

    assert_openai_error(post(gateway, chunked()), 413, "request_too_large")


def test_every_variant_failing_is_502(gateway):
    assert_openai_error(post(gateway, {"model": "dead", **CHAT}), 502, "upstream_5xx")


def test_upstream_too_slow_is_504_not_a_hang(gateway):
    response = post(gateway, {"model": "slow", **CHAT})
    assert_openai_error(response, 504, "timeout")
    assert response.elapsed.total_seconds() < 3


def test_unknown_path_and_method_are_openai_errors(gateway):
    assert_openai_error(httpx.get(f"{gateway}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{gateway}/v1/chat/completions"), 405)


def test_no_healthy_upstream_is_503_and_not_ready(tmp_path: Path):
    (tmp_path / "routes.yaml").write_text(ROUTES)
    service, url = start_gateway(tmp_path / "routes.yaml", [f"http://127.0.0.1:{free_port()}"], tmp_path / "gw.log")
    try:
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert_openai_error(post(url, {"model": "ok", **CHAT}), 503, "no_healthy_upstream")
        assert sample_sum(scrape(url), "loragate_upstream_healthy") == 0
    finally:
        service.stop()


def test_bad_routes_file_stops_the_gateway_with_a_clear_message(tmp_path: Path):
    import subprocess
    import sys

    (tmp_path / "routes.yaml").write_text("routes: {r: {variants: [{name: a, weight: 0}]}}")
    result = subprocess.run(
        [sys.executable, "-m", "loragate", "serve", "--config", str(tmp_path / "routes.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "weight above 0" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "env, message",
    [({"LORAGATE_PORT": "abc"}, "LORAGATE_PORT"), ({"LORAGATE_REQUEST_LOG_URL": "ftp://x"}, "unsupported scheme")],
)
def test_bad_settings_stop_the_gateway_with_a_clear_message(tmp_path: Path, env, message):
    import os
    import subprocess
    import sys

    (tmp_path / "routes.yaml").write_text(ROUTES)
    result = subprocess.run(
        [sys.executable, "-m", "loragate", "serve", "--config", str(tmp_path / "routes.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_metrics_add_up_across_worker_processes(stub, tmp_path: Path):
    (tmp_path / "routes.yaml").write_text(ROUTES)
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    service, url = start_gateway(
        tmp_path / "routes.yaml",
        [stub],
        tmp_path / "gw.log",
        workers=2,
        extra_env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    try:
        n = 300

        async def load() -> list[int]:
            async def one(client: httpx.AsyncClient) -> int:
                return (await client.post(f"{url}/v1/chat/completions", json={"model": "ok", **CHAT})).status_code

            # Separate connections so that both workers take a share.
            clients = [httpx.AsyncClient(timeout=10) for _ in range(12)]
            try:
                return await asyncio.gather(*(one(clients[i % 12]) for i in range(n)))
            finally:
                await asyncio.gather(*(c.aclose() for c in clients))

        statuses = asyncio.run(load())
        assert statuses == [200] * n
        writers = {p.name.split("_")[-1] for p in metrics_dir.glob("counter_*.db")}
        assert len(writers) >= 2, "both worker processes should have served requests"
        text = scrape(url)
        assert sample_sum(text, "loragate_requests_total", route="ok", status_class="2xx") == n
        assert sample_sum(text, "loragate_completion_tokens_total", route="ok") == n * 3
    finally:
        service.stop()

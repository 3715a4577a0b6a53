"""Fault injection against STUB upstreams (tests/stub_upstream.py): faults vLLM cannot produce on demand.

For each fault: the client gets a complete answer or a clear error within the deadline,
and the metrics and headers say what happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.metrics_text import sample_sum, scrape
from tests.processes import start_gateway, start_stub

ROUTES = """
routes:
  slowfirst:
    variants: [{name: v1, adapter: slowfirst-3000, path: /a, weight: 1}]
    timeouts: {first_token_s: 0.5}
  broken-stream:
    variants: [{name: v1, adapter: break-stream, path: /a, weight: 1}]
  error-stream:
    variants: [{name: v1, adapter: error-stream, path: /a, weight: 1}]
  stall-stream:
    variants: [{name: v1, adapter: stall-stream, path: /a, weight: 1}]
    timeouts: {first_token_s: 0.5}
  no-rescue:
    variants: [{name: v1, adapter: break-stream, path: /a, weight: 1}]
    fallback: []
  malformed:
    variants: [{name: v1, adapter: malformed, path: /a, weight: 1}]
  hang:
    variants: [{name: v1, adapter: hang, path: /a, weight: 1}]
    fallback: []
    timeouts: {total_s: 1}
  flaky:
    variants: [{name: v1, adapter: fail-500, path: /a, weight: 1}]
  drip:
    variants: [{name: v1, adapter: drip-100, path: /a, weight: 1}]
    limits: {max_tokens: 64, max_n: 1}
  ok:
    variants: [{name: v1, adapter: good, path: /a, weight: 1}]
"""
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stubs")
    started = []
    try:
        for i in range(2):
            started.append(start_stub(directory / f"stub{i}.log"))
        yield [url for _, url in started]
    finally:
        for service, _ in started:
            service.stop()


@pytest.fixture(scope="module")
def gateway(stubs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gw")
    # The second stub plays "another OpenAI-compatible endpoint" (a hosted API), outside the pool.
    (directory / "routes.yaml").write_text(
        ROUTES
        + f"""
  hosted-rescue:
    base_model: fail-500-base
    variants:
      - {{name: v1, adapter: fail-500-adapter, path: /a, weight: 1}}
      - {{name: hosted, endpoint: "{stubs[1]}/v1", model: hosted-model, api_key_env: TEST_HOSTED_KEY}}
    fallback: [base, hosted]
"""
    )
    service, url = start_gateway(
        directory / "routes.yaml",
        stubs[:1],
        directory / "gateway.log",
        extra_env={
            "LORAGATE_CIRCUIT_FAILURES": "3",
            "LORAGATE_CIRCUIT_OPEN_S": "30",
            "TEST_HOSTED_KEY": "sk-hosted-test",
        },
    )
    try:
        yield url
    finally:
        service.stop()
    assert "Traceback" not in (directory / "gateway.log").read_text()


def stream_events(url: str, model: str, max_tokens: int = 8, usage: bool = True) -> tuple[httpx.Response, list]:
    body = {"model": model, "messages": CHAT, "max_tokens": max_tokens, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=15) as response:
        raw = response.read().decode()
    events = [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]
    return response, events


def text_of(events: list[str]) -> str:
    parts = []
    for event in events:
        if event != "[DONE]":
            for choice in json.loads(event).get("choices", []):
                parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def delta(before: str, after: str, name: str, **labels) -> float:
    return sample_sum(after, name, **labels) - sample_sum(before, name, **labels)


def test_slow_first_token_falls_back_before_any_byte(gateway):
    started = time.monotonic()
    response, events = stream_events(gateway, "slowfirst")
    assert time.monotonic() - started < 2.5
    assert response.headers["x-loragate-fallback"] == "timeout"
    assert response.headers["x-loragate-variant"] == "base"
    assert events[-1] == "[DONE]" and text_of(events) == " ".join(f"t{i}" for i in range(8)) + " "


@pytest.mark.parametrize(
    "route, reason", [("broken-stream", "disconnected"), ("error-stream", "error_event"), ("stall-stream", "timeout")]
)
def test_stream_broken_mid_way_is_continued_on_the_fallback(gateway, route, reason):
    before = scrape(gateway)
    response, events = stream_events(gateway, route, max_tokens=8)
    assert response.status_code == 200
    assert events[-1] == "[DONE]"
    assert not any('"error"' in e for e in events)
    # Two tokens from the broken variant, then six from the base model carrying on.
    assert text_of(events) == "t0 t1 t0 t1 t2 t3 t4 t5 "
    ids = {json.loads(e)["id"] for e in events if e != "[DONE]"}
    assert len(ids) == 1, "the client sees one stream"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 6  # the continuation's own usage chunk
    after = scrape(gateway)
    assert delta(before, after, "loragate_fallbacks_total", route=route, reason=f"midstream_{reason}") == 1
    assert delta(before, after, "loragate_completion_tokens_total", route=route) == 8  # both parts
    assert delta(before, after, "loragate_requests_total", route=route, status_class="2xx") == 1


def test_stream_that_cannot_be_continued_ends_with_an_error_event(gateway):
    response, events = stream_events(gateway, "no-rescue")
    assert response.status_code == 200
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "stream_interrupted" and "disconnected" in error["message"]
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="no-rescue", messages=CHAT, max_tokens=8, stream=True))


def test_last_fallback_is_another_openai_compatible_endpoint(gateway, stubs):
    before = scrape(gateway)
    response = httpx.post(
        f"{gateway}/v1/chat/completions", json={"model": "hosted-rescue", "messages": CHAT}, timeout=10
    )
    assert response.status_code == 200
    assert response.headers["x-loragate-variant"] == "hosted"
    assert response.headers["x-loragate-fallback"] == "upstream_5xx"
    assert response.json()["model"] == "hosted-model"
    seen = httpx.get(f"{stubs[1]}/stub/stats").json()
    assert seen["last_model"] == "hosted-model"
    assert seen["last_authorization"] == "Bearer sk-hosted-test"  # the key from the env var named in the route
    after = scrape(gateway)
    # The adapter failed, then the base model: two fallbacks, then the hosted endpoint answered.
    assert delta(before, after, "loragate_fallbacks_total", route="hosted-rescue") == 2
    assert delta(before, after, "loragate_requests_total", route="hosted-rescue", variant="hosted") == 1
    assert "sk-hosted-test" not in scrape(gateway)


def test_malformed_json_from_upstream_falls_back(gateway):
    response = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "malformed", "messages": CHAT}, timeout=10)
    assert response.status_code == 200
    assert response.headers["x-loragate-fallback"] == "malformed_response"
    assert response.json()["choices"][0]["message"]["content"]


def test_body_that_never_ends_is_a_504_within_the_deadline(gateway):
    started = time.monotonic()
    response = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "hang", "messages": CHAT}, timeout=10)
    assert time.monotonic() - started < 2
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"


def test_circuit_opens_after_failures_and_is_visible(gateway):
    before = scrape(gateway)
    reasons = []
    for _ in range(6):
        response = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "flaky", "messages": CHAT}, timeout=10)
        assert response.status_code == 200
        reasons.append(response.headers["x-loragate-fallback"])
    # Three failures open the adapter's circuit; then requests skip it without trying.
    assert reasons == ["upstream_5xx"] * 3 + ["circuit_open"] * 3
    after = scrape(gateway)
    assert sample_sum(after, "loragate_circuit_state", adapter="fail-500") == 2
    assert sample_sum(after, "loragate_circuit_state", adapter="*") == 0  # the replica itself is fine
    assert delta(before, after, "loragate_fallbacks_total", route="flaky") == 6
    circuits = httpx.get(f"{gateway}/admin/circuits", timeout=5).json()["circuits"]
    assert {"adapter": "fail-500", "state": "open"}.items() <= next(
        c for c in circuits if c["adapter"] == "fail-500"
    ).items()


def test_route_limits_reject_out_of_bounds_parameters(gateway):
    for body, param in [
        ({"max_tokens": 65}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "9"}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"n": True}, "n"),
    ]:
        response = httpx.post(
            f"{gateway}/v1/chat/completions", json={"model": "drip", "messages": CHAT, **body}, timeout=5
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param


def test_admission_control_bounds_in_flight_and_queue(stubs, tmp_path: Path):
    (tmp_path / "routes.yaml").write_text(ROUTES)
    service, url = start_gateway(
        tmp_path / "routes.yaml",
        stubs[:1],
        tmp_path / "gw.log",
        extra_env={
            "LORAGATE_MAX_IN_FLIGHT_PER_UPSTREAM": "2",
            "LORAGATE_MAX_WAITING": "2",
            "LORAGATE_MAX_WAIT_S": "0.3",
        },
    )
    try:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=15) as client:

                async def one():
                    return await client.post(
                        f"{url}/v1/chat/completions",
                        json={"model": "drip", "messages": CHAT, "max_tokens": 16, "stream": True},
                    )

                return await asyncio.gather(*(one() for _ in range(10)))

        started = time.monotonic()
        responses = asyncio.run(run())
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 2 + [503] * 8
        for response in responses:
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "overloaded"
                assert int(response.headers["retry-after"]) >= 1
            else:
                assert response.text.endswith("data: [DONE]\n\n")
        assert time.monotonic() - started < 5
        assert sample_sum(scrape(url), "loragate_admission_rejections_total", route="drip") == 8
    finally:
        service.stop()


def test_graceful_shutdown_finishes_streams_in_flight(stubs, tmp_path: Path):
    (tmp_path / "routes.yaml").write_text(ROUTES)
    service, url = start_gateway(tmp_path / "routes.yaml", stubs[:1], tmp_path / "gw.log")
    body = {"model": "drip", "messages": CHAT, "max_tokens": 16, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=15) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        assert first.startswith(b"data: ")
        os.killpg(service.process.pid, signal.SIGTERM)  # 1.6 s of stream left
        rest = b"".join(chunks)
    text = (first + rest).decode()
    assert text.endswith("data: [DONE]\n\n")
    assert text.count("data: ") == 17
    service.process.wait(timeout=15)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)
    service.stop()


def test_2000_requests_with_a_replica_killed_mid_load_are_all_accounted(tmp_path: Path):
    """Two stub replicas; one is killed while 2,000 requests are in progress."""
    replicas = [start_stub(tmp_path / f"r{i}.log") for i in range(2)]
    (tmp_path / "routes.yaml").write_text(ROUTES)
    try:
        service, url = start_gateway(
            tmp_path / "routes.yaml",
            [u for _, u in replicas],
            tmp_path / "gw.log",
            extra_env={"LORAGATE_HEALTH_INTERVAL_S": "0.5"},
        )
    except Exception:
        for stub, _ in replicas:
            stub.stop()
        raise
    n = 2000
    try:

        async def run() -> list[tuple[int, str]]:
            done = 0
            limits = httpx.Limits(max_connections=32)
            async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                semaphore = asyncio.Semaphore(32)

                async def one(i: int) -> tuple[int, str]:
                    nonlocal done
                    async with semaphore:
                        stream = i % 2 == 0
                        response = await client.post(
                            f"{url}/v1/chat/completions",
                            json={"model": "ok", "messages": CHAT, "max_tokens": 4, "stream": stream},
                        )
                        done += 1
                        if done == n // 2:
                            replicas[1][0].stop(timeout_s=1)  # kill one replica mid-load
                        ok = response.text.endswith("[DONE]\n\n") if stream else bool(response.json().get("choices"))
                        return response.status_code, "complete" if ok else response.text[:200]

                return await asyncio.gather(*(one(i) for i in range(n)))

        rss_before = rss_mib(service.process.pid)
        results = asyncio.run(run())
        assert len(results) == n
        assert results == [(200, "complete")] * n
        assert rss_mib(service.process.pid) - rss_before < 64, "memory must stay bounded"
        text = scrape(url)
        assert sample_sum(text, "loragate_requests_total", route="ok") == n
        assert sample_sum(text, "loragate_requests_total", route="ok", status_class="2xx") == n
        assert sample_sum(text, "loragate_upstream_healthy") == 1
        assert sample_sum(text, "loragate_requests_in_flight") == 0
    finally:
        service.stop()
        for stub, _ in replicas:
            stub.stop()

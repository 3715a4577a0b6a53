"""Replica scheduling against two STUB engines that slow down as they fill (tests/stub_engine.py).

The defect of issue #27: an adapter loaded on demand by one first request, then 32 concurrent
clients; the gateway sent every later request to the first replica (1,603 to 0), because a replica
that already held the adapter always won until it had 256 requests in flight. Now the holder's
growing queue outweighs the cost of loading the adapter on the other replica, which then loads it
once and takes its share.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest

from tests.metrics_text import sample_sum, scrape
from tests.processes import ROOT, Service, free_port, start_gateway, wait_http

ROUTES = """
routes:
  support:
    variants: [{name: v1, adapter: support-v1, path: /adapters/support/v1, weight: 1}]
  unweighted:
    variants: [{name: v1, adapter: other-v1, path: /adapters/other/v1, weight: 1}]
    scheduling: {load: 0, prefix: 0}
"""
CLIENTS = 32
REQUESTS_EACH = 8


def start_engine(log: Path, *extra: str) -> tuple[Service, str]:
    port = free_port()
    service = Service(
        [
            sys.executable,
            str(ROOT / "tests" / "stub_engine.py"),
            "--port",
            str(port),
            "--base-ms",
            "20",
            "--per-request-ms",
            "4",
            "--max-running",
            "8",
            *extra,
        ],
        log,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", service.process, 30, log)
    return service, url


@pytest.fixture(params=["scraped", "in-flight only"])
def setup(request, tmp_path: Path):
    extra = () if request.param == "scraped" else ("--no-metrics",)
    services: list[Service] = []
    try:
        engines = []
        for index in range(2):
            service, url = start_engine(tmp_path / f"engine{index}.log", *extra)
            services.append(service)
            engines.append(url)
        (tmp_path / "routes.yaml").write_text(ROUTES)
        gateway, url = start_gateway(
            tmp_path / "routes.yaml",
            engines,
            tmp_path / "gateway.log",
            extra_env={"LORAGATE_ENGINE_SCRAPE_INTERVAL_S": "0.2", "LORAGATE_ADMIN_TOKEN": "admin-secret"},
        )
        services.append(gateway)
        yield url, engines, request.param
    finally:
        for service in services:
            service.stop()
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()


def served(engine: str, model: str) -> int:
    return httpx.get(f"{engine}/stub/stats", timeout=5).json()["served"].get(model, 0)


async def clients(url: str, model: str, n: int, each: int) -> list[int]:
    statuses: list[int] = []

    async def client(index: int) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            for _ in range(each):
                response = await http.post(
                    f"{url}/v1/chat/completions",
                    json={
                        "model": model,
                        "max_tokens": 1,
                        "messages": [{"role": "user", "content": f"client {index} asks"}],
                    },
                )
                statuses.append(response.status_code)

    await asyncio.gather(*(client(i) for i in range(n)))
    return statuses


def test_an_adapter_loaded_by_one_request_spreads_to_both_replicas(setup):
    url, engines, mode = setup
    first = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=30,
        json={"model": "support", "max_tokens": 1, "messages": [{"role": "user", "content": "the first request"}]},
    )
    assert first.status_code == 200
    holders = [e for e in engines if "support-v1" in httpx.get(f"{e}/stub/stats").json()["adapters"]]
    assert len(holders) == 1  # loaded on demand, on one replica

    statuses = asyncio.run(clients(url, "support", CLIENTS, REQUESTS_EACH))
    assert len(statuses) == CLIENTS * REQUESTS_EACH and set(statuses) == {200}
    counts = [served(e, "support-v1") for e in engines]
    # A fair share each: neither replica serves less than a third (today: all but none).
    assert min(counts) >= sum(counts) / 3, counts
    # Loaded once on the second replica, not once per waiting request.
    assert [httpx.get(f"{e}/stub/stats").json()["loads"] for e in engines] == [1, 1]
    text = scrape(url)
    assert sample_sum(text, "loragate_adapter_placements_total", action="load", reason="first") == 1
    assert sample_sum(text, "loragate_adapter_placements_total", action="load", reason="spread") == 1
    assert sample_sum(text, "loragate_picker_decisions_total") >= len(statuses)

    view = httpx.get(f"{url}/admin/upstreams", headers={"authorization": "Bearer admin-secret"}).json()["upstreams"]
    assert {u["url"] for u in view} == set(engines)
    for upstream in view:
        assert upstream["adapters"] == ["support-v1"]
        if mode == "scraped":
            assert upstream["engine"]["scraped"] and upstream["engine"]["max_lora"] == 4
            assert upstream["engine"]["missing"] == ["prefix_cache"]  # the stub has no prefix cache: said so
            assert "prefix_cache" in upstream["engine"]["fallback"]
        else:  # the stub has no /metrics: said so, and the in-flight counts did the work
            assert not upstream["engine"]["scraped"] and "in-flight" in upstream["engine"]["fallback"]

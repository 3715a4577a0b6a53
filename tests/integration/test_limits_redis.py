"""Per-key limits shared by three gateway processes through a real redis-server, over the STUB upstream.

Limits are token buckets refilling at N/60 a second, so a burst that lasts T seconds may take N plus
what refilled meanwhile (N * T / 60): the bounds below are that, with 1 % either side.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import httpx
import pytest

from loragate.service.apikeys import new_key
from tests.metrics_text import sample_sum, scrape
from tests.redis_gateways import redis_gateways

ROUTES = "routes:\n  plain:\n    variants: [{name: base, weight: 1}]\n"
RPM, TPM, AFTER = 300, 12_000, 60
TOKENS_PER_ANSWER = 7 + 16  # the stub: 7 prompt tokens + max_tokens
KEYS = {name: new_key() for name in ("rpm", "tpm", "steady", "after")}
LIMITS = {
    "rpm": f"requests_per_minute: {RPM}",
    "tpm": f"tokens_per_minute: {TPM}",
    "steady": "requests_per_minute: 1000000",
    "after": f"requests_per_minute: {AFTER}",
}
HEALTH_INTERVAL_S = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    keys = {name: (key, LIMITS[name]) for name, key in KEYS.items()}
    with redis_gateways(
        tmp_path_factory.mktemp("limits-redis"), 3, ROUTES, keys, {"LORAGATE_HEALTH_INTERVAL_S": str(HEALTH_INTERVAL_S)}
    ) as cluster:
        yield cluster


async def hammer(
    urls: list[str], key: str, total: int, concurrency: int, max_tokens: int = 16
) -> tuple[list[tuple[int, int, httpx.Response]], float]:
    """``total`` requests spread round-robin over ``urls``; returns (gateway index, order, response) and seconds."""
    queue = list(range(total))
    results: list[tuple[int, int, httpx.Response]] = []
    body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            order = queue.pop(0)
            index = order % len(urls)
            response = await client.post(
                f"{urls[index]}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
            )
            results.append((index, order, response))

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results, time.monotonic() - started


def assert_refusals(results) -> None:
    for _, _, response in results:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(response.headers["retry-after"]) >= 1
        else:
            assert response.status_code == 200, response.text


def backends(urls: list[str]) -> list[str]:
    found = []
    for url in urls:
        text = scrape(url)
        on = [
            b
            for b in ("redis", "fallback", "refusing", "in_process")
            if sample_sum(text, "loragate_limits_backend", backend=b) == 1
        ]
        found.append(on[0] if len(on) == 1 else f"unclear {on}")
    return found


def test_requests_per_minute_hold_across_three_gateways(cluster):
    _, urls, _ = cluster
    results, seconds = asyncio.run(hammer(urls, KEYS["rpm"], total=2 * RPM, concurrency=12))
    assert_refusals(results)
    accepted = sum(1 for _, _, r in results if r.status_code == 200)
    refilled = RPM * seconds / 60
    assert math.floor(RPM * 0.99) <= accepted <= math.ceil(RPM * 1.01 + refilled), (accepted, seconds)
    assert {index for index, _, r in results if r.status_code == 200} == {0, 1, 2}  # all three served the key
    refused = sum(
        sample_sum(scrape(url), "loragate_limit_rejections_total", key_id="rpm", reason="request_rate") for url in urls
    )
    assert refused == len(results) - accepted


def test_tokens_per_minute_hold_across_three_gateways(cluster):
    _, urls, _ = cluster
    # One request in flight per gateway: at most 3 answers are admitted before the charge of another lands.
    results, seconds = asyncio.run(hammer(urls, KEYS["tpm"], total=2 * TPM // TOKENS_PER_ANSWER, concurrency=3))
    assert_refusals(results)
    served = sum(r.json()["usage"]["total_tokens"] for _, _, r in results if r.status_code == 200)
    refilled = TPM * seconds / 60
    in_flight = 3 * TOKENS_PER_ANSWER
    assert TPM * 0.99 <= served <= TPM * 1.01 + refilled + in_flight, (served, seconds)
    assert any(r.status_code == 429 for _, _, r in results)
    assert any("tokens per minute" in r.json()["error"]["message"] for _, _, r in results if r.status_code == 429)


def test_redis_outage_serves_on_local_limits_and_the_shared_limit_comes_back(cluster):
    redis, urls, logs = cluster
    assert backends(urls) == ["redis"] * 3
    statuses: list[int] = []
    stop = threading.Event()

    def steady_load() -> None:  # a limited key (so every request checks Redis) far below its limit
        with httpx.Client(timeout=30) as client:
            index = 0
            while not stop.is_set():
                response = client.post(
                    f"{urls[index % 3]}/v1/chat/completions",
                    json={"model": "plain", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"authorization": f"Bearer {KEYS['steady']}"},
                )
                statuses.append(response.status_code)
                index += 1

    threads = [threading.Thread(target=steady_load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        redis.stop()
        deadline = time.monotonic() + 10
        while backends(urls) != ["fallback"] * 3:
            assert time.monotonic() < deadline, backends(urls)
            time.sleep(0.1)
        served_during_outage = len(statuses)
        time.sleep(1.0)
        assert len(statuses) > served_during_outage  # still serving while Redis is down
        redis.start()
        back_at, back_at_wall = time.monotonic(), time.time()
        while backends(urls) != ["redis"] * 3:
            assert time.monotonic() - back_at < 10, backends(urls)
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    # Each gateway's own log line says when it went back (the probe runs every health interval; a
    # scrape of three gateways on a loaded machine would add its own delay).
    for log in logs:
        (line,) = [l for l in log.read_text().splitlines() if "Redis is reachable again" in l]
        logged = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
        assert logged - back_at_wall <= HEALTH_INTERVAL_S + 0.5, line
    for url in urls:
        text = scrape(url)
        assert sample_sum(text, "loragate_limits_backend_changes_total", backend="fallback") == 1
        assert sample_sum(text, "loragate_limits_backend_changes_total", backend="redis") == 1
    # Shared again: the three gateways together admit one allowance, not three.
    results, seconds = asyncio.run(hammer(urls, KEYS["after"], total=3 * AFTER, concurrency=6))
    assert_refusals(results)
    accepted = sum(1 for _, _, r in results if r.status_code == 200)
    assert math.floor(AFTER * 0.99) <= accepted <= math.ceil(AFTER * 1.01 + AFTER * seconds / 60), accepted

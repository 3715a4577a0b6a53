"""Replica discovery from DNS: one host name, loopback addresses in /etc/hosts, a STUB upstream on each.

The name is unique to the run and /etc/hosts is restored in a finally, whatever happens.
"""

from __future__ import annotations

import re
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.metrics_text import sample_sum, scrape
from tests.processes import ROOT, Service, free_port, start_gateway, wait_http

HOSTS = Path("/etc/hosts")
NAME = f"lg-discovery-{secrets.token_hex(4)}.test"
ADDRESSES = ("127.0.0.2", "127.0.0.3")
INTERVAL_S = 0.5
ROUTES = """
routes:
  plain:
    variants: [{name: base, weight: 1}]
  slow:
    base_model: slow-1500  # the stub answers this model after 1.5 s
    variants: [{name: base, weight: 1}]
"""


@pytest.fixture(scope="module")
def hosts():
    original = HOSTS.read_text()

    def point(*addresses: str) -> None:  # written in place: /etc/hosts may be a bind mount
        HOSTS.write_text(original + "".join(f"{address} {NAME}\n" for address in addresses))

    try:
        yield point
    finally:
        HOSTS.write_text(original)


@pytest.fixture(scope="module")
def setup(hosts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("discovery")
    port = free_port()
    stubs = {}
    gateway = None
    try:
        for address in ADDRESSES:
            stubs[address] = Service(
                [sys.executable, str(ROOT / "tests" / "stub_upstream.py"), "--host", address, "--port", str(port)],
                directory / f"stub-{address}.log",
            )
            wait_http(f"http://{address}:{port}/health", stubs[address].process, 30)
        hosts(ADDRESSES[0])
        (directory / "routes.yaml").write_text(ROUTES)
        gateway, url = start_gateway(
            directory / "routes.yaml",
            [f"http://{NAME}:{port}"],
            directory / "gateway.log",
            extra_env={"LORAGATE_HEALTH_INTERVAL_S": str(INTERVAL_S)},
        )
        yield url, port, gateway.log
    finally:
        if gateway is not None:
            assert gateway.stop() in (0, -15)
        for stub in stubs.values():
            stub.stop()
    assert "Traceback" not in gateway.log.read_text()


def stub_requests(address: str, port: int) -> int:
    return httpx.get(f"http://{address}:{port}/stub/stats", timeout=5).json()["requests"]


def replicas(url: str) -> dict[str, bool]:
    return httpx.get(f"{url}/readyz", timeout=5).json()["upstreams"]


def logged_at(log: Path, text: str) -> float:
    (line,) = [line for line in log.read_text().splitlines() if text in line]
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000


def wait_for(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, what
        time.sleep(0.05)
    return time.monotonic() - started


def test_replicas_join_and_drain_with_the_dns_answer(setup, hosts):
    url, port, log = setup
    first, second = (f"http://{address}:{port}" for address in ADDRESSES)
    statuses: list[int] = []
    stop = threading.Event()

    def steady_load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                statuses.append(
                    client.post(
                        f"{url}/v1/chat/completions",
                        json={"model": "plain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                    ).status_code
                )

    def slow_request(_index: int) -> int:
        return httpx.post(
            f"{url}/v1/chat/completions",
            timeout=30,
            json={"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ).status_code

    load = [threading.Thread(target=steady_load) for _ in range(2)]
    for thread in load:
        thread.start()
    try:
        assert replicas(url) == {first: True}
        time.sleep(0.5)
        assert stub_requests(ADDRESSES[0], port) > 0 and stub_requests(ADDRESSES[1], port) == 0

        # A new address: health-checked, then in rotation, without a restart.
        hosts(*ADDRESSES)
        added_at = time.time()
        wait_for(lambda: replicas(url) == {first: True, second: True}, 10, "second replica not in")
        wait_for(lambda: stub_requests(ADDRESSES[1], port) > 0, 5, "second replica gets no traffic")
        # Found at the next health interval (the gateway's own log line says when).
        assert logged_at(log, f"replica {second} discovered") - added_at <= INTERVAL_S + 0.5
        assert sample_sum(scrape(url), "loragate_upstream_discovered_replicas", upstream=f"http://{NAME}:{port}") == 2

        # An address leaves: no new requests, the slow ones in flight there finish.
        with ThreadPoolExecutor(8) as pool:
            slow = [pool.submit(slow_request, index) for index in range(8)]
            wait_for(
                lambda: sample_sum(scrape(url), "loragate_upstream_requests_in_flight", upstream=first) >= 3,
                5,
                "slow requests not in flight on the first replica",
            )
            hosts(ADDRESSES[1])
            wait_for(lambda: replicas(url) == {second: True}, 10, "first replica not drained")
            time.sleep(0.3)  # requests that picked it before it left reach it now
            counted = stub_requests(ADDRESSES[0], port)
            assert [future.result() for future in slow] == [200] * 8
        time.sleep(1.0)
        assert stub_requests(ADDRESSES[0], port) == counted  # nothing new since it left
    finally:
        stop.set()
        for thread in load:
            thread.join()
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    text = log.read_text()
    assert re.search(rf"replica {re.escape(first)} left DNS, draining [1-9]\d* requests", text), text[-3000:]
    assert f"replica {first} drained and removed" in text

"""The pool over STUB engines in this process (tests/stub_engine.py): scraping, the admin view, spreading,
unloading, and the scheduling metrics through promtool."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, generate_latest

from loragate.service.aiohttpedge import AiohttpControl
from loragate.service.metrics import Metrics
from loragate.service.upstreams import AdapterUnavailable, Pool
from tests.stub_engine import make_app


async def engines(n: int, **kwargs) -> list[TestServer]:
    options = {"base_ms": 20, "per_request_ms": 2, "max_running": 4, "max_lora": 2, "metrics": True, "adapters": []}
    options.update(kwargs)
    servers = [TestServer(make_app(**options)) for _ in range(n)]
    for server in servers:
        await server.start_server()
    return servers


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_scrape_reads_the_engine_and_the_view_says_what_falls_back():
    servers = [*await engines(1), *await engines(1, metrics=False)]
    pool = Pool([url(s) for s in servers], Metrics(CollectorRegistry()))
    async with aiohttp.ClientSession() as session:
        pool.bind(AiohttpControl(session))
        await pool.start()
        scraped, bare = pool.replicas
        assert scraped.engine is not None and scraped.engine.max_lora == 2 and scraped.engine.running == 0
        assert bare.engine is None
        view = {v["url"]: v["engine"] for v in pool.view()}
        assert view[scraped.url]["scraped"] and view[scraped.url]["missing"] == ["prefix_cache"]
        assert not view[bare.url]["scraped"] and "in-flight" in view[bare.url]["fallback"]
    for server in servers:
        await server.close()


async def test_a_busy_holder_spreads_its_adapter_once_and_both_serve():
    servers = await engines(2)
    pool = Pool([url(s) for s in servers], Metrics(CollectorRegistry()))
    async with aiohttp.ClientSession() as session:
        pool.bind(AiohttpControl(session))
        await pool.start()
        first = await pool.acquire("hot", "/adapters/hot")
        pool.release(first, "hot")
        held = [await pool.acquire("hot", "/adapters/hot") for _ in range(20)]  # 20 at once, none released
        on = [sum(1 for r in held if r is replica) for replica in pool.replicas]
        assert min(on) >= 5, on  # the second replica took its share after loading the adapter
        assert all("hot" in r.adapters for r in pool.replicas)
        loads = [(await (await session.get(f"{url(s)}/stub/stats")).json())["loads"] for s in servers]
        assert loads == [1, 1]  # once each, however many requests waited for the second load
        for replica in held:
            pool.release(replica, "hot")
        assert all(r.in_flight == 0 and not r.adapter_in_flight for r in pool.replicas)
        assert pool.total_in_flight == 0
    for server in servers:
        await server.close()


async def test_at_the_adapter_limit_the_idle_least_recently_used_one_is_unloaded():
    (server,) = await engines(1)
    pool = Pool([url(server)], Metrics(CollectorRegistry()), max_adapters_per_replica=2, adapter_min_idle_s=0)
    async with aiohttp.ClientSession() as session:
        pool.bind(AiohttpControl(session))
        await pool.start()
        for name in ("a", "b", "c"):
            replica = await pool.acquire(name, f"/adapters/{name}")
            pool.release(replica, name)
            await asyncio.sleep(0.01)
        (replica,) = pool.replicas
        assert replica.adapters == {"b", "c"}  # a went: least recently used, idle
        stats = await (await session.get(f"{url(server)}/stub/stats")).json()
        assert stats["adapters"] == ["b", "c"] and stats["unloads"] == 1
        busy = await pool.acquire("b", "/adapters/b")  # in flight: never the one unloaded
        replica = await pool.acquire("d", "/adapters/d")
        assert "b" in replica.adapters and "c" not in replica.adapters
        pool.release(busy, "b")
        pool.release(replica, "d")
    await server.close()


async def test_hysteresis_keeps_a_recently_used_adapter_loaded_over_the_limit():
    (server,) = await engines(1)
    pool = Pool([url(server)], Metrics(CollectorRegistry()), max_adapters_per_replica=1, adapter_min_idle_s=60)
    async with aiohttp.ClientSession() as session:
        pool.bind(AiohttpControl(session))
        await pool.start()
        for name in ("a", "b"):
            replica = await pool.acquire(name, f"/adapters/{name}")
            pool.release(replica, name)
        assert pool.replicas[0].adapters == {"a", "b"}  # a was used a moment ago: not thrown out for b
    await server.close()


def test_scheduling_metrics_pass_promtool_check_metrics():
    metrics = Metrics(CollectorRegistry())
    metrics.engine_requests.labels("http://10.0.0.1:8000", "running").set(3)
    metrics.engine_requests.labels("http://10.0.0.1:8000", "waiting").set(1)
    metrics.engine_kv_cache_usage.labels("http://10.0.0.1:8000").set(0.4)
    metrics.engine_lora_adapters.labels("http://10.0.0.1:8000", "slots").set(4)
    metrics.engine_scrape_errors.labels("http://10.0.0.1:8000").inc()
    for scorer in ("load", "adapter", "prefix", "only"):
        metrics.picker_decisions.labels(scorer).inc()
    metrics.adapter_placements.labels("load", "spread").inc()
    metrics.adapter_placements.labels("unload", "lru").inc()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (apt-get install prometheus)"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=generate_latest(metrics.registry), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr


async def test_a_replica_holding_another_version_under_the_name_is_not_used_for_it():
    (old,) = await engines(1, adapters=["support"])  # registered at start from /static/support
    (fresh,) = await engines(1)
    pool = Pool([url(old), url(fresh)], Metrics(CollectorRegistry()))
    async with aiohttp.ClientSession() as session:
        pool.bind(AiohttpControl(session))
        await pool.start()
        for _ in range(5):
            replica = await pool.acquire("support", "/adapters/support/v2")
            assert replica.url == url(fresh)  # never the one that would answer with the other version
            pool.release(replica, "support")
        assert (await pool.acquire("support", "/static/support")).url in (url(old), url(fresh))
    async with aiohttp.ClientSession() as session:
        alone = Pool([url(old)], Metrics(CollectorRegistry()))
        alone.bind(AiohttpControl(session))
        await alone.start()
        with pytest.raises(AdapterUnavailable, match="vllm#30931"):
            await alone.acquire("support", "/adapters/support/v2")
    await old.close()
    await fresh.close()

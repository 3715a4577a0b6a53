"""The vLLM replicas: health, which adapters each holds, loading adapters on demand, picking one.

A replica is picked for a model as follows: among healthy replicas, those that
already hold the adapter win, and among them the one with the fewest requests
in flight. If none holds it, the least busy healthy replica loads it first
(once per replica, however many requests arrive at the same moment).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from service.metrics import Metrics

log = logging.getLogger("loragate.upstreams")


class NoHealthyUpstream(Exception):
    """No replica is healthy."""


class AdapterUnavailable(Exception):
    """The adapter could not be loaded on any healthy replica."""


@dataclass(eq=False)
class Replica:
    url: str
    healthy: bool = False
    in_flight: int = 0
    # Adapter names the replica reports (or we loaded); refreshed by each health check.
    adapters: set[str] = field(default_factory=set)
    base_models: set[str] = field(default_factory=set)
    # Adapter name -> monotonic time until which a failed load is not retried.
    failed_adapters: dict[str, float] = field(default_factory=dict)
    loading: dict[str, asyncio.Task] = field(default_factory=dict)


class Pool:
    def __init__(
        self,
        urls: list[str],
        metrics: Metrics,
        *,
        health_timeout_s: float = 2.0,
        adapter_failure_ttl_s: float = 30.0,
        load_timeout_s: float = 120.0,
    ) -> None:
        self.replicas = [Replica(url) for url in urls]
        self.metrics = metrics
        self.health_timeout_s = health_timeout_s
        self.adapter_failure_ttl_s = adapter_failure_ttl_s
        self.load_timeout_s = load_timeout_s
        self.session: aiohttp.ClientSession | None = None

    def bind(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    @property
    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    # --- health -------------------------------------------------------------

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def check(self, replica: Replica) -> None:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=self.health_timeout_s)
        try:
            async with self.session.get(f"{replica.url}/health", timeout=timeout) as resp:
                healthy = resp.status == 200
            if healthy:
                async with self.session.get(f"{replica.url}/v1/models", timeout=timeout) as resp:
                    models = orjson.loads(await resp.read()).get("data", []) if resp.status == 200 else None
                if models is not None:
                    replica.base_models = {m["id"] for m in models if m.get("parent") is None}
                    # Loads still in flight keep their claim; everything else follows the replica.
                    replica.adapters = {m["id"] for m in models if m.get("parent") is not None}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, AttributeError):
            healthy = False
        if healthy != replica.healthy:
            log.info("upstream %s is now %s", replica.url, "healthy" if healthy else "unhealthy")
        replica.healthy = healthy
        self.metrics.upstream_healthy.labels(replica.url).set(1 if healthy else 0)

    def mark_failed(self, replica: Replica) -> None:
        """A connection to the replica failed: take it out until the next good health check."""
        replica.healthy = False
        self.metrics.upstream_healthy.labels(replica.url).set(0)

    # --- picking ------------------------------------------------------------

    async def acquire(self, adapter: str | None, path: str | None, exclude: set[Replica] = frozenset()) -> Replica:
        """The replica to send a request for ``adapter`` (None: the base model) to, adapter loaded."""
        healthy = [r for r in self.replicas if r.healthy and r not in exclude]
        if not healthy:
            raise NoHealthyUpstream("no healthy upstream replica")
        if adapter is None:
            return min(healthy, key=lambda r: r.in_flight)
        holders = [r for r in healthy if adapter in r.adapters]
        if holders:
            return min(holders, key=lambda r: r.in_flight)
        now = time.monotonic()
        loadable = [r for r in healthy if r.failed_adapters.get(adapter, 0) <= now]
        if not loadable or path is None:
            raise AdapterUnavailable(f"adapter {adapter!r} is not loaded on any healthy replica and cannot be loaded")
        replica = min(loadable, key=lambda r: r.in_flight)
        await self.ensure_adapter(replica, adapter, path)
        return replica

    def forget_adapter(self, replica: Replica, adapter: str) -> None:
        """The replica said it does not know the adapter: stop assuming it holds it."""
        replica.adapters.discard(adapter)

    # --- adapter loading ----------------------------------------------------

    async def ensure_adapter(self, replica: Replica, adapter: str, path: str) -> None:
        if adapter in replica.adapters:
            return
        task = replica.loading.get(adapter)
        if task is None:
            task = asyncio.ensure_future(self._load(replica, adapter, path))
            replica.loading[adapter] = task
            task.add_done_callback(lambda _t: replica.loading.pop(adapter, None))
        # shield: one caller giving up (client gone) must not cancel the others' load.
        await asyncio.shield(task)

    async def _load(self, replica: Replica, adapter: str, path: str) -> None:
        assert self.session is not None
        started = time.perf_counter()
        result = "error"
        detail = ""
        try:
            async with self.session.post(
                f"{replica.url}/v1/load_lora_adapter",
                json={"lora_name": adapter, "lora_path": path},
                timeout=aiohttp.ClientTimeout(total=self.load_timeout_s),
            ) as resp:
                detail = (await resp.read()).decode(errors="replace")[:300]
                if resp.status == 200:
                    result = "success"
                elif resp.status == 400 and "already" in detail:
                    result = "already_loaded"  # another gateway worker loaded it first
                else:
                    result = "failed"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            detail = type(exc).__name__
        self.metrics.adapter_loads.labels(replica.url, adapter, result).inc()
        if result in ("success", "already_loaded"):
            self.metrics.adapter_load_duration.labels(adapter).observe(time.perf_counter() - started)
            replica.adapters.add(adapter)
            replica.failed_adapters.pop(adapter, None)
            log.info("loaded adapter %s on %s (%s)", adapter, replica.url, result)
            return
        replica.failed_adapters[adapter] = time.monotonic() + self.adapter_failure_ttl_s
        log.warning("loading adapter %s on %s failed: %s", adapter, replica.url, detail)
        raise AdapterUnavailable(f"adapter {adapter!r} could not be loaded on {replica.url}")

"""The replica set: which vLLM engines there are, whether each is healthy, and what each is doing.

It follows the upstream entries (an IP is one replica; a host name stands for every address it
resolves to, service/discovery.py), checks each replica's health and the adapters it lists, and
scrapes each one's ``/metrics`` into an ``EngineState`` (service/enginestate.py) on a short
interval. Between scrapes the picker moves that state by the gateway's own in-flight counts
(service/scorers.py). Choosing among the replicas is not its job: that is service/picker.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from loragate.service.discovery import DiscoveryError, parse_entry, resolve
from loragate.service.enginestate import MAX_METRICS_BYTES, EngineState, MetricsFormatError, parse_engine_metrics
from loragate.service.metrics import Metrics
from loragate.service.resilience import CircuitBreaker
from loragate.service.transport import ControlClient, Timeout, TransportError

log = logging.getLogger("loragate.upstreams")

HEALTH_MAX_BYTES = 64 << 10  # a /health answer (vLLM's is empty); more: unhealthy
# /v1/models: ~9,000 adapters at ~470 bytes each (vLLM's model card with its permission object), far past any
# engine's --max-cpu-loras. Its JSON parse holds the event loop ~14 ms a MiB (measured on a loaded 2-core host;
# orjson keeps the GIL: a thread would not help), so the cap is also the longest stall a replica can cause: ~60 ms.
MODELS_MAX_BYTES = 4 << 20


@dataclass(eq=False)
class Replica:
    url: str
    healthy: bool = False
    in_flight: int = 0
    # Adapter names the replica reports (or we loaded); refreshed by each health check.
    adapters: set[str] = field(default_factory=set)
    # The base model's name (the /v1/models entry without ``parent``), once a health check has read it.
    base_model: str | None = None
    # Adapter name -> where the engine loaded it from (/v1/models ``root``), when it says.
    adapter_roots: dict[str, str] = field(default_factory=dict)
    # Adapter name -> monotonic time until which a failed load is not retried.
    failed_adapters: dict[str, float] = field(default_factory=dict)
    # Adapters the load probe found not applied here whose unload the engine refused: kept out of ``adapters``
    # (never sent a request, never loaded again) for as long as the engine lists them.
    not_applied: set[str] = field(default_factory=set)
    loading: dict[str, asyncio.Task] = field(default_factory=dict)
    # Adapters the gateway loaded here (name -> path): the only ones it may unload again.
    loaded_by_gateway: dict[str, str] = field(default_factory=dict)
    # This gateway's requests in flight here per adapter, and when each adapter was last sent here.
    adapter_in_flight: dict[str, int] = field(default_factory=dict)
    adapter_used: dict[str, float] = field(default_factory=dict)
    # Circuit per adapter on this replica; REPLICA for the replica as a whole.
    circuits: dict[str, CircuitBreaker] = field(default_factory=dict)
    # An OpenAI-compatible endpoint outside the pool (url is its base, /v1 included): never
    # health-checked or loaded into; its circuit alone decides whether it is tried.
    external: bool = False
    # Its address left the DNS answer: out of rotation, retired once its in-flight requests finish.
    draining: bool = False
    # The last scrape of its /metrics (None: none yet, or the last one failed) and in_flight then.
    engine: EngineState | None = None
    engine_in_flight: int = 0
    scraped_at: float = 0.0

    def holds(self, adapter: str) -> bool:
        """Registered on the engine, or being loaded there now (a request may wait for that load)."""
        return adapter in self.adapters or adapter in self.loading

    def is_active(self, adapter: str) -> bool:
        """Running or waiting on the engine (its scrape), or in flight from this gateway."""
        engine = self.engine
        return (engine is not None and adapter in engine.active_adapters) or adapter in self.adapter_in_flight

    def free_lora_slot(self) -> bool:
        """Whether a LoRA slot is free on the engine (unknown: assume so)."""
        engine = self.engine
        if engine is None or engine.max_lora is None or engine.running_adapters is None:
            return True
        return len(engine.active_adapters) < engine.max_lora


class ReplicaSet:
    def __init__(
        self,
        urls: list[str],
        metrics: Metrics,
        *,
        health_timeout_s: float = 2.0,
        scrape_timeout_s: float = 1.0,
        on_change: Callable[[list[Replica]], None] | None = None,
    ) -> None:
        # Entries with an IP are replicas now; those with a host name get theirs from discover().
        self.entries = [parse_entry(url) for url in urls]
        self.replicas = [Replica(e.url) for e in self.entries if not e.discovered]
        self.metrics = metrics
        self.in_flight_gauges = {r.url: metrics.upstream_in_flight.labels(r.url) for r in self.replicas}
        self._discovered: dict[str, set[str]] = {e.url: set() for e in self.entries if e.discovered}
        self._draining: list[Replica] = []
        for entry in self.entries:  # every series from the start: an IP entry is one replica, never fails
            metrics.upstream_discovery_errors.labels(entry.url)
            if not entry.discovered:
                metrics.upstream_discovered.labels(entry.url).set(1)
        self.health_timeout_s = health_timeout_s
        self.scrape_timeout_s = scrape_timeout_s
        self.client: ControlClient | None = None  # bound by the app's lifespan (Pool.bind)
        self._on_change = on_change or (lambda _replicas: None)
        self._on_change(self.replicas)
        # Adapter -> the replicas holding it or loading it: the picker's candidates for it (kept by reindex).
        self.holders: dict[str, list[Replica]] = {}

    def reindex(self) -> None:
        """Rebuild ``holders`` after adapters came or went (health check, load, unload, a stale one found)."""
        holders: dict[str, list[Replica]] = {}
        for replica in self.replicas:
            for adapter in replica.adapters | replica.loading.keys():
                holders.setdefault(adapter, []).append(replica)
        self.holders = holders

    @property
    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    # --- discovery ----------------------------------------------------------

    async def discover(self, *, strict: bool = False) -> None:
        """Replicas follow the addresses of each host-name entry. A new address joins unhealthy (the
        health check that follows lets it in); a vanished one drains. A failed lookup keeps the last
        addresses (strict: raises DiscoveryError)."""
        entries = [e for e in self.entries if e.discovered]
        if not entries:
            return
        answers = await asyncio.gather(*(resolve(e) for e in entries), return_exceptions=True)
        changed = False
        for entry, answer in zip(entries, answers):
            if isinstance(answer, DiscoveryError):
                if strict:
                    raise answer
                self.metrics.upstream_discovery_errors.labels(entry.url).inc()
                log.warning("%s; keeping its %d known replicas", answer, len(self._discovered[entry.url]))
                continue
            if isinstance(answer, BaseException):
                raise answer
            changed |= self._follow(entry.url, {entry.replica_url(address) for address in answer})
        self.retire_drained()
        if changed:
            self._on_change(self.replicas)
            self.reindex()

    def _follow(self, entry: str, urls: set[str]) -> bool:
        known = self._discovered[entry]
        self._discovered[entry] = urls
        self.metrics.upstream_discovered.labels(entry).set(len(urls))
        taken = {r.url for r in self.replicas}
        changed = False
        for url in sorted(urls - known):
            if url in taken:
                continue
            changed = True
            back = next((r for r in self._draining if r.url == url), None)
            if back is not None:  # came back before it drained: in rotation again
                self._draining.remove(back)
                back.draining = False
                self.replicas.append(back)
            else:
                self.replicas.append(Replica(url))
                self.in_flight_gauges[url] = self.metrics.upstream_in_flight.labels(url)
            log.info("upstream %s: replica %s discovered", entry, url)
        gone = known - urls - {u for e, found in self._discovered.items() if e != entry for u in found}
        for replica in [r for r in self.replicas if r.url in gone]:
            changed = True
            self.replicas.remove(replica)
            replica.draining = True
            self._draining.append(replica)
            log.info("upstream %s: replica %s left DNS, draining %d requests", entry, replica.url, replica.in_flight)
        return changed

    def retire_drained(self) -> None:
        for replica in [r for r in self._draining if r.in_flight == 0]:
            self._draining.remove(replica)
            self.in_flight_gauges.pop(replica.url, None)
            # Its series go (a 0 would read as a replica down); with --workers N the multiprocess files keep
            # the last value until the gateway restarts.
            m = self.metrics
            for gauge, labels in (
                (m.upstream_healthy, [(replica.url,)]),
                (m.upstream_in_flight, [(replica.url,)]),
                (m.engine_kv_cache_usage, [(replica.url,)]),
                (m.engine_requests, [(replica.url, s) for s in ("running", "waiting")]),
                (m.engine_lora_adapters, [(replica.url, s) for s in ("loaded", "running", "slots")]),
                (m.circuit_state, [(replica.url, key) for key in replica.circuits]),
            ):
                for label_values in labels:
                    try:
                        gauge.remove(*label_values)
                    except KeyError:
                        pass
            log.info("upstream replica %s drained and removed", replica.url)

    # --- health -------------------------------------------------------------

    async def check_all(self) -> None:
        """The health job: re-resolve host names, then check every replica (new ones before any traffic)."""
        await self.discover()
        await asyncio.gather(*(self.check(r) for r in self.replicas))
        self.reindex()

    async def check(self, replica: Replica) -> None:
        assert self.client is not None
        timeout = Timeout(total=self.health_timeout_s)
        try:
            reply = await self.client.get(f"{replica.url}/health", timeout=timeout, max_bytes=HEALTH_MAX_BYTES)
            healthy = reply.status == 200
            if healthy:
                reply = await self.client.get(f"{replica.url}/v1/models", timeout=timeout, max_bytes=MODELS_MAX_BYTES)
                models = orjson.loads(reply.body).get("data", []) if reply.status == 200 else None
                if models is not None:
                    # Loads still in flight keep their claim; everything else follows the replica.
                    listed = [m for m in models if m.get("parent") is not None]
                    base = next((m["id"] for m in models if m.get("parent") is None), None)
                    replica.base_model = base if isinstance(base, str) else None
                    names = {m["id"] for m in listed}
                    replica.not_applied &= names  # gone from the engine: a later load is probed again
                    replica.adapters = names - replica.not_applied
                    replica.adapter_roots = {m["id"]: m["root"] for m in listed if isinstance(m.get("root"), str)}
                    for name in [n for n in replica.loaded_by_gateway if n not in replica.adapters]:
                        del replica.loaded_by_gateway[name]
        except (TransportError, ValueError, KeyError, TypeError, AttributeError):
            healthy = False
        if replica.draining:  # it left DNS while being checked: its series are gone, keep them so
            return
        if healthy != replica.healthy:
            log.info("upstream %s is now %s", replica.url, "healthy" if healthy else "unhealthy")
        replica.healthy = healthy
        self.metrics.upstream_healthy.labels(replica.url).set(1 if healthy else 0)
        self.metrics.engine_lora_adapters.labels(replica.url, "loaded").set(len(replica.adapters))

    def mark_failed(self, replica: Replica) -> None:
        """A connection to the replica failed: take it out until the next good health check."""
        replica.healthy = False
        self.metrics.upstream_healthy.labels(replica.url).set(0)

    # --- engine state -------------------------------------------------------

    async def scrape_all(self) -> None:
        """The engine-state job: every healthy replica's /metrics, at once."""
        await asyncio.gather(*(self.scrape(r) for r in self.replicas if r.healthy))

    async def scrape(self, replica: Replica) -> None:
        """One replica's /metrics into ``replica.engine``; on any failure None (the picker then counts
        the gateway's own requests in flight there)."""
        assert self.client is not None
        in_flight = replica.in_flight
        engine: EngineState | None = None
        try:
            reply = await self.client.get(
                f"{replica.url}/metrics", timeout=Timeout(total=self.scrape_timeout_s), max_bytes=MAX_METRICS_BYTES
            )
            if reply.status == 200:
                # In a thread: a hostile body costs ~0.2 s of parsing, which must not stall the event loop.
                engine = await asyncio.to_thread(parse_engine_metrics, reply.body)
        except (TransportError, MetricsFormatError, UnicodeError):
            engine = None
        if engine is None:
            self.metrics.engine_scrape_errors.labels(replica.url).inc()
        if replica.draining:
            return
        replica.engine, replica.engine_in_flight, replica.scraped_at = engine, in_flight, time.monotonic()
        self._export(replica, engine)

    def _export(self, replica: Replica, engine: EngineState | None) -> None:
        m, url = self.metrics, replica.url
        if engine is None:
            return
        if engine.running is not None:
            m.engine_requests.labels(url, "running").set(engine.running)
        if engine.waiting is not None:
            m.engine_requests.labels(url, "waiting").set(engine.waiting)
        if engine.kv_usage is not None:
            m.engine_kv_cache_usage.labels(url).set(engine.kv_usage)
        if engine.running_adapters is not None:
            m.engine_lora_adapters.labels(url, "running").set(len(engine.active_adapters))
        if engine.max_lora is not None:
            m.engine_lora_adapters.labels(url, "slots").set(engine.max_lora)

    def view(self, replica: Replica) -> dict:
        """What /admin/upstreams shows of one replica: health, the scraped state, and what falls back."""
        engine = replica.engine
        state: dict = {
            "scraped": engine is not None,
            "age_s": round(time.monotonic() - replica.scraped_at, 3) if engine is not None else None,
        }
        if engine is None:
            state["fallback"] = "no /metrics scrape: load is this gateway's in-flight count"
        else:
            state.update(
                running=engine.running,
                waiting=engine.waiting,
                kv_cache_usage=engine.kv_usage,
                prefix_cache_queries=engine.prefix_queries,
                prefix_cache_hits=engine.prefix_hits,
                max_lora=engine.max_lora,
                running_adapters=sorted(engine.running_adapters or ()),
                waiting_adapters=sorted(engine.waiting_adapters or ()),
                missing=list(engine.missing),
            )
            if engine.missing:
                state["fallback"] = (
                    f"the engine does not expose {', '.join(engine.missing)}: this gateway's own counts stand in"
                )
        return {
            "url": replica.url,
            "healthy": replica.healthy,
            "draining": replica.draining,
            "in_flight": replica.in_flight,
            "adapters": sorted(replica.adapters),
            "loaded_by_gateway": sorted(replica.loaded_by_gateway),
            "engine": state,
        }

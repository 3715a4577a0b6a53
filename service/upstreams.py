"""The vLLM replicas: health, which adapters each holds, loading adapters on demand, picking one.

A replica is picked for a model as follows: among healthy replicas whose circuit
(for the replica, and for this adapter on it) lets requests through and that are
below their in-flight limit, those that already hold the adapter win, and among
them the one with the fewest requests in flight. If none holds it, the least busy
one loads it first (once per replica, however many requests arrive together).
When every such replica is at its limit the request waits in a bounded queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Set
from dataclasses import dataclass, field

import aiohttp
import orjson

from loragate.service.failures import FailureReason
from loragate.service.discovery import DiscoveryError, parse_entry, resolve
from loragate.service.metrics import Metrics
from loragate.service.resilience import Admission, CircuitBreaker, Overloaded

REPLICA = "*"  # the adapter label of a replica-wide circuit

log = logging.getLogger("loragate.upstreams")


class NoHealthyUpstream(Exception):
    """No replica is healthy."""


class AdapterUnavailable(Exception):
    """The adapter could not be loaded on any healthy replica."""


class CircuitOpen(Exception):
    """Healthy replicas exist, but the circuits for this model on all of them are open."""


__all__ = ["AdapterUnavailable", "CircuitOpen", "NoHealthyUpstream", "Overloaded", "Pool", "Replica"]


@dataclass(eq=False)
class Replica:
    url: str
    healthy: bool = False
    in_flight: int = 0
    # Adapter names the replica reports (or we loaded); refreshed by each health check.
    adapters: set[str] = field(default_factory=set)
    # Adapter name -> monotonic time until which a failed load is not retried.
    failed_adapters: dict[str, float] = field(default_factory=dict)
    loading: dict[str, asyncio.Task] = field(default_factory=dict)
    # Circuit per adapter on this replica; REPLICA for the replica as a whole.
    circuits: dict[str, CircuitBreaker] = field(default_factory=dict)
    # An OpenAI-compatible endpoint outside the pool (url is its base, /v1 included): never
    # health-checked or loaded into; its circuit alone decides whether it is tried.
    external: bool = False
    # Its address left the DNS answer: out of rotation, retired once its in-flight requests finish.
    draining: bool = False


class Pool:
    def __init__(
        self,
        urls: list[str],
        metrics: Metrics,
        *,
        health_timeout_s: float = 2.0,
        adapter_failure_ttl_s: float = 30.0,
        load_timeout_s: float = 120.0,
        max_in_flight: int = 256,
        max_waiting: int = 512,
        max_wait_s: float = 10.0,
        circuit_failures: int = 5,
        circuit_open_s: float = 10.0,
    ) -> None:
        # Entries with an IP are replicas now; those with a host name get theirs from discover().
        self.entries = [parse_entry(url) for url in urls]
        self.replicas = [Replica(e.url) for e in self.entries if not e.discovered]
        self.metrics = metrics
        self._in_flight_gauges = {r.url: metrics.upstream_in_flight.labels(r.url) for r in self.replicas}
        self._discovered: dict[str, set[str]] = {e.url: set() for e in self.entries if e.discovered}
        self._draining: list[Replica] = []
        for entry in self.entries:  # every series from the start: an IP entry is one replica, never fails
            metrics.upstream_discovery_errors.labels(entry.url)
            if not entry.discovered:
                metrics.upstream_discovered.labels(entry.url).set(1)
        self._endpoints: dict[str, Replica] = {}
        self.max_in_flight = max_in_flight
        self.admission = Admission(max_waiting, max_wait_s)
        self.circuit_failures = circuit_failures
        self.circuit_open_s = circuit_open_s
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

    async def start(self) -> None:
        """At start: every host name must resolve (DiscoveryError), then one health check of everything."""
        await self.discover(strict=True)
        await self.check_all()

    async def check_all(self) -> None:
        """The health job: re-resolve host names, then check every replica (new ones before any traffic)."""
        await self.discover()
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    # --- discovery ----------------------------------------------------------

    async def discover(self, *, strict: bool = False) -> None:
        """Replicas follow the addresses of each host-name entry. A new address joins unhealthy (the
        health check that follows lets it in); a vanished one drains. A failed lookup keeps the last
        addresses (strict: raises DiscoveryError)."""
        entries = [e for e in self.entries if e.discovered]
        if not entries:
            return
        answers = await asyncio.gather(*(resolve(e) for e in entries), return_exceptions=True)
        for entry, answer in zip(entries, answers):
            if isinstance(answer, DiscoveryError):
                if strict:
                    raise answer
                self.metrics.upstream_discovery_errors.labels(entry.url).inc()
                log.warning("%s; keeping its %d known replicas", answer, len(self._discovered[entry.url]))
                continue
            if isinstance(answer, BaseException):
                raise answer
            self._follow(entry.url, {entry.replica_url(address) for address in answer})
        self._retire_drained()

    def _follow(self, entry: str, urls: set[str]) -> None:
        known = self._discovered[entry]
        self._discovered[entry] = urls
        self.metrics.upstream_discovered.labels(entry).set(len(urls))
        taken = {r.url for r in self.replicas}
        for url in sorted(urls - known):
            if url in taken:
                continue
            back = next((r for r in self._draining if r.url == url), None)
            if back is not None:  # came back before it drained: in rotation again
                self._draining.remove(back)
                back.draining = False
                self.replicas.append(back)
            else:
                self.replicas.append(Replica(url))
                self._in_flight_gauges[url] = self.metrics.upstream_in_flight.labels(url)
            log.info("upstream %s: replica %s discovered", entry, url)
        gone = known - urls - {u for e, found in self._discovered.items() if e != entry for u in found}
        for replica in [r for r in self.replicas if r.url in gone]:
            self.replicas.remove(replica)
            replica.draining = True
            self._draining.append(replica)
            log.info("upstream %s: replica %s left DNS, draining %d requests", entry, replica.url,
                     replica.in_flight)

    def _retire_drained(self) -> None:
        for replica in [r for r in self._draining if r.in_flight == 0]:
            self._draining.remove(replica)
            self._in_flight_gauges.pop(replica.url, None)
            # Its series go (a 0 would read as a replica down); with --workers N the multiprocess files keep
            # the last value until the gateway restarts.
            for gauge, labels in ((self.metrics.upstream_healthy, [(replica.url,)]),
                                  (self.metrics.upstream_in_flight, [(replica.url,)]),
                                  (self.metrics.circuit_state, [(replica.url, key) for key in replica.circuits])):
                for label_values in labels:
                    try:
                        gauge.remove(*label_values)
                    except KeyError:
                        pass
            log.info("upstream replica %s drained and removed", replica.url)

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
                    # Loads still in flight keep their claim; everything else follows the replica.
                    replica.adapters = {m["id"] for m in models if m.get("parent") is not None}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, AttributeError):
            healthy = False
        if replica.draining:  # it left DNS while being checked: its series are gone, keep them so
            return
        if healthy != replica.healthy:
            log.info("upstream %s is now %s", replica.url, "healthy" if healthy else "unhealthy")
        replica.healthy = healthy
        self.metrics.upstream_healthy.labels(replica.url).set(1 if healthy else 0)

    def mark_failed(self, replica: Replica) -> None:
        """A connection to the replica failed: take it out until the next good health check."""
        replica.healthy = False
        self.metrics.upstream_healthy.labels(replica.url).set(0)

    # --- circuits -----------------------------------------------------------

    def circuit(self, replica: Replica, adapter: str | None) -> CircuitBreaker:
        key = adapter or REPLICA
        breaker = replica.circuits.get(key)
        if breaker is None:
            gauge = self.metrics.circuit_state.labels(replica.url, key)
            gauge.set(0)
            breaker = CircuitBreaker(self.circuit_failures, self.circuit_open_s, on_change=gauge.set)
            replica.circuits[key] = breaker
        return breaker

    def circuits(self) -> list[dict]:
        return [
            {"upstream": r.url, "adapter": key, **breaker.snapshot()}
            for r in [*self.replicas, *self._endpoints.values()] for key, breaker in sorted(r.circuits.items())
        ]

    # --- picking ------------------------------------------------------------

    def _open_to(self, replica: Replica, adapter: str | None) -> bool:
        return (replica.healthy and self.circuit(replica, None).available()
                and (adapter is None or self.circuit(replica, adapter).available()))

    async def acquire(self, adapter: str | None, path: str | None, exclude: Set[Replica] = frozenset()) -> Replica:
        """A replica for ``adapter`` (None: the base model), adapter loaded, its in-flight count taken.

        The caller must ``release`` it, and ``report`` how the request went.
        """
        healthy = [r for r in self.replicas if r.healthy and r not in exclude]
        if not healthy:
            raise NoHealthyUpstream("no healthy upstream replica")
        now = time.monotonic()

        def loadable(r: Replica) -> bool:
            return adapter is None or adapter in r.adapters or (
                path is not None and r.failed_adapters.get(adapter, 0) <= now)

        eligible = [r for r in healthy if self._open_to(r, adapter) and loadable(r)]
        if not eligible:
            if not any(loadable(r) for r in healthy):
                raise AdapterUnavailable(
                    f"adapter {adapter!r} is not loaded on any healthy replica and cannot be loaded")
            raise CircuitOpen(f"circuit open for {adapter or 'the base model'} on every healthy replica")
        candidates = [r for r in eligible if r.in_flight < self.max_in_flight]
        if not candidates:
            await self.admission.wait_until(lambda: any(r.in_flight < self.max_in_flight for r in eligible))
            candidates = [r for r in eligible if r.in_flight < self.max_in_flight and not r.draining]
            if not candidates:
                raise NoHealthyUpstream("the replicas with room left DNS while the request waited")
        holders = [r for r in candidates if adapter is None or adapter in r.adapters]
        replica = min(holders or candidates, key=lambda r: r.in_flight)
        replica.in_flight += 1
        self._in_flight_gauges[replica.url].inc()
        try:
            if adapter is not None and adapter not in replica.adapters:
                if path is None:  # dropped from the replica while this request waited for room
                    raise AdapterUnavailable(f"adapter {adapter!r} is no longer loaded on {replica.url}")
                await self.ensure_adapter(replica, adapter, path)
        except BaseException:
            self.release(replica)
            raise
        self.circuit(replica, None).begin()
        if adapter is not None:
            self.circuit(replica, adapter).begin()
        return replica

    def acquire_endpoint(self, url: str) -> Replica:
        """The stand-in replica of an external endpoint, its in-flight count taken (release it too)."""
        replica = self._endpoints.get(url)
        if replica is None:
            replica = self._endpoints[url] = Replica(url, healthy=True, external=True)
            self._in_flight_gauges[url] = self.metrics.upstream_in_flight.labels(url)
        circuit = self.circuit(replica, None)
        if not circuit.available():
            raise CircuitOpen(f"circuit open for the endpoint {url}")
        replica.in_flight += 1
        self._in_flight_gauges[url].inc()
        circuit.begin()
        return replica

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        self._in_flight_gauges[replica.url].dec()
        self.admission.notify()
        if replica.draining and replica.in_flight == 0:
            self._retire_drained()

    def report(self, replica: Replica, adapter: str | None, failure: FailureReason | None) -> None:
        """How a request went: None for success, else the failure reason. Feeds the circuits."""
        replica_circuit = self.circuit(replica, None)
        if failure is None:
            replica_circuit.success()
            if adapter is not None:
                self.circuit(replica, adapter).success()
            return
        if failure == FailureReason.CONNECT_ERROR:
            replica_circuit.failure()
            if not replica.external:
                self.mark_failed(replica)
        elif adapter is not None:
            self.circuit(replica, adapter).failure()
            replica_circuit.probing = False
            if failure == FailureReason.ADAPTER_MISSING:
                replica.adapters.discard(adapter)  # stale residency: reload it next time
        else:
            replica_circuit.failure()

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

"""The pool: one replica for one request, its in-flight count taken, its outcome fed back.

The parts, each its own module: the replica set knows the engines (discovery, health, each one's
scraped state: service/replicas.py); the picker scores candidates for this request (service/picker.py,
service/scorers.py); the adapter loader puts adapters on replicas and takes idle ones off
(service/adapterloads.py); admission is the bounded wait, by priority class, when every replica is at
its in-flight limit (service/admission.py). What stays here: circuits per replica and per adapter,
external endpoints, and the order of these steps in ``acquire``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet

from loragate.service.adapterloads import AdapterLoader, AdapterUnavailable
from loragate.service.adapterprobe import LoadProbe
from loragate.service.admission import Admission
from loragate.service.failures import FailureReason
from loragate.service.metrics import Metrics
from loragate.service.picker import Pick, Picker
from loragate.service.prefixring import prefix_key
from loragate.service.replicas import Replica, ReplicaSet
from loragate.service.priority import DEFAULT_SHARES, Priority
from loragate.service.resilience import CircuitBreaker, Overloaded
from loragate.service.scorers import ScorerWeights, Weights
from loragate.service.tracing import RequestTracer
from loragate.service.transport import ControlClient

REPLICA = "*"  # the adapter label of a replica-wide circuit
DEFAULT_WEIGHTS = Weights()

log = logging.getLogger("loragate.upstreams")


def _other_root(root: str | None, path: str) -> bool:
    """The engine says it loaded the adapter from ``root``: another version than ``path``?"""
    return root is not None and os.path.normpath(root) != os.path.normpath(path)


class NoHealthyUpstream(Exception):
    """No replica is healthy."""


class CircuitOpen(Exception):
    """Healthy replicas exist, but the circuits for this model on all of them are open."""


__all__ = ["AdapterUnavailable", "CircuitOpen", "NoHealthyUpstream", "Overloaded", "Pool", "Replica"]


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
        sheddable_max_wait_s: float | None = None,
        priority_shares: Mapping[Priority, int] = DEFAULT_SHARES,
        circuit_failures: int = 5,
        circuit_open_s: float = 10.0,
        max_adapters_per_replica: int | None = None,
        adapter_min_idle_s: float = 30.0,
        picker: Picker | None = None,
        tracer: RequestTracer | None = None,
        adapter_probe: LoadProbe | None = None,
    ) -> None:
        self.metrics = metrics
        self.picker = picker or Picker()
        self.set = ReplicaSet(urls, metrics, health_timeout_s=health_timeout_s, on_change=self.picker.update)
        self.loader = AdapterLoader(
            metrics,
            load_timeout_s=load_timeout_s,
            failure_ttl_s=adapter_failure_ttl_s,
            limit=max_adapters_per_replica,
            min_idle_s=adapter_min_idle_s,
            on_change=self.set.reindex,
            tracer=tracer,
            probe=adapter_probe,
        )
        self._endpoints: dict[str, Replica] = {}
        self.max_in_flight = max_in_flight
        # Requests that find every replica full wait here, by priority class (service/admission.py).
        self.admission: Admission[Pick] = Admission(
            max_waiting,
            max_wait_s,
            metrics=metrics,
            wait_s=None if sheddable_max_wait_s is None else {Priority.SHEDDABLE: sheddable_max_wait_s},
            shares=priority_shares,
        )
        self.circuit_failures = circuit_failures
        self.circuit_open_s = circuit_open_s
        self.total_in_flight = 0
        self._decisions = {s: metrics.picker_decisions.labels(s) for s in ("load", "adapter", "prefix", "only")}

    def bind(self, client: ControlClient) -> None:
        """Health checks, /metrics scrapes and adapter loads go through ``client`` (the app's lifespan binds it)."""
        self.set.client = self.loader.client = client

    @property
    def replicas(self) -> list[Replica]:
        return self.set.replicas

    @property
    def any_healthy(self) -> bool:
        return self.set.any_healthy

    async def start(self) -> None:
        """At start: every host name must resolve (DiscoveryError), then one health check and scrape of all."""
        await self.set.discover(strict=True)
        await self.set.check_all()
        await self.set.scrape_all()

    async def check_all(self) -> None:
        await self.set.check_all()

    async def scrape_all(self) -> None:
        await self.set.scrape_all()

    def mark_failed(self, replica: Replica) -> None:
        self.set.mark_failed(replica)

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
            for r in [*self.replicas, *self._endpoints.values()]
            for key, breaker in sorted(r.circuits.items())
        ]

    def _open_to(self, replica: Replica, adapter: str | None) -> bool:
        return (
            replica.healthy
            and self.circuit(replica, None).available()
            and (adapter is None or self.circuit(replica, adapter).available())
        )

    # --- picking ------------------------------------------------------------

    async def acquire(
        self,
        adapter: str | None,
        path: str | None,
        exclude: AbstractSet[Replica] = frozenset(),
        *,
        prefix: str | None = None,
        weights: ScorerWeights = DEFAULT_WEIGHTS,
        trace: object | None = None,
        priority: Priority = Priority.STANDARD,
    ) -> Replica:
        """A replica for ``adapter`` (None: the base model), adapter loaded, its in-flight count taken.

        ``prefix``: the prompt's beginning (service/prefixring.py), for prefix-cache affinity. ``trace``: the
        caller's span when tracing is on (an adapter load it waits for becomes its child). ``priority``: the
        request's class, which orders the wait when every replica is full.
        The caller must ``release`` it, and ``report`` how the request went.
        """
        now = time.monotonic()
        limit = self.max_in_flight

        def usable(r: Replica) -> bool:
            return r.in_flight < limit and r not in exclude and not r.draining and self._open_to(r, adapter)

        def can_load(r: Replica) -> bool:
            return path is not None and r.failed_adapters.get(adapter or "", 0) <= now and adapter not in r.not_applied

        if adapter is not None and path is not None:
            exclude = self._other_versions(adapter, path, exclude)

        # Others waiting for room go first (in class order): join them rather than take a slot they wait for.
        pick = None
        if not self.admission.waiting:
            pick = self._pick(usable, adapter, can_load, prefix, weights)
            if pick is None:  # the sample held no usable replica: look at every one
                pick = self._pick(usable, adapter, can_load, prefix, weights, exhaustive=True)
        if pick is not None:
            self._take(pick.replica, adapter, now)
        else:
            self._why_none(adapter, exclude, can_load)  # raises NoHealthyUpstream, AdapterUnavailable, CircuitOpen

            def take() -> Pick | None:  # run by the hand-off (release): the slot is taken as it is handed over
                pick = self._pick(usable, adapter, can_load, prefix, weights) or self._pick(
                    usable, adapter, can_load, prefix, weights, exhaustive=True
                )
                if pick is not None:
                    self._take(pick.replica, adapter, time.monotonic())
                return pick

            pick = await self.admission.wait(priority, take, lambda given: self.release(given.replica, adapter))
        replica = pick.replica
        self._decisions[pick.scorer].inc()
        try:
            # A load under way is waited for even when a health check lists the adapter already (it is being probed).
            loading = adapter is not None and adapter in replica.loading
            if adapter is not None and (loading or adapter not in replica.adapters):
                if path is None and not loading:  # dropped from the replica while this request waited for room
                    raise AdapterUnavailable(f"adapter {adapter!r} is no longer loaded on {replica.url}")
                reason = "spread" if any(adapter in r.adapters for r in self.replicas) else "first"
                await self.loader.ensure(replica, adapter, path or "", reason, trace)
        except BaseException:
            self.release(replica, adapter)
            raise
        self.circuit(replica, None).begin()
        if adapter is not None:
            self.circuit(replica, adapter).begin()
        return replica

    def _other_versions(self, adapter: str, path: str, exclude: AbstractSet[Replica]) -> AbstractSet[Replica]:
        """``exclude`` and the replicas where ``adapter`` names another version (loaded from another path):
        sending there would serve that version, and loading ours under the same name cannot be done."""
        holders = self.set.holders.get(adapter, ())
        others = [r for r in holders if _other_root(r.adapter_roots.get(adapter), path)]
        if not others:
            return exclude
        log.warning(
            "adapter %s is loaded from another path than %s on %s: not used there (vllm#30931)",
            adapter,
            path,
            ", ".join(r.url for r in others),
        )
        excluded = frozenset(exclude) | frozenset(others)
        if not any(r.healthy and r not in excluded for r in self.replicas):
            raise AdapterUnavailable(
                f"adapter {adapter!r} names another version (loaded from another path) on "
                "every healthy replica: give each adapter version its own name (vllm#30931)"
            )
        return excluded

    def _pick(
        self,
        usable: Callable[[Replica], bool],
        adapter: str | None,
        can_load: Callable[[Replica], bool],
        prefix: str | None,
        weights: ScorerWeights,
        exhaustive: bool = False,
    ) -> Pick | None:
        return self.picker.pick(
            self.replicas,
            usable,
            adapter=adapter,
            can_load=can_load,
            prefix=prefix_key(adapter, prefix) if prefix else None,
            holders=self.set.holders.get(adapter, ()) if adapter is not None else (),
            loading_elsewhere=adapter is not None and adapter in self.loader.loading,
            adapter_limit=self.loader.limit,
            total_in_flight=self.total_in_flight,
            weights=weights,
            exhaustive=exhaustive,
        )

    def _why_none(
        self, adapter: str | None, exclude: AbstractSet[Replica], can_load: Callable[[Replica], bool]
    ) -> None:
        """No candidate now: say why, or return when the replicas are only full (the request may wait)."""
        healthy = [r for r in self.replicas if r.healthy and r not in exclude]
        if not healthy:
            raise NoHealthyUpstream("no healthy upstream replica")

        def loadable(r: Replica) -> bool:
            return adapter is None or adapter in r.adapters or can_load(r)

        if not any(self._open_to(r, adapter) and loadable(r) for r in healthy):
            if not any(loadable(r) for r in healthy):
                raise AdapterUnavailable(
                    f"adapter {adapter!r} is not loaded on any healthy replica and cannot be loaded"
                )
            raise CircuitOpen(f"circuit open for {adapter or 'the base model'} on every healthy replica")

    def _take(self, replica: Replica, adapter: str | None, now: float) -> None:
        replica.in_flight += 1
        self.total_in_flight += 1
        self.set.in_flight_gauges[replica.url].inc()
        if adapter is not None:
            replica.adapter_in_flight[adapter] = replica.adapter_in_flight.get(adapter, 0) + 1
            replica.adapter_used[adapter] = now

    def acquire_endpoint(self, url: str) -> Replica:
        """The stand-in replica of an external endpoint, its in-flight count taken (release it too)."""
        replica = self._endpoints.get(url)
        if replica is None:
            replica = self._endpoints[url] = Replica(url, healthy=True, external=True)
            self.set.in_flight_gauges[url] = self.metrics.upstream_in_flight.labels(url)
        circuit = self.circuit(replica, None)
        if not circuit.available():
            raise CircuitOpen(f"circuit open for the endpoint {url}")
        replica.in_flight += 1
        self.set.in_flight_gauges[url].inc()
        circuit.begin()
        return replica

    def release(self, replica: Replica, adapter: str | None = None) -> None:
        """The request is over (``adapter``: the one it was acquired for)."""
        replica.in_flight -= 1
        if not replica.external:
            self.total_in_flight -= 1
        self.set.in_flight_gauges[replica.url].dec()
        if adapter is not None:
            left = replica.adapter_in_flight.get(adapter, 1) - 1
            if left > 0:
                replica.adapter_in_flight[adapter] = left
            else:
                replica.adapter_in_flight.pop(adapter, None)
        self.admission.notify()
        if replica.draining and replica.in_flight == 0:
            self.set.retire_drained()

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
                self.set.reindex()
        else:
            replica_circuit.failure()

    def view(self) -> list[dict]:
        """/admin/upstreams: every replica's health, adapters and scraped engine state."""
        return [self.set.view(r) for r in self.replicas]

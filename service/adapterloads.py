"""Putting adapters on replicas and taking them off: ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``.

One load per (replica, adapter) at a time, shared by every request that waits for it. Before a load
on a replica at its adapter limit, the least recently used adapter this gateway loaded there is
unloaded, if one has been idle (nothing in flight from here, nothing running or waiting on the
engine) for ``min_idle_s``: the hysteresis that keeps two adapters from pushing each other out
request after request. With none that idle the load goes ahead over the limit (the engine swaps).

An adapter this gateway loads is probed before any request is sent to it (``probe``, service/adapterprobe.py):
an engine that answers its name with the base model (vllm#55193) gets it unloaded, the load counts as
``not_applied`` and fails as a refused load does (the request goes on to another replica or the fallback chain).
A probe left unanswered proves nothing: the adapter stays, the probe counts as ``error``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from loragate.service.adapterprobe import LoadProbe
from loragate.service.metrics import Metrics
from loragate.service.replicas import Replica
from loragate.service.transport import ControlClient, Timeout, TransportError

if TYPE_CHECKING:
    from loragate.service.tracing import RequestTracer

log = logging.getLogger("loragate.upstreams")

ANSWER_MAX_BYTES = 64 << 10  # the engine's answer to a load or unload (a sentence, or an error object)


class AdapterUnavailable(Exception):
    """The adapter could not be loaded on any healthy replica.

    ``outcome``: what its load ended with (failed: the engine refused; error: no answer in time; not_applied: loaded,
    but the engine answers its name with the base model), when one ran."""

    def __init__(self, message: str, outcome: str = "unavailable") -> None:
        super().__init__(message)
        self.outcome = outcome


def unload_victim(replica: Replica, keep: str, now: float, min_idle_s: float) -> str | None:
    """The least recently used adapter the gateway loaded on ``replica`` that may go now, if any."""
    idle = [
        name
        for name in replica.loaded_by_gateway
        if name != keep
        and name not in replica.loading
        and not replica.is_active(name)
        and now - replica.adapter_used.get(name, 0.0) >= min_idle_s
    ]
    return min(idle, key=lambda name: replica.adapter_used.get(name, 0.0)) if idle else None


class AdapterLoader:
    def __init__(
        self,
        metrics: Metrics,
        *,
        load_timeout_s: float = 120.0,
        failure_ttl_s: float = 30.0,
        limit: int | None = None,
        min_idle_s: float = 30.0,
        on_change: Callable[[], None] = lambda: None,
        tracer: RequestTracer | None = None,
        probe: LoadProbe | None = None,
    ) -> None:
        self.metrics = metrics
        self.load_timeout_s = load_timeout_s
        self.failure_ttl_s = failure_ttl_s
        self.limit = limit  # adapters per replica before an idle one is unloaded (None: never unload)
        self.min_idle_s = min_idle_s
        self.client: ControlClient | None = None  # bound by the app's lifespan (Pool.bind)
        self.loading: dict[str, int] = {}  # adapter -> loads under way on any replica
        self.on_change = on_change  # which replica holds what changed (the replica set reindexes)
        self.tracer = tracer  # None: tracing off (service/tracing.py)
        self.probe = probe  # None: adapters this gateway loads are not probed

    async def ensure(self, replica: Replica, adapter: str, path: str, reason: str, trace: object | None = None) -> None:
        """The adapter on the replica; ``reason`` (first, spread) is what the metrics say about a new load.

        ``trace``: the span of the attempt (or shadow) that waits, when tracing is on: the wait gets a child span."""
        task = replica.loading.get(adapter)
        if task is None and adapter in replica.adapters:
            return  # (while a load is probed, a health check may list the adapter already: its waiters still wait)
        triggered = task is None
        if task is None:
            task = asyncio.ensure_future(self._load(replica, adapter, path, reason))
            replica.loading[adapter] = task
            self.loading[adapter] = self.loading.get(adapter, 0) + 1

            def done(_task: asyncio.Task) -> None:
                replica.loading.pop(adapter, None)
                left = self.loading.get(adapter, 1) - 1
                if left:
                    self.loading[adapter] = left
                else:
                    self.loading.pop(adapter, None)
                self.on_change()

            task.add_done_callback(done)
            self.on_change()
        tracer = self.tracer
        if trace is None or tracer is None:
            # shield: one caller giving up (client gone) must not cancel the others' load.
            await asyncio.shield(task)
            return
        span = tracer.adapter_load_span(trace, adapter, replica.url, triggered)
        outcome = "error"
        try:
            outcome = await asyncio.shield(task)
        except AdapterUnavailable as exc:
            outcome = exc.outcome
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            tracer.adapter_load_end(span, outcome)

    async def _load(self, replica: Replica, adapter: str, path: str, reason: str) -> str:
        """Load it; the result (success, already_loaded) or AdapterUnavailable with the outcome (failed, error,
        not_applied)."""
        assert self.client is not None
        if self.limit is not None and len(replica.adapters) >= self.limit:
            victim = unload_victim(replica, adapter, time.monotonic(), self.min_idle_s)
            if victim is not None:
                await self.unload(replica, victim, "lru")
        started = time.perf_counter()
        result = "error"
        try:
            reply = await self.client.post(
                f"{replica.url}/v1/load_lora_adapter",
                orjson.dumps({"lora_name": adapter, "lora_path": path}),
                timeout=Timeout(total=self.load_timeout_s),
                max_bytes=ANSWER_MAX_BYTES,
            )
            detail = reply.body.decode(errors="replace")[:300]
            if reply.status == 200:
                result = "success"
            elif reply.status == 400 and "already" in detail:
                result = "already_loaded"  # another gateway worker loaded it first
            else:
                result = "failed"
        except TransportError as exc:
            detail = f"{type(exc).__name__}: {exc}"
        loaded_s = time.perf_counter() - started
        if result == "success" and self.probe is not None and not await self._applied(replica, adapter):
            result, detail = "not_applied", f"the engine answers it with the base model {replica.base_model}"
            if not await self.unload(replica, adapter, "not_applied"):
                replica.not_applied.add(adapter)  # still on the engine: out of rotation there while it is listed
                replica.adapters.discard(adapter)
        self.metrics.adapter_loads.labels(replica.url, adapter, result).inc()
        if result in ("success", "already_loaded"):
            self.metrics.adapter_load_duration.labels(adapter).observe(loaded_s)
            self.metrics.adapter_placements.labels("load", reason).inc()
            replica.adapters.add(adapter)
            replica.failed_adapters.pop(adapter, None)
            if result == "success":
                replica.loaded_by_gateway[adapter] = path
            log.info("loaded adapter %s on %s (%s, %s)", adapter, replica.url, result, reason)
            return result
        replica.failed_adapters[adapter] = time.monotonic() + self.failure_ttl_s
        log.warning("loading adapter %s on %s failed: %s", adapter, replica.url, detail)
        raise AdapterUnavailable(f"adapter {adapter!r} could not be loaded on {replica.url}", result)

    async def _applied(self, replica: Replica, adapter: str) -> bool:
        """False only when the probe finds the adapter not applied on the replica (service/adapterprobe.py)."""
        assert self.client is not None and self.probe is not None
        if replica.base_model is None:
            log.debug("adapter %s on %s not probed: the replica's base model is not known yet", adapter, replica.url)
            self.metrics.adapter_load_probes.labels(replica.url, adapter, "skipped").inc()
            return True
        started = time.perf_counter()
        found = await self.probe.check(self.client, replica.url, replica.base_model, adapter)
        self.metrics.adapter_load_probe_duration.labels(adapter).observe(time.perf_counter() - started)
        self.metrics.adapter_load_probes.labels(replica.url, adapter, found.result).inc()
        if found.result == "not_applied":
            log.warning("adapter %s loaded on %s is not applied: %s", adapter, replica.url, found.explanation)
            return False
        if found.result == "error":
            log.warning("adapter %s on %s kept unprobed: %s", adapter, replica.url, found.explanation)
        return True

    async def unload(self, replica: Replica, adapter: str, reason: str) -> bool:
        """Take the adapter off the replica; False when the engine refused (it stays listed then)."""
        assert self.client is not None
        replica.adapters.discard(adapter)  # no new request goes there for it while this runs
        try:
            reply = await self.client.post(
                f"{replica.url}/v1/unload_lora_adapter",
                orjson.dumps({"lora_name": adapter}),
                timeout=Timeout(total=self.load_timeout_s),
                max_bytes=ANSWER_MAX_BYTES,
            )
            ok = reply.status in (200, 404)  # 404: already gone
        except TransportError:
            ok = False
        self.on_change()
        if ok:
            replica.loaded_by_gateway.pop(adapter, None)
            replica.adapter_used.pop(adapter, None)
            self.metrics.adapter_placements.labels("unload", reason).inc()
            log.info("unloaded adapter %s from %s (%s)", adapter, replica.url, reason)
        else:
            replica.adapters.add(adapter)
            self.on_change()
            log.warning("unloading adapter %s from %s failed", adapter, replica.url)
        return ok

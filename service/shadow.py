"""Shadow traffic: a sampled share of a route's requests is also answered, in the dark, by its shadow variant.

The client only ever gets the primary answer. Once the primary variant is chosen, ``percent`` % of
a route's requests get a shadow copy: a background task that sends the copy when the primary's
answer is complete, never streamed (the whole answer is read, even when the client streams),
never retried, never falling back, never charged to the caller's key and never counted in the
client-facing series.

Why after the primary and not beside it: a copy running at the same time shares the engine's
batches with its own primary, and vLLM's output depends on the batch (floating-point sums in
another order): on the demo engine a concurrent copy changed 1 of 4 greedy primary answers. Sent
after, the shadow can never slow down or change its own primary; it only adds load, which the
drops below keep bounded. A shadow is dropped, before anything is sent, when:

* ``same_variant``: the primary chosen for this request is the shadow variant itself;
* ``max_in_flight``: the route already has ``max_in_flight`` shadows waiting or running;
* ``overloaded``: requests wait for room (admission), or no replica would keep a free slot;
* ``unavailable``: no healthy replica with closed circuits for the shadow variant (a shadow never
  claims a half-open circuit's probe, and its failures never feed the circuits);

and cancelled (``deadline``) when it is not done ``deadline_s`` after its primary finished. Its answer
goes to the request log with ``role=shadow`` under the primary's request id (logschema), where
the monitor pairs the two (monitoring/shadow.py). With tracing on, each sampled copy has a span, a child
of its request's span (service/tracing.py, RequestTracer.shadow_span, says why a child and not a link),
with its outcome; its own ``traceparent`` goes to the replica.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from loragate.common.catalog import Route, Timeouts, Variant
from loragate.common.logschema import SHADOW
from loragate.service.failures import FailureReason, UpstreamFailure
from loragate.service.metrics import LATENCY_BUCKETS, status_class
from loragate.service.proxy import Upstream, Usage
from loragate.service.requestlog import RequestRecord, RequestSink
from loragate.service.tracing import RequestTracer
from loragate.service.transport import Timeout, TransportError
from loragate.service.upstreams import AdapterUnavailable, CircuitOpen, NoHealthyUpstream, Pool, Replica

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

DROP_REASONS = ("same_variant", "max_in_flight", "overloaded", "unavailable", "deadline")
# The pool's refusals, named as the primary's attempts name them (a traced shadow's error.type).
_REFUSALS = {
    AdapterUnavailable: FailureReason.ADAPTER_UNAVAILABLE.value,
    NoHealthyUpstream: FailureReason.NO_HEALTHY_UPSTREAM.value,
    CircuitOpen: FailureReason.CIRCUIT_OPEN.value,
}


class ShadowMetrics:
    """The loragate_shadow_* series: apart from the client-facing ones, so a shadow never moves those."""

    def __init__(self, registry: "CollectorRegistry") -> None:  # the gateway's
        from prometheus_client import Counter, Gauge, Histogram

        rv = ("route", "variant")
        self.requests = Counter(
            "loragate_shadow_requests",
            "Shadow requests answered, by HTTP status class.",
            (*rv, "status_class"),
            registry=registry,
        )
        self.dropped = Counter(
            "loragate_shadow_dropped",
            f"Shadow requests dropped or cancelled, by reason ({', '.join(DROP_REASONS)}).",
            (*rv, "reason"),
            registry=registry,
        )
        self.duration = Histogram(
            "loragate_shadow_request_duration_seconds",
            "Time a shadow request took (sent to whole answer read).",
            rv,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "loragate_shadow_prompt_tokens", "Prompt tokens of shadow requests.", rv, registry=registry
        )
        self.completion_tokens = Counter(
            "loragate_shadow_completion_tokens", "Completion tokens of shadow answers.", rv, registry=registry
        )
        self.cost = Counter(
            "loragate_shadow_cost_usd", "Cost of the shadow tokens at this deployment's price.", rv, registry=registry
        )
        self.in_flight = Gauge(
            "loragate_shadow_requests_in_flight",
            "Shadow requests running now.",
            ("route",),
            multiprocess_mode="livesum",
            registry=registry,
        )


class ShadowHandle:
    """One shadow; ``primary_done`` lets it go, and starts its deadline."""

    __slots__ = ("task", "deadline_s", "released", "span", "_timer")

    def __init__(self, deadline_s: float, span: object | None = None) -> None:
        self.task: asyncio.Task | None = None
        self.deadline_s = deadline_s
        self.span = span  # the shadow's own span (tracing on), ended by the shadow
        self.released = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def primary_done(self) -> None:
        self.released.set()
        if self._timer is None and self.task is not None and not self.task.done():
            self._timer = asyncio.get_running_loop().call_later(self.deadline_s, self.task.cancel)


class Shadows:
    """Starts, bounds and accounts for the shadow copies of the gateway's requests."""

    def __init__(
        self,
        pool: Pool,
        upstream: Upstream,
        metrics: ShadowMetrics,
        request_log: RequestSink | None,
        timeouts: Callable[[Route], Timeouts],
        *,
        rng: random.Random | None = None,
        tracer: RequestTracer | None = None,
    ) -> None:
        self.pool = pool
        self.upstream = upstream
        self.metrics = metrics
        self.request_log = request_log
        self.timeouts = timeouts  # the route's timeouts over the gateway's (Forwarder.route_timeouts)
        self.rng = rng or random.Random()  # its own: sampling never shifts the primary's weighted draw
        self.tracer = tracer  # None: tracing off
        self.in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()

    def start(
        self, route: Route, chosen: Variant, payload: dict, endpoint: str, request_id: str, span: object | None = None
    ) -> ShadowHandle | None:
        """The shadow copy of this request, started in the background; None when not sampled or dropped.

        ``span``: the request's span when tracing is on (the copy's span is its child)."""
        shadow = route.shadow
        if shadow is None or self.rng.random() * 100 >= shadow.percent:
            return None
        variant = route.variant(shadow.variant)
        assert variant is not None  # the catalog checks it
        traced = (
            None if span is None or self.tracer is None else self.tracer.shadow_span(span, route.name, variant.name)
        )
        if variant.name == chosen.name:
            self._drop(route, variant, "same_variant", traced)
            return None
        if self.in_flight.get(route.name, 0) >= shadow.max_in_flight:
            self._drop(route, variant, "max_in_flight", traced)
            return None
        copy = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
        copy["model"] = route.upstream_model(variant)
        self.in_flight[route.name] = self.in_flight.get(route.name, 0) + 1
        self.metrics.in_flight.labels(route.name).inc()
        handle = ShadowHandle(shadow.deadline_s, traced)
        handle.task = task = asyncio.create_task(self._run(route, variant, copy, endpoint, request_id, handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    def _drop(self, route: Route, variant: Variant, reason: str, span: object | None = None) -> None:
        self.metrics.dropped.labels(route.name, variant.name, reason).inc()
        if span is not None:
            self.tracer.shadow_end(span, reason)  # type: ignore[union-attr]

    def _room(self, variant: Variant) -> frozenset[Replica]:
        """The pool's replicas the shadow must not use; _Dropped when none is left for it.

        The shadow never waits (nobody may be waiting for room), never takes a replica's last free
        slot and only uses closed circuits, so that pool.acquire neither queues nor claims a probe.
        """
        pool = self.pool
        if pool.admission.waiting:
            raise _Dropped("overloaded")
        if variant.endpoint:
            replica = pool._endpoints.get(variant.endpoint)  # created on first use, circuit closed
            if replica is not None and not _closed(pool, replica, None):
                raise _Dropped("unavailable")
            return frozenset()
        adapter = variant.adapter
        usable = [
            r
            for r in pool.replicas
            if r.healthy
            and not r.draining
            and _closed(pool, r, None)
            and (adapter is None or (_closed(pool, r, adapter) and (adapter in r.adapters or variant.path is not None)))
        ]
        if not usable:
            raise _Dropped("unavailable")
        roomy = [r for r in usable if r.in_flight < pool.max_in_flight - 1]
        if not roomy:
            raise _Dropped("overloaded")
        return frozenset(r for r in pool.replicas if r not in roomy)

    async def _acquire(self, variant: Variant, span: object | None) -> Replica:
        excluded = self._room(variant)  # again, in the same step as acquire's own check: it cannot wait
        if variant.endpoint:
            return self.pool.acquire_endpoint(variant.endpoint)
        return await self.pool.acquire(variant.adapter, variant.path, exclude=excluded, trace=span)

    async def _run(
        self, route: Route, variant: Variant, payload: dict, endpoint: str, request_id: str, handle: ShadowHandle
    ) -> None:
        arrived = time.time()
        status, body, usage = 0, b"", None
        error: str | None = None  # why there is no answer (None: answered)
        replica: Replica | None = None
        span = handle.span
        try:
            try:
                # Until the primary is done (bounded: a primary that never reports ends its shadow).
                async with asyncio.timeout(self.timeouts(route).total_s):
                    await handle.released.wait()
            except TimeoutError:
                self._drop(route, variant, "deadline", span)
                return
            except asyncio.CancelledError:
                self._drop(route, variant, "deadline", span)
                raise
            started = time.perf_counter()
            sent = orjson.dumps(payload)  # what is asked is what is logged
            try:
                replica = await self._acquire(variant, span)
                status, body, usage = await self._ask(route, variant, replica, sent, endpoint, request_id, span)
            except _Dropped as dropped:  # no room for it now
                self._drop(route, variant, dropped.reason, span)
                return
            except UpstreamFailure as failure:
                status, error = failure.reason.status, failure.reason.value
            except (TransportError, TimeoutError):
                status, error = FailureReason.TIMEOUT.status, FailureReason.TIMEOUT.value
            except asyncio.CancelledError:
                self._drop(route, variant, "deadline", span)
                raise
            except Exception as exc:  # no healthy replica left, an adapter that would not load, ...
                status, error = 503, _REFUSALS.get(type(exc), type(exc).__name__)
            self._account(route, variant, request_id, arrived, started, endpoint, sent, status, body, usage, span)
            if span is not None:
                self.tracer.shadow_end(  # type: ignore[union-attr]
                    span,
                    "answered" if error is None else "failed",
                    status if error is None else None,
                    error,
                    usage.prompt_tokens if usage else None,
                    usage.completion_tokens if usage else None,
                )
        finally:
            if replica is not None:
                self.pool.release(replica, variant.adapter)
            self.in_flight[route.name] -= 1
            self.metrics.in_flight.labels(route.name).dec()

    async def _ask(
        self,
        route: Route,
        variant: Variant,
        replica: Replica,
        sent: bytes,
        endpoint: str,
        request_id: str,
        span: object | None = None,
    ) -> tuple[int, bytes, Usage | None]:
        timeouts = self.timeouts(route)
        timeout = Timeout(total=timeouts.total_s, connect=timeouts.connect_s)
        url = f"{replica.url}/{endpoint}" if replica.external else f"{replica.url}/v1/{endpoint}"
        traced = {}
        if span is not None:  # the copy's own traceparent: the replica's spans of it land under the shadow span
            span.set_attribute("loragate.replica", replica.url)  # type: ignore[attr-defined]
            span.add_event("loragate.shadow.sent")  # type: ignore[attr-defined]
            traced["traceparent"] = self.tracer.traceparent(span)  # type: ignore[union-attr]
        response = await self.upstream(
            url,
            sent,
            request_id=f"{request_id}-shadow",  # its own id upstream: both may run at once
            is_adapter=variant.adapter is not None,
            timeout=timeout,
            api_key=os.environ.get(variant.api_key_env) if variant.api_key_env else None,
            **traced,
        )
        try:
            body = await response.read()
        finally:
            response.release()
        usage = None
        if response.status == 200:
            try:
                parsed = orjson.loads(body)
                usage = Usage.from_json(parsed.get("usage")) if isinstance(parsed, dict) else None
            except orjson.JSONDecodeError:
                return FailureReason.MALFORMED_RESPONSE.status, body, None
        return response.status, body, usage

    def _account(
        self,
        route: Route,
        variant: Variant,
        request_id: str,
        arrived: float,
        started: float,
        endpoint: str,
        sent: bytes,
        status: int,
        body: bytes,
        usage: Usage | None,
        span: object | None = None,
    ) -> None:
        latency = time.perf_counter() - started
        labels = (route.name, variant.name)
        self.metrics.requests.labels(*labels, status_class(status)).inc()
        self.metrics.duration.labels(*labels).observe(latency)
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        cost = route.pricing.cost(prompt, completion)
        if usage is not None:
            self.metrics.prompt_tokens.labels(*labels).inc(prompt)
            self.metrics.completion_tokens.labels(*labels).inc(completion)
            self.metrics.cost.labels(*labels).inc(cost)
        if self.request_log is not None:
            queued = self.request_log.record(
                RequestRecord(
                    request_id=request_id,
                    timestamp=arrived,
                    route=route.name,
                    variant=variant.name,
                    endpoint=endpoint,
                    status=status,
                    stream=False,
                    fallback=None,
                    latency_s=latency,
                    ttft_s=None,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    cost_usd=cost,
                    reference_cost_usd=route.pricing.reference_cost(prompt, completion),
                    payload=sent,
                    answer=body,
                    role=SHADOW,
                )
            )
            if span is not None:
                self.tracer.logged(span, SHADOW, queued is not False)  # type: ignore[union-attr]

    async def close(self) -> None:
        """Cancel the shadows still running (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _Dropped(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _closed(pool: Pool, replica: Replica, adapter: str | None) -> bool:
    """The circuit exists and is closed (or was never used: created closed)."""
    return pool.circuit(replica, adapter).state == 0

"""Forwarding a request with retries and fallback: the first variant of the route's chain that answers.

Each try acquires a replica (service/upstreams.py) and makes one upstream call (service/proxy.py);
nothing has reached the client yet, so a failed try is invisible to it.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import orjson

from loragate.common import sse
from loragate.common.catalog import Route, Timeouts, Variant
from loragate.service.errors import GatewayError
from loragate.service.exchange import Served
from loragate.service.failures import FailureReason, UpstreamFailure
from loragate.service.metrics import Metrics
from loragate.service.prefixring import prompt_prefix
from loragate.service.priority import Priority
from loragate.service.proxy import Upstream, UpstreamResponse, answer_usage
from loragate.service.resilience import Overloaded, backoff_s
from loragate.service.tracing import RequestTracer
from loragate.service.transport import Timeout, TransportError
from loragate.service.upstreams import AdapterUnavailable, CircuitOpen, NoHealthyUpstream, Pool, Replica


class Forwarder:
    """Opens an answer for a request along its candidates (retries, fallback, timeouts); lets it go after."""

    def __init__(
        self,
        pool: Pool,
        metrics: Metrics,
        upstream: Upstream,
        *,
        timeouts: Timeouts,
        max_attempts: int,
        rng: random.Random,
        tracer: RequestTracer | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.upstream = upstream  # the call that sends a request to a replica (proxy.HttpUpstream in production)
        self.timeouts = timeouts  # the gateway's defaults, under each route's own (route_timeouts)
        self._route_timeouts: dict[int, tuple[Route, Timeouts]] = {}
        self.max_attempts = max_attempts
        self.rng = rng  # the backoff's jitter
        self.tracer = tracer  # None: tracing off

    async def open_with_fallback(
        self,
        route: Route,
        candidates: list[Variant],
        payload: dict,
        endpoint: str,
        request_id: str,
        stream: bool,
        *,
        first_reason: FailureReason | None = None,
        span: object | None = None,
        priority: Priority = Priority.STANDARD,
    ) -> Served:
        """The first of ``candidates`` that answers, each tried on up to ``max_attempts`` replicas in all.

        Nothing has reached the client while this runs, so every failure here is invisible to it.
        """
        timeouts = self.route_timeouts(route)
        assert timeouts.total_s is not None  # the gateway's own default is always set
        deadline = time.monotonic() + timeouts.total_s
        attempts = 0
        reason, detail = FailureReason.NO_CANDIDATE, "no variant to try"
        for index, variant in enumerate(candidates):
            tried: set[Replica] = set()
            while True:
                attempts += 1
                trace = (
                    None
                    if span is None
                    else self.tracer.attempt_span(  # type: ignore[union-attr]
                        span,
                        variant.name,
                        attempts,
                        retry=bool(tried),
                        fallback_reason=first_reason.value if first_reason else None,
                    )
                )
                try:
                    served = await self._attempt(
                        route,
                        variant,
                        payload,
                        endpoint,
                        request_id,
                        stream,
                        timeouts,
                        deadline,
                        tried,
                        trace,
                        priority,
                    )
                except Overloaded as exc:
                    if trace is not None:
                        self.tracer.end(trace, error="overloaded")  # type: ignore[union-attr]
                    self.metrics.rejections.labels(route.name).inc()
                    raise GatewayError(
                        503, str(exc), code=exc.code, headers={"retry-after": str(exc.retry_after_s)}
                    ) from None
                except UpstreamFailure as failure:
                    reason, detail = failure.reason, failure.detail
                    if trace is not None:
                        self.tracer.end(trace, error=reason.value)  # type: ignore[union-attr]
                else:
                    if trace is not None:
                        self.tracer.end(trace, served.response.status)  # type: ignore[union-attr]
                    served.fallback = first_reason.value if first_reason else None
                    return served
                retry = (
                    reason.retryable
                    and attempts < self.max_attempts
                    and time.monotonic() < deadline
                    and not variant.endpoint
                    and len(tried) < len(self.pool.replicas)
                )
                if not retry:
                    break
                self.metrics.retries.labels(route.name, reason).inc()
                await asyncio.sleep(backoff_s(attempts, rng=self.rng))
            if index + 1 < len(candidates):
                self.metrics.fallbacks.labels(route.name, variant.name, reason).inc()
            first_reason = first_reason or reason
            if time.monotonic() >= deadline:
                reason, detail = FailureReason.TIMEOUT, "the request's total time ran out"
                break
        raise GatewayError(
            reason.status,
            f"no variant of route `{route.name}` could answer ({reason}: {detail})",
            code=reason.value,
        )

    async def _attempt(
        self,
        route: Route,
        variant: Variant,
        payload: dict,
        endpoint: str,
        request_id: str,
        stream: bool,
        timeouts: Timeouts,
        deadline: float,
        tried: set[Replica],
        trace: object | None = None,
        priority: Priority = Priority.STANDARD,
    ) -> Served:
        """One try of one variant on one replica; raises UpstreamFailure with a bounded reason."""
        try:
            if variant.endpoint:
                replica = self.pool.acquire_endpoint(variant.endpoint)
            else:
                replica = await self.pool.acquire(
                    variant.adapter,
                    variant.path,
                    exclude=tried,
                    prefix=prompt_prefix(payload),
                    weights=route.scheduling,
                    trace=trace,
                    priority=priority,
                )
        except NoHealthyUpstream as exc:
            raise UpstreamFailure(FailureReason.NO_HEALTHY_UPSTREAM, str(exc)) from None
        except CircuitOpen as exc:
            raise UpstreamFailure(FailureReason.CIRCUIT_OPEN, str(exc)) from None
        except AdapterUnavailable as exc:
            raise UpstreamFailure(FailureReason.ADAPTER_UNAVAILABLE, str(exc)) from None
        tried.add(replica)
        traced = {}
        if trace is not None:
            trace.set_attribute("loragate.replica", replica.url)  # type: ignore[attr-defined]
            traced["traceparent"] = self.tracer.traceparent(trace)  # type: ignore[union-attr]
        payload["model"] = route.upstream_model(variant)
        timeout = Timeout(
            total=max(0.001, deadline - time.monotonic()),
            connect=timeouts.connect_s,
            read=timeouts.first_token_s if stream else None,
        )
        response = None
        sent = orjson.dumps(payload)
        try:
            response = await self.upstream(
                f"{replica.url}/{endpoint}" if replica.external else f"{replica.url}/v1/{endpoint}",
                sent,
                request_id=request_id,
                is_adapter=variant.adapter is not None,
                timeout=timeout,
                api_key=os.environ.get(variant.api_key_env) if variant.api_key_env else None,
                **traced,  # only when tracing is on: an Upstream without the keyword still works when it is off
            )
            first_chunk = body = b""
            usage = None
            if stream and response.status == 200:
                # Read the first event before the client sees anything, so a slow or broken start falls back.
                first_chunk = await response.content.readany()
                if not first_chunk or sse.find_error_event(sse.normalize(first_chunk)) == 0:
                    raise UpstreamFailure(
                        FailureReason.STREAM_ERROR, f"{replica.url}: stream ended or failed before any token"
                    )
            else:
                body = await response.read()
                if response.status == 200:
                    try:
                        usage = answer_usage(body)
                    except ValueError:
                        raise UpstreamFailure(
                            FailureReason.MALFORMED_RESPONSE, f"{replica.url}: the answer is not a JSON object"
                        ) from None
        except UpstreamFailure as failure:
            self._abandon(replica, variant, response, failure.reason)
            raise
        except (TimeoutError, asyncio.TimeoutError):
            self._abandon(replica, variant, response, FailureReason.TIMEOUT)
            raise UpstreamFailure(FailureReason.TIMEOUT, f"{replica.url}: no first token in time") from None
        except TransportError as exc:
            self._abandon(replica, variant, response, FailureReason.DISCONNECTED)
            raise UpstreamFailure(FailureReason.DISCONNECTED, f"{replica.url}: {type(exc).__name__}") from None
        self.pool.report(replica, variant.adapter, None)
        return Served(route, variant, replica, response, None, first_chunk, body, usage, sent)

    def _abandon(
        self, replica: Replica, variant: Variant, response: UpstreamResponse | None, reason: FailureReason
    ) -> None:
        if response is not None:
            response.release()
        self.pool.release(replica, variant.adapter)
        self.pool.report(replica, variant.adapter, reason)

    def route_timeouts(self, route: Route) -> Timeouts:
        """The route's timeouts over the gateway's defaults (cached per route object)."""
        cached = self._route_timeouts.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[1]
        own, default = route.timeouts, self.timeouts
        merged = Timeouts(
            connect_s=own.connect_s or default.connect_s,
            first_token_s=own.first_token_s or default.first_token_s,
            total_s=own.total_s or default.total_s,
        )
        if len(self._route_timeouts) > 1024:  # old catalogs' routes
            self._route_timeouts.clear()
        self._route_timeouts[id(route)] = (route, merged)
        return merged

    def release(self, served: Served) -> None:
        """Let the answered exchange go: its response, and its replica slot."""
        served.response.release()
        self.pool.release(served.replica, served.variant.adapter)

    def abandon(self, served: Served, reason: FailureReason) -> None:
        """A stream broke: count the failure against its replica and let it go."""
        self.pool.report(served.replica, served.variant.adapter, reason)
        self.release(served)

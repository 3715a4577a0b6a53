"""Accounting for an answered request: metrics, cost, the caller's charge, the trace, the request log."""

from __future__ import annotations

import time

from loragate.common.logschema import PRIMARY
from loragate.service.exchange import RequestContext, Served
from loragate.service.metrics import Metrics
from loragate.service.proxy import Usage
from loragate.service.requestlog import RequestRecord, RequestSink
from loragate.service.tracing import RequestTracer


class Accounting:
    """What the gateway does once an answer (whole or streamed) has been given to the client."""

    def __init__(self, metrics: Metrics, request_log: RequestSink | None, tracer: RequestTracer | None) -> None:
        self.metrics = metrics
        self.request_log = request_log  # None: no request log kept
        self.tracer = tracer  # None: tracing off

    def account(
        self,
        served: Served,
        context: RequestContext,
        status: int,
        usage: Usage | None,
        first_token_at: float | None,
        *,
        body: bytes | None = None,
        chunks: list[bytes] | None = None,
    ) -> None:
        """Account for an answered request: metrics, cost, and the request log."""
        route, variant = served.route, served.variant
        counted = self.metrics.variant(route.name, variant.name)
        finished = time.perf_counter()
        latency = finished - context.started
        counted.count(status)
        counted.duration.observe(latency)
        ttft = None if first_token_at is None else first_token_at - context.started
        if ttft is not None:
            counted.ttft.observe(ttft)
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        cost = route.pricing.cost(prompt_tokens, completion_tokens)
        reference_cost = route.pricing.reference_cost(prompt_tokens, completion_tokens)
        if usage is not None:
            counted.usage(prompt_tokens, completion_tokens, cost, reference_cost)
            if first_token_at is not None and completion_tokens > 1:
                counted.tpot.observe((finished - first_token_at) / (completion_tokens - 1))
        if status == 200:
            context.principal.charge(
                prompt_tokens + completion_tokens if usage else requested_tokens(context.payload), cost
            )
        if context.shadow is not None:
            context.shadow.primary_done()  # from now on the shadow has its deadline_s
        if context.span is not None:
            self.tracer.answered(  # type: ignore[union-attr]
                context.span,
                variant.name,
                route.upstream_model(variant),
                prompt_tokens if usage else None,
                completion_tokens if usage else None,
                served.fallback,
            )
        if self.request_log is not None:
            # By name (service.requestlog.records): a field added or moved there cannot land in another column.
            queued = self.request_log.record(
                RequestRecord(
                    request_id=context.request_id,
                    timestamp=context.arrived,
                    route=route.name,
                    variant=variant.name,
                    endpoint=context.endpoint,
                    status=status,
                    stream=chunks is not None,
                    fallback=served.fallback,
                    latency_s=latency,
                    ttft_s=ttft,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    cost_usd=cost,
                    reference_cost_usd=reference_cost,
                    payload=context.sent,
                    answer=body if chunks is None else b"".join(chunks),
                    role=PRIMARY,
                    priority=context.priority.label,
                )
            )
            if context.span is not None:  # the hand-off, an event on the request span (tracing.logged says why)
                self.tracer.logged(context.span, PRIMARY, queued is not False)  # type: ignore[union-attr]


def requested_tokens(payload: dict) -> int:
    """An answer without usage (a stream cut short) is charged what the request asked for at most."""
    limit = payload.get("max_completion_tokens", payload.get("max_tokens"))
    return limit if isinstance(limit, int) and limit > 0 else 0

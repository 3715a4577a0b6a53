"""OpenTelemetry traces of the request path, off unless the standard OTEL_* environment asks for them.

``tracer_from_env`` returns None when tracing is off (the gateway then only checks ``span is None``) and imports
the OpenTelemetry SDK and its OTLP/HTTP exporter only when it is on: the gateway runs without them (the
``tracing`` extra). Spans follow the GenAI semantic conventions (https://opentelemetry.io/docs/specs/semconv/gen-ai/):
one per request, named ``{gen_ai.operation.name} {gen_ai.request.model}``, with children for the routing decision,
each upstream attempt (and under it an adapter load it started or waited for) and the shadow copy, and an event for
the request log hand-off. A client's W3C ``traceparent`` is the request span's parent; each attempt's own
``traceparent`` (and the shadow copy's) goes on to the replica, so vLLM's spans (``--otlp-traces-endpoint``) join
the same trace. README.md, Tracing, lists every span and attribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OPERATIONS = {"chat/completions": "chat", "completions": "text_completion"}


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """The OTel SDK's own switches: OTEL_SDK_DISABLED wins, then OTEL_TRACES_EXPORTER, then an OTLP endpoint."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter not in ("", "otlp"):
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: loragate exports traces over OTLP/HTTP only (`otlp`)")
    return exporter == "otlp" or bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def tracer_from_env(environ: Mapping[str, str]) -> RequestTracer | None:
    """A tracer exporting over OTLP/HTTP as the OTEL_* variables say, or None when they leave tracing off."""
    if not tracing_enabled(environ):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT / _HEADERS / _TIMEOUT itself, the provider
    # OTEL_TRACES_SAMPLER(_ARG) (default parentbased_always_on), the batch processor OTEL_BSP_*.
    provider = TracerProvider(
        resource=Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or "loragate"})
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return RequestTracer(provider)


class RequestTracer:
    """The gateway's spans over an SDK TracerProvider (owned here: ``shutdown`` flushes what is queued)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry.trace import (
            SpanKind,
            Status,
            StatusCode,
            format_span_id,
            format_trace_id,
            set_span_in_context,
        )
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._tracer = provider.get_tracer("loragate")
        self._propagator = TraceContextTextMapPropagator()
        self._in = set_span_in_context
        self._kinds = SpanKind
        self._error = Status(StatusCode.ERROR)
        self._ids = (format_trace_id, format_span_id)

    def shutdown(self) -> None:
        self.provider.shutdown()

    # --- the request --------------------------------------------------------------

    def request_span(self, headers: Mapping[str, str], endpoint: str) -> Any:
        """The request's span, a child of the client's ``traceparent`` when it sent a valid one."""
        parent = self._propagator.extract(headers) if "traceparent" in headers else None
        operation = OPERATIONS.get(endpoint, endpoint)
        return self._tracer.start_span(
            operation, context=parent, kind=self._kinds.SERVER, attributes={"gen_ai.operation.name": operation}
        )

    def routed(self, span: Any, endpoint: str, requested_model: str, route: str) -> None:
        span.update_name(f"{OPERATIONS.get(endpoint, endpoint)} {requested_model}")
        span.set_attribute("gen_ai.request.model", requested_model)
        span.set_attribute("loragate.route", route)

    def child(self, span: Any, name: str, kind: str = "INTERNAL") -> Any:
        return self._tracer.start_span(name, context=self._in(span), kind=getattr(self._kinds, kind))

    def answered(
        self,
        span: Any,
        variant: str,
        response_model: str,
        input_tokens: int | None,
        output_tokens: int | None,
        fallback: str | None,
    ) -> None:
        span.set_attribute("loragate.variant", variant)
        span.set_attribute("gen_ai.response.model", response_model)
        if input_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
        if output_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        if fallback:
            span.set_attribute("loragate.fallback", fallback)

    def end(self, span: Any, status: int | None = None, error: str | None = None) -> None:
        """End a span; ``error`` (a bounded reason code) or an HTTP status >= 500 marks it failed."""
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None or (status is not None and status >= 500):
            span.set_attribute("error.type", error or str(status))
            span.set_status(self._error)
        span.end()

    # --- an upstream attempt -----------------------------------------------------------------

    def attempt_span(self, span: Any, variant: str, attempt: int, *, retry: bool, fallback_reason: str | None) -> Any:
        child = self.child(span, f"loragate.upstream {variant}", "CLIENT")
        child.set_attribute("loragate.variant", variant)
        child.set_attribute("loragate.attempt", attempt)
        child.set_attribute("loragate.retry", retry)
        if fallback_reason is not None:
            child.set_attribute("loragate.fallback_reason", fallback_reason)
        return child

    # --- an adapter load (service/adapterloads.py) ------------------------------------------------

    def adapter_load_span(self, parent: Any, adapter: str, replica: str, triggered: bool) -> Any:
        """The wait of one attempt (or shadow) for ``adapter`` on ``replica``: the load it started (``triggered``)
        or one already under way that it joined; several waiters share one load, each has its own span."""
        child = self._tracer.start_span("loragate.adapter_load", context=self._in(parent))
        child.set_attribute("loragate.adapter", adapter)
        child.set_attribute("loragate.replica", replica)
        child.set_attribute("loragate.adapter_load.triggered", triggered)
        return child

    def adapter_load_end(self, span: Any, outcome: str) -> None:
        """``outcome``: success, already_loaded (the ``result`` of loragate_adapter_loads_total), failed (the
        engine refused), error (no answer in time), not_applied (loaded, but the probe found the engine answers it
        with the base model: unloaded again), cancelled (this waiter gave up; the load goes on)."""
        span.set_attribute("loragate.adapter_load.outcome", outcome)
        self.end(span, error=None if outcome in ("success", "already_loaded") else outcome)

    # --- the shadow copy (service/shadow.py) ---------------------------------------------------

    def shadow_span(self, span: Any, route: str, variant: str) -> Any:
        """The shadow copy's span, a child of the request span although it ends after it (the copy is sent once
        the primary has answered; OpenTelemetry lets a child outlive its parent). A child, not a link: the copy
        is part of this one request, caused by it alone, so it belongs in its trace (one lookup by trace id
        shows the primary and its shadow side by side, and vLLM's spans of the copy join it too); a link is for
        work that starts a trace of its own (a batch of many requests, a message consumed later)."""
        child = self._tracer.start_span(f"loragate.shadow {variant}", context=self._in(span), kind=self._kinds.CLIENT)
        child.set_attribute("loragate.route", route)
        child.set_attribute("loragate.variant", variant)
        return child

    def shadow_end(
        self,
        span: Any,
        outcome: str,
        status: int | None = None,
        error: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """``outcome``: answered (any HTTP answer, ``status``), failed (none: ``error`` says why), or the reason
        it was dropped (service.shadow.DROP_REASONS; a drop is by design, not an error)."""
        span.set_attribute("loragate.shadow.outcome", outcome)
        if input_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
        if output_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        self.end(span, status, error)

    # --- the request log hand-off ---------------------------------------------------------------

    def logged(self, span: Any, role: str, queued: bool) -> None:
        """The record handed to the request log: an event on ``span``, not a child span. The hand-off is one
        queue append with nothing to time; bench/tracing_overhead.py measured an event at ~17 µs of CPU
        (exported) and a child span with the same attributes at ~51 µs, 3x as much."""
        span.add_event("loragate.requestlog", {"loragate.requestlog.role": role, "loragate.requestlog.queued": queued})

    def traceparent(self, span: Any) -> str:
        """The W3C header that makes the replica's spans children of ``span``."""
        context = span.get_span_context()
        trace_id, span_id = self._ids
        return f"00-{trace_id(context.trace_id)}-{span_id(context.span_id)}-{int(context.trace_flags):02x}"

"""One completion request, top to bottom: read, route, choose a variant, forward with fallback, account.

Where a routing decision is made: ``Gateway.handle`` -> ``routing.choose_variant``. Reading the request:
service/body.py; forwarding with retries and fallback: service/forwarding.py; relaying a stream:
service/relay.py; accounting for the answer: service/accounting.py.
"""

from __future__ import annotations

import random
import time

from starlette.requests import Request
from starlette.responses import Response

from loragate.common.catalog import CatalogFile, Route, Timeouts
from loragate.service.accounting import Accounting
from loragate.service.auth import AllowAll, Authenticator
from loragate.service.body import check_limits, parse_completion, read_body, request_id_of
from loragate.service.errors import GatewayError, error_response
from loragate.service.exchange import RequestContext, Served
from loragate.service.failures import FailureReason
from loragate.service.forwarding import Forwarder
from loragate.service.metrics import Metrics, status_class
from loragate.service.priority import PRIORITY_HEADER, PriorityPolicy, open_policy
from loragate.service.proxy import Upstream, Usage
from loragate.service.relay import RelayedStream, continuation_payload
from loragate.service.requestlog import NullRequestLog, RequestSink
from loragate.service.routing import PinError, choose_variant, sticky_value
from loragate.service.shadow import ShadowMetrics, Shadows
from loragate.service.tracing import RequestTracer
from loragate.service.upstreams import Pool

PIN_HEADER = "x-loragate-variant"


class Gateway:
    def __init__(
        self,
        catalog: CatalogFile,
        pool: Pool,
        metrics: Metrics,
        upstream: Upstream,
        *,
        max_body_bytes: int,
        timeouts: Timeouts = Timeouts(connect_s=5, first_token_s=60, total_s=600),
        max_attempts: int = 4,
        request_log: RequestSink | None = None,
        auth: Authenticator | AllowAll | None = None,
        rng: random.Random | None = None,
        shadows: Shadows | None = None,
        tracer: RequestTracer | None = None,
        priorities: PriorityPolicy | None = None,
    ) -> None:
        # The priority classes of callers without a key of their own (auth off): service/priority.py.
        self.priorities = priorities or open_policy("standard")
        self.tracer = tracer  # None: tracing off, one `is None` check per step (service/tracing.py)
        kept_log = None if request_log is None or isinstance(request_log, NullRequestLog) else request_log
        self.catalog = catalog
        self.pool = pool
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.rng = rng or random.Random()  # the weighted draw of a variant
        self.auth = auth or AllowAll()
        # Forward with retries and fallback (the backoff's jitter from the same rng), then account for the answer.
        self.forwarder = Forwarder(
            pool, metrics, upstream, timeouts=timeouts, max_attempts=max_attempts, rng=self.rng, tracer=tracer
        )
        self.accounting = Accounting(metrics, kept_log, tracer)
        # Routes with a `shadow`: a sampled copy of each request answered in the dark (service/shadow.py).
        self.shadows = shadows or Shadows(
            pool,
            upstream,
            ShadowMetrics(metrics.registry),
            kept_log,
            self.forwarder.route_timeouts,
            tracer=tracer,
        )

    async def handle(self, request: Request, endpoint: str) -> Response:
        if self.tracer is None:
            return await self._handle(request, endpoint, None)
        span = self.tracer.request_span(request.headers, endpoint)
        try:
            response = await self._handle(request, endpoint, span)
        except BaseException:
            self.tracer.end(span, error="internal")
            raise
        if not isinstance(response, RelayedStream):  # a stream's span ends with the stream (end_stream)
            self.tracer.end(span, response.status_code)
        return response

    async def _handle(self, request: Request, endpoint: str, span: object | None) -> Response:
        started = time.perf_counter()
        arrived = time.time()
        request_id = request_id_of(request.headers)
        headers = {"x-request-id": request_id}

        # 1. Who is calling (before the body is read), then read and check the request.
        try:
            principal = self.auth.authenticate(request.headers)
            priority = (principal.priorities or self.priorities).of(request.headers.get(PRIORITY_HEADER))
            payload = parse_completion(await read_body(request, self.max_body_bytes), endpoint)
            route, pinned = self._resolve_route(payload["model"], request)
        except GatewayError as exc:
            self.metrics.requests.labels("_unknown", "none", status_class(exc.status)).inc()
            return error_response(exc, headers)
        headers["x-loragate-route"] = route.name
        if span is not None:
            self.tracer.routed(span, endpoint, payload["model"], route.name)  # type: ignore[union-attr]
            span.set_attribute("loragate.priority", priority.label)  # type: ignore[attr-defined]
        try:
            pending = principal.admit(route.name)  # the key's route allow-list and rate limits
            if pending is not None:  # a shared limiter's round trip (in-process limits decide at once)
                await pending
        except GatewayError as exc:
            self.metrics.requests.labels(route.name, "none", status_class(exc.status)).inc()
            return error_response(exc, headers)

        # 2. Choose the variant: pin, sticky key, or weighted draw.
        routing = None if span is None else self.tracer.child(span, "loragate.routing")  # type: ignore[union-attr]
        try:
            choice = choose_variant(
                route,
                pinned=pinned,
                sticky_value=sticky_value(route, request.headers, payload),
                rng=self.rng,
            )
        except PinError as exc:
            if routing is not None:
                self.tracer.end(routing, error="invalid_variant")  # type: ignore[union-attr]
            self.metrics.requests.labels(route.name, "none", "4xx").inc()
            return error_response(GatewayError(400, str(exc), code="invalid_variant", param="model"), headers)
        if routing is not None:
            routing.set_attribute("loragate.variant", choice.variant.name)
            routing.set_attribute("loragate.pinned", pinned is not None)
            self.tracer.end(routing)  # type: ignore[union-attr]

        try:
            check_limits(route, payload)
        except GatewayError as exc:
            self.metrics.requests.labels(route.name, "none", "4xx").inc()
            return error_response(exc, headers)

        # The shadow copy (sampled routes only) starts now, beside the primary, and never touches its answer.
        shadow = (
            self.shadows.start(route, choice.variant, payload, endpoint, request_id, span) if route.shadow else None
        )

        stream = payload.get("stream") is True
        client_wants_usage = False
        if stream:
            options = payload.get("stream_options")
            options = options if isinstance(options, dict) else {}
            client_wants_usage = options.get("include_usage") is True
            payload["stream_options"] = {**options, "include_usage": True}

        # 3. Forward, falling back along the route's chain before any byte is sent.
        in_flight = self.metrics.route_in_flight(route.name)
        in_flight.inc()
        try:
            served = await self.forwarder.open_with_fallback(
                route,
                [choice.variant, *route.fallback_chain(choice.variant)],
                payload,
                endpoint,
                request_id,
                stream,
                span=span,
                priority=priority,
            )
        except GatewayError as exc:
            in_flight.dec()
            self.metrics.requests.labels(route.name, choice.variant.name, status_class(exc.status)).inc()
            if shadow is not None:
                shadow.primary_done()
            return error_response(exc, headers)
        headers["x-loragate-variant"] = served.variant.name
        if served.fallback:
            headers["x-loragate-fallback"] = served.fallback

        # 4. Relay the answer and account for it.
        context = RequestContext(
            endpoint, request_id, arrived, started, payload, served.sent, principal, shadow, span, priority
        )
        if stream and served.response.status == 200:
            return RelayedStream(self, served, headers, context, hide_usage=not client_wants_usage)
        self.forwarder.release(served)
        in_flight.dec()
        body = served.body
        status = served.response.status
        self.accounting.account(served, context, status, served.usage, None, body=body)
        return JSONBytesResponse(body, status, headers)

    # --- steps ----------------------------------------------------------------

    def _resolve_route(self, model: str, request: Request) -> tuple[Route, str | None]:
        """``model`` is a route name, optionally ``route:variant`` to pin a variant."""
        routes = self.catalog.current.routes
        name, _, pinned = model.partition(":")
        route = routes.get(name)
        if route is None:
            raise GatewayError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        return route, pinned or request.headers.get(PIN_HEADER) or None

    # --- the stream relay's StreamOwner (service/relay.py) -----------------------

    async def continue_stream(
        self, served: Served, forwarded: list[bytes], context: RequestContext, reason: FailureReason
    ) -> tuple[Served, int] | None:
        """Mid-stream failover: resume a broken stream on the next fallback target from the text sent so far.

        Returns the new upstream and the number of tokens already streamed, or None when the
        stream cannot be continued (no target left, n > 1, a prompt that is not a string).
        """
        route = served.route
        continuation = continuation_payload(context.payload, context.endpoint, forwarded)
        candidates = route.fallback_chain(served.variant)
        if continuation is None or not candidates:
            return None
        payload, tokens_so_far = continuation
        self.metrics.fallbacks.labels(route.name, served.variant.name, reason.midstream).inc()
        try:
            resumed = await self.forwarder.open_with_fallback(
                route,
                candidates,
                payload,
                context.endpoint,
                context.request_id,
                stream=True,
                span=context.span,
                priority=context.priority,
            )
        except GatewayError:
            return None
        resumed.fallback = reason.midstream
        return resumed, tokens_so_far

    def abandon_stream(self, served: Served, reason: FailureReason) -> None:
        self.forwarder.abandon(served, reason)

    def end_stream(
        self,
        served: Served,
        context: RequestContext,
        usage: Usage | None,
        first_token_at: float | None,
        chunks: list[bytes],
        *,
        released: bool,
    ) -> None:
        if not released:
            self.forwarder.release(served)
        self.metrics.route_in_flight(served.route.name).dec()
        self.accounting.account(served, context, 200, usage, first_token_at, chunks=chunks)
        if context.span is not None:
            self.tracer.end(context.span, 200)  # type: ignore[union-attr]


class JSONBytesResponse(Response):
    """An upstream's JSON answer passed on as the bytes it came in, with lower-case ASCII headers.

    Starlette's Response re-encodes and re-scans its headers; on the hot path that was a tenth of
    the gateway's own CPU per request (py-spy, bench/overhead.py at c=1).
    """

    def __init__(self, body: bytes, status: int, headers: dict[str, str]) -> None:
        self.status_code = status
        self.body = body
        self.background = None
        self.raw_headers = [(name.encode(), value.encode()) for name, value in headers.items()]
        self.raw_headers += ((b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)))

"""One completion request, top to bottom: read, route, choose a variant, forward with fallback, account.

Where a routing decision is made: ``Gateway.handle`` -> ``routing.choose_variant``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response

from loragate.common import sse
from loragate.service.auth import AllowAll, Authenticator
from loragate.service.body import REQUEST_ID, parse_json_object, read_body
from loragate.common.catalog import CatalogFile, Route, Timeouts, Variant
from loragate.common.logschema import PRIMARY
from loragate.service.errors import GatewayError, error_response
from loragate.service.metrics import Metrics, status_class
from loragate.service.exchange import RequestContext, Served
from loragate.service.failures import FailureReason, UpstreamFailure
from loragate.service.proxy import Upstream, UpstreamResponse, Usage
from loragate.service.relay import RelayedStream, continuation_payload
from loragate.service.requestlog import NullRequestLog, RequestRecord, RequestSink
from loragate.service.routing import PinError, choose_variant
from loragate.service.shadow import ShadowMetrics, Shadows
from loragate.service.tracing import RequestTracer
from loragate.service.transport import Timeout, TransportError
from loragate.service.resilience import Overloaded, backoff_s
from loragate.service.prefixring import prompt_prefix
from loragate.service.priority import PRIORITY_HEADER, Priority, PriorityPolicy, open_policy
from loragate.service.upstreams import AdapterUnavailable, CircuitOpen, NoHealthyUpstream, Pool, Replica

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
        self.request_log = request_log or NullRequestLog()
        self.keeps_log = not isinstance(self.request_log, NullRequestLog)
        self.catalog = catalog
        self.pool = pool
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.timeouts = timeouts
        self._route_timeouts: dict[int, tuple[Route, Timeouts]] = {}
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        self.auth = auth or AllowAll()
        self.upstream = upstream  # the call that sends a request to a replica (proxy.HttpUpstream in production)
        # Routes with a `shadow`: a sampled copy of each request answered in the dark (service/shadow.py).
        self.shadows = shadows or Shadows(
            pool,
            upstream,
            ShadowMetrics(metrics.registry),
            self.request_log if self.keeps_log else None,
            self._timeouts,
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
        request_id = _request_id(request)
        headers = {"x-request-id": request_id}

        # 1. Who is calling (before the body is read), then read and check the request.
        try:
            principal = self.auth.authenticate(request.headers)
            priority = (principal.priorities or self.priorities).of(request.headers.get(PRIORITY_HEADER))
            payload = _parse_payload(await read_body(request, self.max_body_bytes), endpoint)
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
                sticky_value=_sticky_value(route, request, payload),
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
            _check_limits(route, payload)
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
            served = await self.open_with_fallback(
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
        self.release(served)
        in_flight.dec()
        body = served.body
        status = served.response.status
        self.finish(served, context, status, served.usage, None, body=body)
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
        timeouts = self._timeouts(route)
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
                        usage = _answer_usage(body)
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

    def _timeouts(self, route: Route) -> Timeouts:
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

    def finish(
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
                prompt_tokens + completion_tokens if usage else _requested_tokens(context.payload), cost
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
        if self.keeps_log:
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
            resumed = await self.open_with_fallback(
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

    def release(self, served: Served) -> None:
        served.response.release()
        self.pool.release(served.replica, served.variant.adapter)

    # --- the stream relay's StreamOwner -----------------------------------------

    def abandon_stream(self, served: Served, reason: FailureReason) -> None:
        self.pool.report(served.replica, served.variant.adapter, reason)
        self.release(served)

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
            self.release(served)
        self.metrics.route_in_flight(served.route.name).dec()
        self.finish(served, context, 200, usage, first_token_at, chunks=chunks)
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


# --- request helpers ----------------------------------------------------------


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id")
    return given if given and REQUEST_ID.match(given) else os.urandom(16).hex()


def _parse_payload(body: bytes, endpoint: str) -> dict:
    payload = parse_json_object(body)
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise GatewayError(400, "`model` is required and must be a string", code="missing_model", param="model")
    if endpoint == "chat/completions":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GatewayError(400, "`messages` must be a non-empty array", code="invalid_messages", param="messages")
    elif "prompt" not in payload:
        raise GatewayError(400, "`prompt` is required", code="missing_prompt", param="prompt")
    if "stream" in payload and not isinstance(payload["stream"], bool):
        raise GatewayError(400, "`stream` must be a boolean", code="invalid_stream", param="stream")
    return payload


def _check_limits(route: Route, payload: dict) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GatewayError(400, f"`{name}` must be a positive integer", code="invalid_parameter", param=name)
        if route.limits.max_tokens is not None and value > route.limits.max_tokens:
            raise GatewayError(
                400,
                f"`{name}` may be at most {route.limits.max_tokens} on this route",
                code="invalid_parameter",
                param=name,
            )
    n = payload.get("n", 1)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= route.limits.max_n):
        raise GatewayError(
            400, f"`n` must be an integer from 1 to {route.limits.max_n}", code="invalid_parameter", param="n"
        )


def _sticky_value(route: Route, request: Request, payload: dict) -> str | None:
    """The caller's sticky key: the route's header, else the OpenAI ``user`` field."""
    if route.sticky_key:
        value = request.headers.get(route.sticky_key)
        if value:
            return value
    user = payload.get("user")
    return user if isinstance(user, str) and user else None


def _requested_tokens(payload: dict) -> int:
    """An answer without usage (a stream cut short) is charged what the request asked for at most."""
    limit = payload.get("max_completion_tokens", payload.get("max_tokens"))
    return limit if isinstance(limit, int) and limit > 0 else 0


def _answer_usage(body: bytes) -> Usage | None:
    """The usage in a JSON answer (None when it has none); ValueError when it is not a JSON object."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    return Usage.from_json(parsed.get("usage"))

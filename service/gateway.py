"""One completion request, top to bottom: read, route, choose a variant, forward with fallback, account.

Where a routing decision is made: ``Gateway.handle`` -> ``routing.choose_variant``.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from dataclasses import dataclass

import aiohttp
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.catalog import CatalogFile, Route, Variant
from service.errors import GatewayError, error_response
from service.metrics import Metrics, status_class
from service.proxy import SseRelay, UpstreamFailure, Usage, open_upstream
from service.requestlog import NullRequestLog, RequestRecord, RequestSink
from service.routing import PinError, choose_variant
from service.upstreams import AdapterUnavailable, NoHealthyUpstream, Pool, Replica

PIN_HEADER = "x-loragate-variant"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_FAILURE_STATUS = {"timeout": 504, "no_healthy_upstream": 503}


@dataclass(slots=True)
class Served:
    """What answered a request: the variant and replica, and why we are not on the first choice."""

    route: Route
    variant: Variant
    replica: Replica
    response: aiohttp.ClientResponse
    fallback: str | None


class Gateway:
    def __init__(
        self,
        catalog: CatalogFile,
        pool: Pool,
        metrics: Metrics,
        *,
        max_body_bytes: int,
        request_log: RequestSink | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.request_log = request_log or NullRequestLog()
        self.keeps_chunks = not isinstance(self.request_log, NullRequestLog)
        self.catalog = catalog
        self.pool = pool
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.rng = rng or random.Random()
        self.session: aiohttp.ClientSession | None = None

    def bind(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def handle(self, request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        arrived = time.time()
        request_id = _request_id(request)
        headers = {"x-request-id": request_id}

        # 1. Read and check the request.
        try:
            payload = _parse_payload(await _read_body(request, self.max_body_bytes), endpoint)
            route, pinned = self._resolve_route(payload["model"], request)
        except GatewayError as exc:
            self.metrics.requests.labels("_unknown", "none", status_class(exc.status)).inc()
            return error_response(exc.status, exc.message, code=exc.code, param=exc.param, headers=headers)
        headers["x-loragate-route"] = route.name

        # 2. Choose the variant: pin, sticky key, or weighted draw.
        try:
            choice = choose_variant(
                route,
                pinned=pinned,
                sticky_value=_sticky_value(route, request, payload),
                rng=self.rng,
            )
        except PinError as exc:
            self.metrics.requests.labels(route.name, "none", "4xx").inc()
            return error_response(400, str(exc), code="invalid_variant", param="model", headers=headers)

        stream = payload.get("stream") is True
        client_wants_usage = False
        if stream:
            options = payload.get("stream_options") if isinstance(payload.get("stream_options"), dict) else {}
            client_wants_usage = options.get("include_usage") is True
            payload["stream_options"] = {**options, "include_usage": True}

        # 3. Forward, falling back along the route's chain before any byte is sent.
        in_flight = self.metrics.in_flight.labels(route.name)
        in_flight.inc()
        try:
            served = await self._open_with_fallback(route, choice.variant, payload, endpoint, request_id)
        except GatewayError as exc:
            in_flight.dec()
            self.metrics.requests.labels(route.name, choice.variant.name, status_class(exc.status)).inc()
            return error_response(exc.status, exc.message, code=exc.code, headers=headers)
        headers["x-loragate-variant"] = served.variant.name
        if served.fallback:
            headers["x-loragate-fallback"] = served.fallback

        # 4. Relay the answer and account for it.
        context = _Context(endpoint, request_id, arrived, started, payload)
        if stream and served.response.status == 200:
            return RelayedStream(self, served, headers, context, hide_usage=not client_wants_usage)
        try:
            body = await served.response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            body = None
            failure = exc
        finally:
            self._release(served)
            in_flight.dec()
        if body is None:
            self.metrics.requests.labels(route.name, served.variant.name, "5xx").inc()
            status = 504 if isinstance(failure, TimeoutError) else 502
            return error_response(status, "upstream failed while sending its answer", code="upstream_error", headers=headers)
        status = served.response.status
        self.finish(served, context, status, _usage_of(body) if status == 200 else None, None, body=body)
        return Response(body, status_code=status, headers=headers, media_type="application/json")

    # --- steps ----------------------------------------------------------------

    def _resolve_route(self, model: str, request: Request) -> tuple[Route, str | None]:
        """``model`` is a route name, optionally ``route:variant`` to pin a variant."""
        routes = self.catalog.current.routes
        name, _, pinned = model.partition(":")
        route = routes.get(name)
        if route is None:
            raise GatewayError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        return route, pinned or request.headers.get(PIN_HEADER) or None

    async def _open_with_fallback(
        self, route: Route, chosen: Variant, payload: dict, endpoint: str, request_id: str
    ) -> Served:
        assert self.session is not None
        candidates = [chosen, *route.fallback_chain(chosen)]
        first_reason: str | None = None
        for index, variant in enumerate(candidates):
            try:
                replica = await self.pool.acquire(variant.adapter, variant.path)
            except NoHealthyUpstream:
                reason, detail = "no_healthy_upstream", "no healthy upstream replica"
            except AdapterUnavailable as exc:
                reason, detail = "adapter_unavailable", str(exc)
            else:
                payload["model"] = route.upstream_model(variant)
                replica.in_flight += 1
                self.metrics.upstream_in_flight.labels(replica.url).inc()
                try:
                    response = await open_upstream(
                        self.session,
                        f"{replica.url}/v1/{endpoint}",
                        orjson.dumps(payload),
                        request_id=request_id,
                        is_adapter=not variant.is_base,
                    )
                except UpstreamFailure as failure:
                    self._release_replica(replica)
                    reason, detail = failure.reason, failure.detail
                    if reason == "connect_error":
                        self.pool.mark_failed(replica)
                    elif reason == "adapter_missing" and variant.adapter:
                        self.pool.forget_adapter(replica, variant.adapter)
                else:
                    return Served(route, variant, replica, response, first_reason)
            if index + 1 < len(candidates):
                self.metrics.fallbacks.labels(route.name, variant.name, reason).inc()
            first_reason = first_reason or reason
        raise GatewayError(
            _FAILURE_STATUS.get(reason, 502),
            f"no variant of route `{route.name}` could answer ({reason}: {detail})",
            code=reason,
        )

    def finish(
        self,
        served: Served,
        context: "_Context",
        status: int,
        usage: Usage | None,
        first_token_at: float | None,
        *,
        body: bytes | None = None,
        chunks: list[bytes] | None = None,
    ) -> None:
        """Account for an answered request: metrics, cost, and the request log."""
        route, variant = served.route, served.variant
        labels = (route.name, variant.name)
        finished = time.perf_counter()
        latency = finished - context.started
        self.metrics.requests.labels(*labels, status_class(status)).inc()
        self.metrics.request_duration.labels(*labels).observe(latency)
        ttft = None if first_token_at is None else first_token_at - context.started
        if ttft is not None:
            self.metrics.time_to_first_token.labels(*labels).observe(ttft)
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        if usage is not None:
            self.metrics.record_usage(route, variant.name, prompt_tokens, completion_tokens)
            if first_token_at is not None and completion_tokens > 1:
                self.metrics.time_per_output_token.labels(*labels).observe(
                    (finished - first_token_at) / (completion_tokens - 1))
        self.request_log.record(RequestRecord(
            request_id=context.request_id, timestamp=context.arrived, route=route.name, variant=variant.name,
            endpoint=context.endpoint, status=status, stream=chunks is not None, fallback=served.fallback,
            latency_s=latency, ttft_s=ttft, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            cost_usd=route.pricing.cost(prompt_tokens, completion_tokens),
            reference_cost_usd=route.pricing.reference_cost(prompt_tokens, completion_tokens),
            payload=context.payload, body=body, chunks=chunks or [],
        ))

    def _release(self, served: Served) -> None:
        served.response.release()
        self._release_replica(served.replica)

    def _release_replica(self, replica: Replica) -> None:
        replica.in_flight -= 1
        self.metrics.upstream_in_flight.labels(replica.url).dec()


@dataclass(slots=True)
class _Context:
    endpoint: str
    request_id: str
    arrived: float  # wall clock, for the log
    started: float  # perf counter, for durations
    payload: dict


class RelayedStream(Response):
    """Relays an upstream SSE stream event by event, then accounts for it (tokens, cost, TTFT, TPOT)."""

    def __init__(self, gateway: Gateway, served: Served, headers: dict[str, str], context: _Context,
                 hide_usage: bool) -> None:
        self.gateway = gateway
        self.served = served
        self.context = context
        self.relay = SseRelay(hide_usage)
        self.status_code = 200
        self.background = None
        self.init_headers({**headers, "content-type": "text/event-stream", "cache-control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        served, relay = self.served, self.relay
        kept: list[bytes] | None = [] if self.gateway.keeps_chunks else None
        first_token_at: float | None = None
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for chunk in served.response.content.iter_any():
                out = relay.feed(chunk)
                if out:
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    if kept is not None:
                        kept.append(out)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            tail = relay.finish()
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except (aiohttp.ClientError, TimeoutError):
            # Upstream broke mid-stream: end with a well-formed error event rather than a silent cut.
            error = orjson.dumps({"error": {"message": "upstream stream broke", "type": "upstream_error",
                                            "param": None, "code": "stream_interrupted"}})
            await send({"type": "http.response.body", "body": b"data: " + error + b"\n\n", "more_body": False})
        except OSError:
            pass  # the client went away; closing the upstream response aborts the generation
        finally:
            self.gateway._release(served)
            self.gateway.metrics.in_flight.labels(served.route.name).dec()
            self.gateway.finish(served, self.context, 200, relay.usage, first_token_at, chunks=kept or [])


# --- request helpers ----------------------------------------------------------


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id")
    return given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise GatewayError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise GatewayError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise GatewayError(413, f"request body is larger than {limit} bytes", code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise GatewayError(400, "client disconnected while sending the request") from None
    return b"".join(chunks)


def _parse_payload(body: bytes, endpoint: str) -> dict:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc.msg}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
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


def _sticky_value(route: Route, request: Request, payload: dict) -> str | None:
    """The caller's sticky key: the route's header, else the OpenAI ``user`` field."""
    if route.sticky_key:
        value = request.headers.get(route.sticky_key)
        if value:
            return value
    user = payload.get("user")
    return user if isinstance(user, str) and user else None


def _usage_of(body: bytes) -> Usage | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return Usage.from_json(parsed.get("usage")) if isinstance(parsed, dict) else None

"""OpenTelemetry traces: the real SDK and OTLP/HTTP exporter, sent to an in-process OTLP receiver on loopback.

The replica is scripted (its call records the ``traceparent`` the gateway sends on); the receiver decodes the
protobuf ExportTraceServiceRequest the exporter posts, so the spans are checked as a collector would see them.
"""

from __future__ import annotations

import asyncio
import http.server
import threading

import httpx
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from loragate.service.app import create_app
from loragate.service.failures import FailureReason, UpstreamFailure
from loragate.service.metrics import Metrics
from loragate.service.settings import Settings
from loragate.service.tracing import tracing_enabled

REPLICAS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
ROUTES = """
routes:
  chain:
    variants:
      - {name: v1, adapter: a1, path: /a/a1, weight: 1}
      - {name: v2, adapter: a2, path: /a/a2, weight: 0}
    fallback: [v1, v2]
"""
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Answer:
    status = 200

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def read(self) -> bytes:
        return self._body

    def release(self) -> None:
        pass


class Replicas:
    """Scripted replicas: adapter a1 answers 500 (so v2 serves as the fallback), a2 answers; traceparents kept."""

    def __init__(self) -> None:
        self.traceparents: list[str | None] = []

    async def __call__(self, url, body, *, request_id, is_adapter, timeout=None, api_key=None, traceparent=None):
        self.traceparents.append(traceparent)
        model = orjson.loads(body)["model"]
        if model == "a1":
            raise UpstreamFailure(FailureReason.UPSTREAM_5XX, f"{url}: HTTP 500")
        return Answer(
            orjson.dumps(
                {
                    "id": "c1",
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 5},
                }
            )
        )


@pytest.fixture
def receiver():
    """An OTLP/HTTP trace receiver on loopback: yields (endpoint, list of decoded spans)."""
    spans: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            assert self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    spans.extend(scope.spans)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # serve_forever looks for shutdown() every poll_interval: at its default (0.5 s) each test's teardown waited
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", spans
    server.shutdown()
    server.server_close()


def _attrs(span) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


async def test_request_routing_and_attempt_spans_reach_a_real_otlp_receiver(tmp_path, monkeypatch, receiver):
    endpoint, spans = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    replicas = Replicas()
    app = create_app(Settings(routes_file=routes, upstreams=REPLICAS, max_attempts=1), Metrics(), upstream=replicas)
    for replica in app.state.pool.replicas:
        replica.healthy = True
        replica.adapters = {"a1", "a2"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        response = await client.post(
            "/v1/chat/completions",
            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x-loragate-priority": "critical"},
            json={"model": "chain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-loragate-fallback"] == "upstream_5xx"
    tracer = app.state.gateway.tracer
    await asyncio.to_thread(tracer.shutdown)  # flush the batch to the receiver

    by_name = {span.name: span for span in spans}
    assert set(by_name) == {"chat chain", "loragate.routing", "loragate.upstream v1", "loragate.upstream v2"}
    request = by_name["chat chain"]
    assert request.trace_id.hex() == CLIENT_TRACE and request.parent_span_id.hex() == CLIENT_SPAN
    attrs = _attrs(request)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "chain"
    assert attrs["gen_ai.response.model"] == "a2"
    assert attrs["gen_ai.usage.input_tokens"] == 11 and attrs["gen_ai.usage.output_tokens"] == 5
    assert attrs["loragate.route"] == "chain" and attrs["loragate.variant"] == "v2"
    assert attrs["loragate.fallback"] == "upstream_5xx"
    assert attrs["loragate.priority"] == "critical"
    for name in ("loragate.routing", "loragate.upstream v1", "loragate.upstream v2"):
        assert by_name[name].trace_id == request.trace_id and by_name[name].parent_span_id == request.span_id
    assert _attrs(by_name["loragate.routing"])["loragate.variant"] == "v1"
    failed, served = _attrs(by_name["loragate.upstream v1"]), _attrs(by_name["loragate.upstream v2"])
    assert failed["error.type"] == "upstream_5xx" and by_name["loragate.upstream v1"].status.code == 2  # ERROR
    assert served["loragate.fallback_reason"] == "upstream_5xx" and served["loragate.replica"] in REPLICAS
    assert served["http.response.status_code"] == 200
    # Each attempt's traceparent went to the replica: same trace, the attempt span as the parent.
    attempts = ("loragate.upstream v1", "loragate.upstream v2")
    assert replicas.traceparents == [f"00-{CLIENT_TRACE}-{by_name[name].span_id.hex()}-01" for name in attempts]


async def test_tracing_off_sends_no_traceparent_and_builds_no_tracer(tmp_path, monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    replicas = Replicas()
    app = create_app(Settings(routes_file=routes, upstreams=REPLICAS, max_attempts=1), Metrics(), upstream=replicas)
    for replica in app.state.pool.replicas:
        replica.healthy = True
        replica.adapters = {"a1", "a2"}
    assert app.state.gateway.tracer is None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "chain", "messages": [{"role": "user", "content": "hi"}]}
        )
    assert response.status_code == 200 and replicas.traceparents == [None, None]


def test_the_standard_switches():
    assert not tracing_enabled({})
    assert tracing_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert tracing_enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert tracing_enabled({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing_enabled({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not tracing_enabled({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    with pytest.raises(ValueError, match="OTLP"):
        tracing_enabled({"OTEL_TRACES_EXPORTER": "zipkin"})


async def test_the_traceparent_goes_on_the_wire_through_both_clients():
    """The header a traced attempt passes reaches a replica over real HTTP, lean client and aiohttp alike."""
    import aiohttp
    from aiohttp import web

    from loragate.service.httpclient import HttpClient
    from loragate.service.proxy import open_upstream
    from loragate.service.transport import Timeout

    seen: list[str | None] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent"))
        return web.json_response({"id": "c1", "choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/chat/completions"
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    lean = HttpClient(Timeout(total=5, connect=2))
    session = aiohttp.ClientSession()
    try:
        for client in (lean, session):
            for sent in (traceparent, None):
                response = await open_upstream(client, url, b"{}", request_id="r1", is_adapter=False, traceparent=sent)
                assert response.status == 200
                await response.read()
                response.release()
    finally:
        await lean.close()
        await session.close()
        await runner.cleanup()
    assert seen == [traceparent, None, traceparent, None]


async def test_sampled_out_requests_are_answered_and_export_nothing(tmp_path, monkeypatch, receiver):
    endpoint, spans = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    replicas = Replicas()
    app = create_app(Settings(routes_file=routes, upstreams=REPLICAS, max_attempts=1), Metrics(), upstream=replicas)
    for replica in app.state.pool.replicas:
        replica.healthy = True
        replica.adapters = {"a1", "a2"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "chain", "messages": [{"role": "user", "content": "hi"}]}
        )
    assert response.status_code == 200
    await asyncio.to_thread(app.state.gateway.tracer.shutdown)
    assert spans == []
    assert len(replicas.traceparents) == 2
    assert all(int(tp[-2:], 16) & 1 == 0 for tp in replicas.traceparents)  # the sampled flag is off


# --- the shadow copy, adapter loads and the request log hand-off, against the STUB engine over real HTTP ------------

SHADOWED = """
routes:
  shadowed:
    variants:
      - {name: v1, adapter: a1, path: /a/a1, weight: 1}
      - {name: v2, adapter: a2, path: /a/a2, weight: 0}
    shadow: {variant: v2, percent: 100, max_in_flight: 8, deadline_s: 30}
  broken:
    variants:
      - {name: bad, adapter: b1, path: /a/missing-b1, weight: 1}
  badshadow:
    variants:
      - {name: v1, adapter: a1, path: /a/a1, weight: 1}
      - {name: bad, adapter: b2, path: /a/missing-b2, weight: 0}
    shadow: {variant: bad, percent: 100}
"""
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class KeptRows:
    """The request log's store: rows kept in memory (the log is never started here: records stay queued)."""

    def write(self, table, rows) -> int:
        return 0


@pytest.fixture
async def stub_gateway(tmp_path, monkeypatch, receiver):
    """The served app in front of the STUB engine (tests/stub_upstream.py, aiohttp on loopback, no adapter loaded:
    the gateway loads them on demand), tracing on, a real RequestLog (never started: the hand-off only).

    Yields (app, spans, seen, build_log): ``seen`` is (model, traceparent) of each chat completion the stub answered."""
    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from loragate.service.aiohttpedge import AiohttpControl
    from loragate.service.requestlog import RequestLog
    from tests.stub_upstream import make_app

    endpoint, spans = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    seen: list[tuple[str, str | None]] = []

    @web.middleware
    async def keep_traceparent(request, handler):
        if request.path.endswith("chat/completions"):  # not the gateway's adapter probes (/v1/completions)
            seen.append((orjson.loads(await request.read())["model"], request.headers.get("traceparent")))
        return await handler(request)

    stub = make_app(chunks=4)
    stub.middlewares.append(keep_traceparent)
    server = TestServer(stub)
    await server.start_server()
    routes = tmp_path / "routes.yaml"
    routes.write_text(SHADOWED)
    metrics = Metrics()
    app = create_app(
        Settings(routes_file=routes, upstreams=[str(server.make_url("")).rstrip("/")], max_attempts=1), metrics
    )
    gateway = app.state.gateway

    def use_log(queue_size: int) -> None:
        log = RequestLog(KeptRows(), metrics, queue_size=queue_size)
        gateway.accounting.request_log = gateway.shadows.request_log = log

    use_log(1000)
    session = aiohttp.ClientSession()
    app.state.pool.bind(AiohttpControl(session))
    gateway.forwarder.upstream.bind(session)
    await app.state.pool.start()
    assert all(replica.healthy and not replica.adapters for replica in app.state.pool.replicas)
    try:
        yield app, spans, seen, use_log
    finally:
        await gateway.shadows.close()
        await asyncio.to_thread(gateway.tracer.shutdown)
        await session.close()
        await server.close()


async def _post(app, model: str, headers: dict | None = None) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        return await client.post("/v1/chat/completions", headers=headers or {}, json={"model": model, **CHAT})


async def _exported(app) -> None:
    """Every shadow done, then every span flushed to the receiver."""
    shadows = app.state.gateway.shadows
    for _ in range(500):
        if not any(shadows.in_flight.values()):
            break
        await asyncio.sleep(0.01)
    assert not any(shadows.in_flight.values())
    assert await asyncio.to_thread(app.state.gateway.tracer.provider.force_flush)


def _events(span) -> dict:
    return {
        event.name: {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in event.attributes}
        for event in span.events
    }


async def test_shadow_copy_and_on_demand_adapter_loads_are_spans_in_the_request_trace(stub_gateway):
    app, spans, seen, _ = stub_gateway
    # Two requests at once: the first to need adapter a1 on the (only) replica starts its load, the other waits on it.
    first, second = await asyncio.gather(
        _post(app, "shadowed", {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}), _post(app, "shadowed")
    )
    assert first.status_code == second.status_code == 200
    await _exported(app)

    requests = [s for s in spans if s.name == "chat shadowed"]
    assert len(requests) == 2
    by_id = {s.span_id: s for s in spans}
    attempts = [s for s in spans if s.name == "loragate.upstream v1"]
    shadows = [s for s in spans if s.name == "loragate.shadow v2"]
    loads = [s for s in spans if s.name == "loragate.adapter_load"]
    assert len(attempts) == 2 and len(shadows) == 2
    for request in requests:
        # The shadow: a child of its request span (in its trace), ending after it (sent once the primary answered).
        shadow = next(s for s in shadows if s.parent_span_id == request.span_id)
        assert shadow.trace_id == request.trace_id
        assert shadow.end_time_unix_nano > request.end_time_unix_nano
        attrs = _attrs(shadow)
        assert attrs["loragate.route"] == "shadowed" and attrs["loragate.variant"] == "v2"
        assert attrs["loragate.shadow.outcome"] == "answered" and attrs["http.response.status_code"] == 200
        assert attrs["gen_ai.usage.input_tokens"] == 7 and attrs["gen_ai.usage.output_tokens"] == 4
        assert shadow.kind == shadow.SPAN_KIND_CLIENT and shadow.status.code != 2
        assert "loragate.shadow.sent" in _events(shadow)
        assert _events(shadow)["loragate.requestlog"] == {
            "loragate.requestlog.role": "shadow",
            "loragate.requestlog.queued": True,
        }
        # The request log hand-off: an event on the request span.
        assert _events(request)["loragate.requestlog"] == {
            "loragate.requestlog.role": "primary",
            "loragate.requestlog.queued": True,
        }
    assert requests[0].trace_id.hex() == CLIENT_TRACE or requests[1].trace_id.hex() == CLIENT_TRACE
    # The engine got each call's own traceparent: the attempt's for the primary, the shadow's for the copy.
    sent = {tp[:-3]: model for model, tp in seen if tp is not None}  # less the flags (sampled, random trace id)
    for span in (*attempts, *shadows):
        assert sent[f"00-{span.trace_id.hex()}-{span.span_id.hex()}"] == ("a1" if span in attempts else "a2")
    assert len(seen) == 4

    # Adapter a1: one load, triggered by one attempt and waited on by the other, each wait a child of its attempt.
    primary_loads = [s for s in loads if _attrs(s)["loragate.adapter"] == "a1"]
    assert sorted(by_id[s.parent_span_id].name for s in primary_loads) == ["loragate.upstream v1"] * 2
    assert sorted(_attrs(s)["loragate.adapter_load.triggered"] for s in primary_loads) == [False, True]
    for load in primary_loads:
        attrs = _attrs(load)
        assert attrs["loragate.adapter_load.outcome"] == "success"
        assert attrs["loragate.replica"] == _attrs(by_id[load.parent_span_id])["loragate.replica"]
        assert load.trace_id == by_id[load.parent_span_id].trace_id and load.status.code != 2
    # Adapter a2 was loaded for the shadows: the load is under a shadow span (the second shadow may find it loaded).
    shadow_loads = [s for s in loads if _attrs(s)["loragate.adapter"] == "a2"]
    assert shadow_loads and all(by_id[s.parent_span_id].name == "loragate.shadow v2" for s in shadow_loads)
    assert any(_attrs(s)["loragate.adapter_load.triggered"] for s in shadow_loads)
    assert len(loads) == len(primary_loads) + len(shadow_loads)


async def test_a_failed_adapter_load_is_an_error_span_under_its_attempt(stub_gateway):
    app, spans, _, _ = stub_gateway
    response = await _post(app, "broken")  # the stub answers 404 to loading a path with "missing" in it
    assert response.status_code == 200 and response.headers["x-loragate-fallback"] == "adapter_unavailable"
    await _exported(app)
    load = next(s for s in spans if s.name == "loragate.adapter_load")
    attempt = next(s for s in spans if s.span_id == load.parent_span_id)
    assert attempt.name == "loragate.upstream bad" and _attrs(attempt)["error.type"] == "adapter_unavailable"
    assert [s.name for s in spans if s.name.startswith("loragate.upstream")] == [  # the base model answered
        "loragate.upstream bad",
        "loragate.upstream base",
    ]
    attrs = _attrs(load)
    assert attrs["loragate.adapter"] == "b1" and attrs["loragate.adapter_load.triggered"] is True
    assert attrs["loragate.adapter_load.outcome"] == "failed" and attrs["error.type"] == "failed"
    assert load.status.code == 2  # ERROR


async def test_a_shadow_whose_adapter_will_not_load_is_a_failed_span_and_the_primary_is_untouched(stub_gateway):
    app, spans, seen, _ = stub_gateway
    response = await _post(app, "badshadow")
    assert response.status_code == 200 and "x-loragate-fallback" not in response.headers
    await _exported(app)
    request = next(s for s in spans if s.name == "chat badshadow")
    shadow = next(s for s in spans if s.name == "loragate.shadow bad")
    load = next(s for s in spans if s.name == "loragate.adapter_load" and _attrs(s)["loragate.adapter"] == "b2")
    assert shadow.parent_span_id == request.span_id and load.parent_span_id == shadow.span_id
    attrs = _attrs(shadow)
    assert attrs["loragate.shadow.outcome"] == "failed" and attrs["error.type"] == "adapter_unavailable"
    assert "http.response.status_code" not in attrs and shadow.status.code == 2  # ERROR
    assert _attrs(load)["loragate.adapter_load.outcome"] == "failed"
    assert request.status.code != 2 and [model for model, _ in seen] == ["a1"]  # no copy reached the engine


async def test_a_dropped_shadow_and_a_dropped_log_record_say_so(stub_gateway):
    app, spans, seen, use_log = stub_gateway
    use_log(queue_size=1)  # the log is never started: the first record fills its queue, the next one is dropped
    for _ in range(2):
        response = await _post(app, "shadowed:v2")  # pinned to the shadow variant itself: no copy is sent
        assert response.status_code == 200
    await _exported(app)
    requests = [s for s in spans if s.name == "chat shadowed:v2"]
    assert [_events(r)["loragate.requestlog"]["loragate.requestlog.queued"] for r in requests] == [True, False]
    shadows = [s for s in spans if s.name == "loragate.shadow v2"]
    assert sorted(s.parent_span_id for s in shadows) == sorted(r.span_id for r in requests)
    for shadow in shadows:
        assert _attrs(shadow)["loragate.shadow.outcome"] == "same_variant"
        assert shadow.status.code != 2 and "http.response.status_code" not in _attrs(shadow)
    assert [model for model, _ in seen] == ["a2", "a2"]  # the primaries only


@pytest.fixture
def sampled_out(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")


async def test_sampled_out_shadows_and_loads_export_nothing_and_still_pass_a_traceparent(sampled_out, stub_gateway):
    app, spans, seen, _ = stub_gateway
    response = await _post(app, "shadowed")
    assert response.status_code == 200
    await _exported(app)
    assert spans == []
    assert sorted(model for model, _ in seen) == ["a1", "a2"]  # the primary and its shadow copy, adapters loaded
    assert all(tp is not None and int(tp[-2:], 16) & 1 == 0 for _, tp in seen)  # the sampled flag is off

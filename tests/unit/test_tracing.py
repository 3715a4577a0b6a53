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
        return Answer(orjson.dumps({"id": "c1", "model": model, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 5}}))


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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
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
            "/v1/chat/completions", headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                                             "x-loragate-priority": "critical"},
            json={"model": "chain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
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
        response = await client.post("/v1/chat/completions",
                                     json={"model": "chain", "messages": [{"role": "user", "content": "hi"}]})
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
                response = await open_upstream(client, url, b"{}", request_id="r1", is_adapter=False,
                                               traceparent=sent)
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
        response = await client.post("/v1/chat/completions",
                                     json={"model": "chain", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    await asyncio.to_thread(app.state.gateway.tracer.shutdown)
    assert spans == []
    assert len(replicas.traceparents) == 2
    assert all(int(tp[-2:], 16) & 1 == 0 for tp in replicas.traceparents)  # the sampled flag is off

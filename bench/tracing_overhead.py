"""What OpenTelemetry traces cost a completion, in-process, in ONE run: off (the default) vs on.

The served app (``create_app``, the whole gateway: auth, routing, fallback loop, accounting) is driven
over ASGI in-process (no sockets) with a STUB replica call that answers at once and a STUB request log
(a sink that counts the records handed to it), so the figures are the gateway's own CPU per request and a
ratio here is an upper bound of the ratio on a real request:

  off   no OTEL_* variables: ``Gateway.tracer`` is None, each traced step is one ``is None`` check
  on    OTEL_EXPORTER_OTLP_ENDPOINT set: request, routing and attempt spans and the request log hand-off
        event from the real SDK, batched and exported by the real OTLP/HTTP exporter to a loopback receiver
        thread in this process (its CPU, decoding the protobuf, is counted too: an over-estimate of the
        gateway's share)

Two routes, each off and on: ``plain`` (one variant) and ``shadowed`` (a shadow copy of every request,
100 %: the copy's own call, accounting and log record, and with tracing on its span and hand-off event;
a round waits for the copies to finish before its clock stops).

CPU per request is process CPU time (all threads, so the exporter's batch thread counts) over the
requests of a round, the round's spans flushed to the receiver before the clock stops; targets alternate
within a round, ratios to ``off`` of the same route per round, medians over rounds.
The cost of the check itself, what ``off`` adds over the code before tracing, is timed apart in ns.
``handoff``: the request log hand-off traced as an event on the request span vs as a child span (the
choice service/tracing.py made), each timed as request spans with and without it, exported and flushed.

Run:  .venv/bin/python bench/tracing_overhead.py [--requests 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BODIES = {
    route: orjson.dumps({"model": route, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16})
    for route in ("plain", "shadowed")
}
ANSWER = orjson.dumps(
    {
        "id": "c1",
        "model": "a1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2},
    }
)
ROUTES = """\
routes:
  plain:
    variants: [{name: v1, adapter: a1, path: /a/a1, weight: 1}]
  shadowed:
    variants: [{name: v1, adapter: a1, path: /a/a1, weight: 1}, {name: v2, adapter: a2, path: /a/a2, weight: 0}]
    shadow: {variant: v2, percent: 100, max_in_flight: 1000}
"""
OFF_CHECKS = 9  # `is None` checks a plain request passes with tracing off (the request log on); +4 per shadow copy
REPLICAS = ["http://10.0.0.1:8000"]


class Answer:
    status = 200

    async def read(self) -> bytes:
        return ANSWER

    def release(self) -> None:
        pass


async def stub_replica(url, body, *, request_id, is_adapter, timeout=None, api_key=None, traceparent=None):
    return Answer()


class StubRequestLog:
    """A STUB request log: counts what it is handed (the real sink's queue is not what is measured here)."""

    def __init__(self) -> None:
        self.records = 0

    def record(self, record) -> bool:
        self.records += 1
        return True


def receiver() -> tuple[str, http.server.ThreadingHTTPServer]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

            ExportTraceServiceRequest().ParseFromString(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def build(routes: Path, endpoint: str | None):
    from loragate.service.app import create_app
    from loragate.service.metrics import Metrics
    from loragate.service.settings import Settings

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        os.environ.pop(name, None)
    if endpoint:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = "1000000"  # no span dropped: all of them exported and counted
    app = create_app(Settings(routes_file=routes, upstreams=REPLICAS), Metrics(), upstream=stub_replica)
    gateway = app.state.gateway
    gateway.accounting.request_log = gateway.shadows.request_log = StubRequestLog()
    for replica in app.state.pool.replicas:
        replica.healthy = True
        replica.adapters = {"a1", "a2"}
    assert (app.state.gateway.tracer is None) == (endpoint is None)
    return app


async def one(app, body: bytes) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("gateway", 80),
    }
    sent = False
    status = 0

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def round_cpu(app, route: str, requests: int) -> float:
    gateway = app.state.gateway
    body = BODIES[route]
    logged = gateway.accounting.request_log.records
    shadows = gateway.shadows
    start = time.process_time()
    for _ in range(requests):
        assert await one(app, body) == 200
        while any(shadows.in_flight.values()):  # the copy answered and accounted for (a served loop interleaves)
            await asyncio.sleep(0)
    tracer = gateway.tracer
    if tracer is not None:  # every span of the round exported (and its CPU counted) before the clock stops
        tracer.provider.force_flush()
    cpu = (time.process_time() - start) / requests
    assert gateway.accounting.request_log.records - logged == requests * (
        2 if route == "shadowed" else 1
    )  # none dropped
    return cpu


def handoff_costs(tracer, count: int, rounds: int) -> dict:
    """µs of CPU per request span for the log hand-off as an event on it or as a child span (exported)."""

    def timed(kind: str) -> float:
        start = time.process_time()
        for _ in range(count):
            span = tracer.request_span({}, "chat/completions")
            if kind == "event":
                tracer.logged(span, "primary", True)
            elif kind == "span":
                child = tracer.child(span, "loragate.requestlog")
                child.set_attribute("loragate.requestlog.role", "primary")
                child.set_attribute("loragate.requestlog.queued", True)
                tracer.end(child)
            tracer.end(span, 200)
        tracer.provider.force_flush()
        return (time.process_time() - start) / count * 1e6

    timed("none")  # warm up
    added: dict[str, list[float]] = {"event": [], "span": []}
    for index in range(rounds):
        kinds = ["none", "event", "span"] if index % 2 == 0 else ["span", "event", "none"]
        cpu = {kind: timed(kind) for kind in kinds}
        for kind in added:
            added[kind].append(cpu[kind] - cpu["none"])
    event, span = (statistics.median(added[kind]) for kind in ("event", "span"))
    return {"event_us": round(event, 2), "child_span_us": round(span, 2), "span_to_event": round(span / event, 1)}


async def main(requests: int, rounds: int) -> dict:
    routes = Path(tempfile.mkdtemp()) / "routes.yaml"
    routes.write_text(ROUTES)
    endpoint, server = receiver()
    apps = {"off": build(routes, None), "on": build(routes, endpoint)}
    cells = [(route, name) for route in ("plain", "shadowed") for name in apps]
    for route, name in cells:  # warm up
        await round_cpu(apps[name], route, 200)
    per_round: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
    ratios: dict[str, list[float]] = {"plain": [], "shadowed": []}
    for index in range(rounds):
        order = cells if index % 2 == 0 else list(reversed(cells))
        cpu = {}
        for cell in order:
            cpu[cell] = await round_cpu(apps[cell[1]], cell[0], requests)
            per_round[cell].append(cpu[cell])
        for route in ratios:
            ratios[route].append(cpu[route, "on"] / cpu[route, "off"])
    tracer = apps["on"].state.gateway.tracer
    handoff = handoff_costs(tracer, requests, rounds)
    tracer.shutdown()
    server.shutdown()
    holder = type("Gateway", (), {"tracer": None})()
    check_ns = min(timeit.repeat("g.tracer is None", globals={"g": holder}, number=1_000_000, repeat=5)) * 1e3
    medians = {cell: statistics.median(v) * 1e6 for cell, v in per_round.items()}
    on_plain = medians["plain", "on"]
    return {
        "bench": "tracing_overhead",
        "python": platform.python_version(),
        "requests": requests,
        "rounds": rounds,
        "stubs": "replica call and request log are stubs (in-process); SDK, exporter and receiver are real",
        "cpu_us_per_request": {f"{route}_{name}": round(us, 1) for (route, name), us in medians.items()},
        "ratio_on_to_off": {route: round(statistics.median(v), 3) for route, v in ratios.items()},
        "shadow_copy_us": {name: round(medians["shadowed", name] - medians["plain", name], 1) for name in apps},
        "off_check_ns": round(check_ns, 1),
        "off_checks_per_request": OFF_CHECKS,
        "off_share_of_request": f"{OFF_CHECKS * check_ns / (medians['plain', 'off'] * 1e3):.5%}",
        "requestlog_handoff": {
            **handoff,
            "event_share_of_traced_request": f"{handoff['event_us'] / on_plain:.2%}",
            "span_share_of_traced_request": f"{handoff['child_span_us'] / on_plain:.2%}",
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tracing_overhead.json")
    args = parser.parse_args()
    result = asyncio.run(main(args.requests, args.rounds))
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")

"""What OpenTelemetry traces cost a completion, in-process, in ONE run: off (the default) vs on.

The served app (``create_app``, the whole gateway: auth, routing, fallback loop, accounting) is driven
over ASGI in-process (no sockets) with a STUB replica call that answers at once, so the figures are the
gateway's own CPU per request and a ratio here is an upper bound of the ratio on a real request:

  off   no OTEL_* variables: ``Gateway.tracer`` is None, each traced step is one ``is None`` check
  on    OTEL_EXPORTER_OTLP_ENDPOINT set: request, routing and attempt spans from the real SDK, batched and
        exported by the real OTLP/HTTP exporter to a loopback receiver thread in this process (its CPU,
        decoding the protobuf, is counted too: an over-estimate of the gateway's share)

CPU per request is process CPU time (all threads, so the exporter's batch thread counts) over the
requests of a round, the round's spans flushed to the receiver before the clock stops; targets alternate
within a round, ratios to ``off`` per round, medians over rounds.
The cost of the check itself, what ``off`` adds over the code before tracing, is timed apart in ns.

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

BODY = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16})
ANSWER = orjson.dumps({"id": "c1", "model": "a1", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
ROUTES = "routes:\n  bench:\n    variants: [{name: v1, adapter: a1, path: /a/a1, weight: 1}]\n"
REPLICAS = ["http://10.0.0.1:8000"]


class Answer:
    status = 200

    async def read(self) -> bytes:
        return ANSWER

    def release(self) -> None:
        pass


async def stub_replica(url, body, *, request_id, is_adapter, timeout=None, api_key=None, traceparent=None):
    return Answer()


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
    for replica in app.state.pool.replicas:
        replica.healthy = True
        replica.adapters = {"a1"}
    assert (app.state.gateway.tracer is None) == (endpoint is None)
    return app


async def one(app) -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(BODY)).encode())],
             "client": ("127.0.0.1", 1), "server": ("gateway", 80)}
    sent = False
    status = 0

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def round_cpu(app, requests: int) -> float:
    start = time.process_time()
    for _ in range(requests):
        assert await one(app) == 200
    tracer = app.state.gateway.tracer
    if tracer is not None:  # every span of the round exported (and its CPU counted) before the clock stops
        tracer.provider.force_flush()
    return (time.process_time() - start) / requests


async def main(requests: int, rounds: int) -> dict:
    routes = Path(tempfile.mkdtemp()) / "routes.yaml"
    routes.write_text(ROUTES)
    endpoint, server = receiver()
    apps = {"off": build(routes, None), "on": build(routes, endpoint)}
    for app in apps.values():  # warm up
        await round_cpu(app, 200)
    per_round: dict[str, list[float]] = {name: [] for name in apps}
    ratios = []
    for index in range(rounds):
        order = list(apps) if index % 2 == 0 else list(reversed(apps))
        cpu = {}
        for name in order:
            cpu[name] = await round_cpu(apps[name], requests)
            per_round[name].append(cpu[name])
        ratios.append(cpu["on"] / cpu["off"])
    apps["on"].state.gateway.tracer.shutdown()
    server.shutdown()
    holder = type("Gateway", (), {"tracer": None})()
    check_ns = min(timeit.repeat("g.tracer is None", globals={"g": holder}, number=1_000_000, repeat=5)) * 1e3
    off_us = statistics.median(per_round["off"]) * 1e6
    return {
        "bench": "tracing_overhead", "python": platform.python_version(), "requests": requests, "rounds": rounds,
        "cpu_us_per_request": {name: round(statistics.median(v) * 1e6, 1) for name, v in per_round.items()},
        "ratio_on_to_off": round(statistics.median(ratios), 3),
        "off_check_ns": round(check_ns, 1),
        "off_checks_per_request": 8,
        "off_share_of_request": f"{8 * check_ns / (off_us * 1e3):.5%}",
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

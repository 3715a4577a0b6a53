"""What honouring user middleware costs completions: the served front's dispatch, in-process, in ONE run.

The served app (service/api/openai.py ``CompletionsFirst``) answers completion POSTs without FastAPI
unless the FastAPI app has user middleware; then it defers to the app, so the middleware runs. This
bench drives the front over ASGI, in-process (no sockets: only the dispatch differs between targets),
with a STUB gateway whose ``handle`` reads the body and answers at once, so the figures are the
front's own cost per request and a ratio here is an upper bound of the ratio on a real request
(whose routing, upstream call and accounting come on top, the same for every target):

  before       the front as it was: completions straight to the gateway, no middleware check
  shortcut     the front now, no user middleware: the check, then straight to the gateway
  asgi_mw      the front now, one no-op pure-ASGI middleware added: through FastAPI and the middleware
  http_mw      the front now, one no-op ``@app.middleware("http")`` (BaseHTTPMiddleware)

Two answers: ``json`` (one body) and ``sse`` (16 events, each its own body message, as the gateway
relays a stream). Targets run back to back in a rotating order within a round; ratios to ``before``
are taken within a round, medians over rounds. The verdict: shortcut/before within 1.02 (the check is
one attribute read and a list's truth value; timed apart too, in ns).

Run:  .venv/bin/python bench/middleware_overhead.py [--requests 2000] [--rounds 25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_RATIO = 1.02
BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}).encode()
EVENTS = [b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'] * 15 + [b"data: [DONE]\n\n"]


class StubGateway:
    """Stands in for service.gateway.Gateway: reads the body, answers JSON or a 16-event stream."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream

    async def handle(self, request, endpoint: str):
        from starlette.responses import Response, StreamingResponse

        await request.body()
        if self.stream:

            async def events():
                for event in EVENTS:
                    yield event

            return StreamingResponse(events(), media_type="text/event-stream")
        return Response(b'{"id":"c1","choices":[]}', media_type="application/json")


def build(target: str, stream: bool):
    from fastapi import FastAPI
    from starlette.types import Receive, Scope, Send

    from loragate.service.api.openai import COMPLETION_PATHS, CompletionsFirst, openai_router
    from loragate.service.errors import internal_error_response

    class Before(CompletionsFirst):
        """The front before user middleware was honoured (as at 16f69c0)."""

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            endpoint = COMPLETION_PATHS.get(scope["path"]) if scope["type"] == "http" else None
            if endpoint is None or scope["method"] != "POST":
                await self.app(scope, receive, send)
                return
            try:
                response = await self.gateway.handle(Request(scope, receive), endpoint)
            except Exception as exc:
                response = internal_error_response(exc)
            await response(scope, receive, send)

    from starlette.requests import Request

    gateway = StubGateway(stream)
    app = FastAPI()
    app.include_router(openai_router(gateway, None))  # type: ignore[arg-type]  # /v1/models unused here
    if target == "asgi_mw":

        class NoOp:
            def __init__(self, app) -> None:
                self.app = app

            async def __call__(self, scope, receive, send) -> None:
                await self.app(scope, receive, send)

        app.add_middleware(NoOp)
    elif target == "http_mw":

        @app.middleware("http")
        async def no_op(request, call_next):
            return await call_next(request)

    return (Before if target == "before" else CompletionsFirst)(app, gateway)  # type: ignore[arg-type]


async def drive(front, requests: int) -> float:
    """CPU seconds per request: POST /v1/chat/completions through the front, receive/send in memory."""
    scope_base = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 1),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
    }
    body_message = {"type": "http.request", "body": BODY, "more_body": False}
    statuses: list[int] = []
    received = [0]

    async def receive():
        received[0] += 1
        if received[0] == 1:
            return body_message
        await asyncio.Event().wait()  # the client stays connected: a disconnect listener waits, as on a socket

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = time.process_time()  # CPU time: the neighbours' load on this VM does not count
    for _ in range(requests):
        received[0] = 0
        await front(dict(scope_base), receive, send)
    elapsed = time.process_time() - started
    assert statuses == [200] * requests, set(statuses)
    return elapsed / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2_000, help="requests per target per round")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/middleware_overhead.json")
    args = parser.parse_args()
    import uvloop

    targets = ["before", "shortcut", "asgi_mw", "http_mw"]
    result: dict = {
        "what": "the served front's cost per completion request, in-process ASGI, stub gateway",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "requests_per_target": args.requests,
        "cells": {},
    }
    loop = uvloop.new_event_loop()
    for answer in ("json", "sse"):
        fronts = {t: build(t, stream=answer == "sse") for t in targets}
        for front in fronts.values():
            loop.run_until_complete(drive(front, 500))  # warm-up: imports, FastAPI's middleware stack
        rounds = []
        for r in range(args.rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            rounds.append({t: loop.run_until_complete(drive(fronts[t], args.requests)) * 1e6 for t in order})
        cell = {
            t: {
                "us_per_req": statistics.median(x[t] for x in rounds),
                "ratio_to_before": statistics.median(x[t] / x["before"] for x in rounds),
                "ratio_of_minimums": min(x[t] for x in rounds) / min(x["before"] for x in rounds),
            }
            for t in targets
        }
        result["cells"][answer] = {"targets": cell, "rounds_us": rounds}
        print(
            f"{answer}: "
            + ", ".join(
                f"{t} {c['us_per_req']:.1f} us ({c['ratio_to_before']:.3f}x, min/min {c['ratio_of_minimums']:.3f})"
                for t, c in cell.items()
            ),
            flush=True,
        )
    loop.close()

    front = build("shortcut", stream=False)
    check_ns = min(timeit.repeat(lambda: bool(front.app.user_middleware), number=200_000, repeat=5)) / 200_000 * 1e9
    result["check_ns"] = check_ns
    ratios = [result["cells"][a]["targets"]["shortcut"]["ratio_to_before"] for a in ("json", "sse")]
    result["verdict"] = {
        "shortcut_over_before_max": max(ratios),
        "target": TARGET_RATIO,
        "pass": max(ratios) <= TARGET_RATIO,
    }
    print(
        f"the check alone: {check_ns:.0f} ns (a lambda call included); shortcut/before max {max(ratios):.3f} "
        f"(target <= {TARGET_RATIO}): {'PASS' if result['verdict']['pass'] else 'FAIL'}"
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

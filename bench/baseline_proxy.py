"""The overhead benchmark's baseline: a zero-feature reverse proxy on the same stack as the gateway.

FastAPI + one aiohttp ClientSession; forwards the body bytes to the upstream and the
answer back (SSE relayed chunk by chunk via StreamingResponse). No routing, metrics,
parsing or usage counting: what any FastAPI + aiohttp proxy pays at the least.

Run: BASELINE_UPSTREAM=http://127.0.0.1:18100 uvicorn bench.baseline_proxy:app \
       --loop uvloop --http httptools --no-access-log --port 18200
"""

from __future__ import annotations

import contextlib
import os

import aiohttp
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

UPSTREAM = os.environ.get("BASELINE_UPSTREAM", "http://127.0.0.1:18100").rstrip("/")
state: dict[str, aiohttp.ClientSession] = {}


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI):
    state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), skip_auto_headers=("User-Agent",))
    yield
    await state["session"].close()


app = FastAPI(lifespan=lifespan)


async def _relay(upstream: aiohttp.ClientResponse):
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    finally:
        upstream.release()


@app.post("/v1/chat/completions")
@app.post("/v1/completions")
async def forward(request: Request) -> Response:
    upstream = await state["session"].post(
        UPSTREAM + request.url.path, data=await request.body(), headers={"content-type": "application/json"}
    )
    media_type = upstream.headers.get("content-type", "application/json")
    if media_type.startswith("text/event-stream"):
        return StreamingResponse(_relay(upstream), status_code=upstream.status, media_type=media_type)
    body = await upstream.read()
    upstream.release()
    return Response(body, status_code=upstream.status, media_type=media_type)


@app.get("/health")
async def health() -> Response:
    return Response(b"")

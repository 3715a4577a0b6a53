"""A STUB vLLM engine that slows down as it fills up. Not vLLM: a load shape for scheduling tests.

Each request takes ``--base-ms`` plus ``--per-request-ms`` for every other request running with it
(a decode step slows with the batch); beyond ``--max-running`` requests wait for a place. It speaks
the parts of vLLM's API the gateway uses: /health, /v1/models (adapters with ``parent``), load and
unload of adapters, chat/completions, and /metrics with vLLM's series (num_requests_running/waiting,
kv_cache_usage_perc, lora_requests_info) unless ``--no-metrics``. /stub/stats counts requests served
per model name.

Run: python tests/stub_engine.py --port 18200 [--base-ms 20 --per-request-ms 5 --max-running 8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import orjson
from aiohttp import web

if __name__ == "__main__":  # run as a script (tests/processes.py): the repository root, for the tests package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import stub_vllm  # noqa: E402


def make_app(
    base_ms: float, per_request_ms: float, max_running: int, max_lora: int, metrics: bool, adapters: list[str]
) -> web.Application:
    loaded: dict[str, str] = {name: f"/static/{name}" for name in adapters}
    state = {"running": 0, "waiting": 0, "served": {}, "loads": 0, "unloads": 0}
    running_adapters: dict[str, int] = {}
    room = asyncio.Condition()

    async def models(_request: web.Request) -> web.Response:
        return stub_vllm.models(loaded, base_root="/model")

    async def load(request: web.Request) -> web.Response:
        body = await request.json()
        state["loads"] += 1
        await asyncio.sleep(0.05)  # reading it from disk
        if body["lora_name"] in loaded:
            return stub_vllm.already_loaded()
        loaded[body["lora_name"]] = body["lora_path"]
        return web.Response(text="Success")

    async def unload(request: web.Request) -> web.Response:
        body = await request.json()
        if loaded.pop(body["lora_name"], None) is None:
            return web.json_response({"error": {"message": "not found", "code": 404}}, status=404)
        state["unloads"] += 1
        return web.Response(text="Success")

    async def complete(request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        model = payload.get("model", "base")
        if model != "base" and model not in loaded:
            return web.json_response(
                {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError", "code": 404}},
                status=404,
            )
        async with room:
            state["waiting"] += 1
            await room.wait_for(lambda: state["running"] < max_running)
            state["waiting"] -= 1
            state["running"] += 1
        running_adapters[model] = running_adapters.get(model, 0) + 1
        try:
            await asyncio.sleep((base_ms + per_request_ms * (state["running"] - 1)) / 1000)
        finally:
            running_adapters[model] -= 1
            if not running_adapters[model]:
                del running_adapters[model]
            async with room:
                state["running"] -= 1
                room.notify()
        state["served"][model] = state["served"].get(model, 0) + 1
        body = {
            "id": "stub",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def metrics_handler(_request: web.Request) -> web.Response:
        names = ",".join(sorted(a for a in running_adapters if a != "base"))
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="base"}} {state["running"]}.0\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="base"}} {state["waiting"]}.0\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="base"}} {state["running"] / max_running}\n'
            "# TYPE vllm:lora_requests_info gauge\n"
            f'vllm:lora_requests_info{{max_lora="{max_lora}",running_lora_adapters="{names}",'
            f'waiting_lora_adapters=""}} {time.time()}\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response({**state, "adapters": sorted(loaded)})

    app = stub_vllm.application(models=models, stats=stats, load=load, complete=complete)
    if metrics:
        app.router.add_get("/metrics", metrics_handler)
    app.router.add_post("/v1/unload_lora_adapter", unload)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-ms", type=float, default=20.0)
    parser.add_argument("--per-request-ms", type=float, default=5.0)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--max-lora", type=int, default=4)
    parser.add_argument("--no-metrics", action="store_true")
    parser.add_argument("--adapter", action="append", default=[], help="registered at start (like --lora-modules)")
    args = parser.parse_args()
    web.run_app(
        make_app(args.base_ms, args.per_request_ms, args.max_running, args.max_lora, not args.no_metrics, args.adapter),
        host="127.0.0.1",
        port=args.port,
        print=None,
    )


if __name__ == "__main__":
    main()

"""A STUB upstream that speaks vLLM's OpenAI API in microseconds. Not vLLM.

Used for fault injection (faults vLLM cannot be made to produce on demand) and
for the overhead benchmark (so that the proxies are what is measured).
The requested model name selects the behaviour, so a route's variant picks a
fault by its adapter name:

  fail-500*     answers 500            fail-429   answers 429
  slow-<ms>     waits <ms> before the headers
  reset         closes the connection without an answer
  malformed     answers 200 with a body that is not JSON
  hang          sends the headers and half a body, then nothing, forever
  break-stream  streams two chunks, then drops the connection
  error-stream  streams two chunks, then an error event (a 429 mid-stream), then closes
  stall-stream  streams two chunks, then goes silent with the connection open
  slowfirst-<ms>  streams, but the first chunk comes after <ms>
  drip-<ms>     streams with <ms> between chunks (for graceful-shutdown tests)
  bulk*         streams all its chunks after the first in one write (an upstream faster than the gateway's reader)
  anything else answers normally (stream: ``--chunks`` content chunks + usage)

A text completion asking ``logprobs`` (the gateway's probe after each adapter load) is always answered, with
logprobs that differ between an adapter and the base model: every adapter here is applied.

Run: python tests/stub_upstream.py --port 18100 [--chunks 16]
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

PROMPT_TOKENS = 7


def _completion(model: str, chat: bool, tokens: int) -> bytes:
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": "ok " * tokens}, "finish_reason": "length"}
        if chat
        else {"index": 0, "text": "ok " * tokens, "finish_reason": "length"}
    )
    return orjson.dumps(
        {
            "id": "stub-1",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": tokens,
                "total_tokens": PROMPT_TOKENS + tokens,
            },
        }
    )


def _probe_answer(model: str, tokens: int) -> bytes:
    """A text completion with the chosen tokens' logprobs; an adapter's differ from the base model's (applied)."""
    shift = 0.0 if model == "base" else 0.5
    logprobs = {"tokens": ["ok"] * tokens, "token_logprobs": [-1.0 + shift] * tokens}
    return orjson.dumps(
        {
            "id": "stub-1",
            "object": "text_completion",
            "model": model,
            "choices": [{"index": 0, "text": "ok" * tokens, "logprobs": logprobs}],
        }
    )


def _chunk(model: str, chat: bool, text: str | None, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    choice["finish_reason"] = finish
    body = {
        "id": "stub-1",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 0,
        "model": model,
        "choices": [choice],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _usage_chunk(model: str, tokens: int) -> bytes:
    body = {
        "id": "stub-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": tokens, "total_tokens": PROMPT_TOKENS + tokens},
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def make_app(chunks: int = 16) -> web.Application:
    loaded: dict[str, None] = {}  # the adapters, with no root (the path) listed
    stats = {"requests": 0, "loads": 0, "last_authorization": None, "last_model": None}

    async def models(_request: web.Request) -> web.Response:
        return stub_vllm.models(loaded)

    async def load(request: web.Request) -> web.Response:
        body = await request.json()
        stats["loads"] += 1
        if "missing" in body.get("lora_path", ""):
            return web.json_response({"error": {"message": "not found", "code": 404}}, status=404)
        if body["lora_name"] in loaded:
            return stub_vllm.already_loaded()
        loaded[body["lora_name"]] = None
        return web.Response(text="Success")

    async def complete(request: web.Request) -> web.StreamResponse:
        payload = orjson.loads(await request.read())
        model = payload.get("model", "base")
        if payload.get("logprobs") and not request.path.endswith("chat/completions"):  # a probe: not counted
            return web.Response(
                body=_probe_answer(model, int(payload.get("max_tokens") or 1)), content_type="application/json"
            )
        stats["requests"] += 1
        stats["last_authorization"] = request.headers.get("authorization")
        stats["last_model"] = model
        chat = request.path.endswith("chat/completions")
        tokens = int(payload.get("max_tokens") or chunks)
        if model.startswith("fail-500"):
            return web.json_response({"error": {"message": "stub failure", "code": 500}}, status=500)
        if model == "fail-429":
            return web.json_response({"error": {"message": "stub busy", "code": 429}}, status=429)
        if model.startswith("slow-"):
            await asyncio.sleep(int(model[5:]) / 1000)
        if model == "reset":
            request.transport.close()
            return web.Response()
        if model == "malformed":
            return web.Response(body=b'{"choices": [', content_type="application/json")
        if model == "hang":
            response = web.StreamResponse(headers={"content-type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"id": "stub-1", ')
            await asyncio.sleep(3600)
        if not payload.get("stream"):
            return web.Response(body=_completion(model, chat, tokens), content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        if model.startswith("slowfirst-"):
            await asyncio.sleep(int(model[10:]) / 1000)
        if model.startswith("bulk"):
            await response.write(_chunk(model, chat, "t0 ", None))
            await response.write(
                b"".join(
                    _chunk(model, chat, f"t{index} ", "length" if index == tokens - 1 else None)
                    for index in range(1, tokens)
                )
                + b"data: [DONE]\n\n"
            )
            await response.write_eof()
            return response
        for index in range(tokens):
            if index == 2 and model == "break-stream":
                request.transport.close()
                return response
            if index == 2 and model == "error-stream":
                await response.write(
                    b'data: {"error": {"message": "rate limited", "type": "RateLimitError", "code": 429}}\n\n'
                )
                request.transport.close()
                return response
            if index == 2 and model == "stall-stream":
                await asyncio.sleep(3600)
            if model.startswith("drip-"):
                await asyncio.sleep(int(model[5:]) / 1000)
            finish = "length" if index == tokens - 1 else None
            await response.write(_chunk(model, chat, f"t{index} ", finish))
        if (payload.get("stream_options") or {}).get("include_usage"):
            await response.write(_usage_chunk(model, tokens))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def stats_handler(_request: web.Request) -> web.Response:
        return web.json_response(stats)

    return stub_vllm.application(models=models, stats=stats_handler, load=load, complete=complete)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument("--chunks", type=int, default=16)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(args.chunks), host=args.host, port=args.port, access_log=None, print=None, shutdown_timeout=1)


if __name__ == "__main__":
    main()

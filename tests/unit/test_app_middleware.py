"""Middleware a user adds to the FastAPI app (``create_app(...).app``) runs for completions too.

Completions normally skip FastAPI (service/api/openai.py CompletionsFirst); once the app has user
middleware, they go through it. The app is the served one, driven over ASGI with a scripted upstream
(tests/unit/test_gateway_core.py).
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.unit.test_gateway_core import CHAT, Scripted, answer, gateway, stream, stream_events

__all__ = ["gateway"]  # the fixture, used below


def fastapi_app(client):
    """The FastAPI app inside the served front the fixture's client talks to (create_app(...).app)."""
    return client._transport.app.app


class CountingMiddleware:
    """Pure ASGI middleware: counts the requests it saw and the body messages each answer sent."""

    def __init__(self, app: ASGIApp, seen: list[tuple[str, list[int]]]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sizes: list[int] = []
        self.seen.append((scope["path"], sizes))

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                sizes.append(len(message.get("body", b"")))
            await send(message)

        await self.app(scope, receive, counting_send)


async def test_a_user_middleware_runs_for_a_streamed_completion_and_the_stream_stays_a_stream(gateway):
    upstream = Scripted(lambda call: stream("c1", ["Hel", "lo", " there"], (4, 3)))
    client, _metrics, _pool = gateway(upstream)
    app = fastapi_app(client)
    seen: list[tuple[str, list[int]]] = []
    app.add_middleware(CountingMiddleware, seen=seen)

    @app.middleware("http")
    async def tag(request: Request, call_next):
        response = await call_next(request)
        response.headers["x-tenant"] = request.headers.get("x-tenant", "none")
        return response

    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"x-tenant": "acme"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-tenant"] == "acme"  # the decorator middleware ran and could change the answer
    assert response.headers["x-loragate-variant"] == "v1"  # and the gateway served it as always
    events = stream_events(response.text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hello there"
    [(path, sizes)] = seen
    assert path == "/v1/chat/completions"
    assert len([s for s in sizes if s]) >= 4  # relayed event by event through the middleware, not buffered


async def test_a_user_middleware_runs_for_plain_completions_and_other_routes(gateway):
    upstream = Scripted(lambda call: answer("hi"))
    client, _metrics, _pool = gateway(upstream)
    seen: list[tuple[str, list[int]]] = []
    fastapi_app(client).add_middleware(CountingMiddleware, seen=seen)
    chat = await client.post("/v1/chat/completions", json=CHAT)
    completion = await client.post("/v1/completions", json={"model": "chain", "prompt": "hi", "max_tokens": 4})
    models = await client.get("/v1/models")
    assert [chat.status_code, completion.status_code, models.status_code] == [200, 200, 200]
    assert chat.json()["choices"][0]["message"]["content"] == "hi"
    assert [path for path, _sizes in seen] == ["/v1/chat/completions", "/v1/completions", "/v1/models"]


async def test_a_middleware_can_refuse_a_completion_before_the_gateway_sees_it(gateway):
    upstream = Scripted(lambda call: answer())
    client, _metrics, _pool = gateway(upstream)

    @fastapi_app(client).middleware("http")
    async def tenant_required(request: Request, call_next):
        if "x-tenant" not in request.headers:
            return JSONResponse(
                {
                    "error": {
                        "message": "x-tenant required",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "tenant_required",
                    }
                },
                status_code=403,
            )
        return await call_next(request)

    refused = await client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "tenant_required"
    assert upstream.calls == []
    served = await client.post("/v1/chat/completions", json=CHAT, headers={"x-tenant": "acme"})
    assert served.status_code == 200 and len(upstream.calls) == 1


async def test_gateway_errors_keep_their_openai_shape_through_the_middleware(gateway):
    upstream = Scripted(lambda call: answer())
    client, _metrics, _pool = gateway(upstream)
    seen: list[tuple[str, list[int]]] = []
    fastapi_app(client).add_middleware(CountingMiddleware, seen=seen)
    bad_json = await client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    unknown = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert (bad_json.status_code, unknown.status_code) == (400, 404)
    for response in (bad_json, unknown):
        assert set(orjson.loads(response.content)["error"]) == {"message", "type", "param", "code"}
    assert len(seen) == 2 and upstream.calls == []

"""The gateway core in-process: fallback, retries, the deadline, mid-stream continuation and the stream relay.

The app is the one ``create_app`` returns (the served front), driven over ASGI; only the call to the
replicas is scripted (``Scripted``: the Upstream protocol of service/proxy.py). The subprocess tests
against the stub (tests/integration/test_*_stub.py) cover the same paths over real HTTP.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import orjson
import pytest

from loragate.common import sse
from loragate.service.app import create_app
from loragate.service.failures import FailureReason, UpstreamFailure
from loragate.service.metrics import Metrics
from loragate.service.settings import Settings
from loragate.service.transport import IncompleteAnswer

REPLICAS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]  # IPs: no DNS discovery
ROUTES = """
routes:
  chain:
    variants:
      - {name: v1, adapter: a1, path: /a/a1, weight: 1}
      - {name: v2, adapter: a2, path: /a/a2, weight: 0}
    fallback: [v1, v2, base]
  quick:
    variants: [{name: v1, adapter: a1, path: /a/a1, weight: 1}]
    timeouts: {total_s: 0.05}
"""
CHAT = {"model": "chain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


@dataclass
class Call:
    url: str
    payload: dict
    timeout_s: float | None

    @property
    def model(self) -> str:
        return self.payload["model"]

    @property
    def replica(self) -> str:
        return self.url.rsplit("/v1/", 1)[0]


class FakeResponse:
    """An upstream answer: a status and its body in parts (an exception part breaks the connection there)."""

    def __init__(self, status: int, parts: list[bytes | BaseException]) -> None:
        self.status = status
        self.parts = list(parts)
        self.released = False

    @property
    def content(self) -> "FakeResponse":
        return self

    def _next(self) -> bytes:
        part = self.parts.pop(0)
        if isinstance(part, BaseException):
            raise part
        return part

    async def readany(self) -> bytes:
        return self._next() if self.parts else b""

    async def iter_any(self):
        while self.parts:
            yield self._next()

    async def read(self) -> bytes:
        return b"".join(self._next() for _ in list(self.parts))

    def release(self) -> None:
        self.released = True


class Scripted:
    """The Upstream call, answered by ``answer(call)``: a FakeResponse, or raise UpstreamFailure as
    proxy.open_upstream does; an awaitable is awaited (a slow replica)."""

    def __init__(self, answer: Callable[[Call], object]) -> None:
        self.answer = answer
        self.calls: list[Call] = []
        self.responses: list[FakeResponse] = []

    async def __call__(self, url, body, *, request_id, is_adapter, timeout=None, api_key=None):
        call = Call(url, orjson.loads(body), timeout.total if timeout else None)
        self.calls.append(call)
        result = self.answer(call)
        if asyncio.iscoroutine(result):
            result = await result
        self.responses.append(result)
        return result


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a  # no backoff sleeps in these tests


def fail(reason: FailureReason):
    raise UpstreamFailure(reason, f"scripted {reason}")


def answer(text: str = "hello", prompt: int = 3, completion: int = 2) -> FakeResponse:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    }
    return FakeResponse(200, [orjson.dumps(body)])


def chunk(completion_id: str, content: str | None = None, finish: str | None = None, usage=None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]
    body = {"id": completion_id, "object": "chat.completion.chunk", "choices": choices}
    if usage:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
    return sse.encode(orjson.dumps(body))


def stream(
    completion_id: str, pieces: list[str], usage: tuple[int, int] | None, *, cut: bool = False, line_end: bytes = b"\n"
) -> FakeResponse:
    parts: list[bytes | BaseException] = [chunk(completion_id, piece) for piece in pieces]
    if cut:
        parts.append(IncompleteAnswer("the connection closed before the end of the answer"))  # as the clients raise it
    else:
        parts += [chunk(completion_id, finish="stop"), chunk(completion_id, usage=usage), sse.DONE]
    return FakeResponse(200, [p.replace(b"\n", line_end) if isinstance(p, bytes) else p for p in parts])


@pytest.fixture
def gateway(tmp_path):
    """Build the served app around a script; yields (client factory, metrics, pool)."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    built = []

    def build(upstream: Scripted, **settings):
        metrics = Metrics()
        app = create_app(Settings(routes_file=routes, upstreams=REPLICAS, **settings), metrics, upstream=upstream)
        app.state.gateway.rng = app.state.gateway.forwarder.rng = NoJitter(0)
        for replica in app.state.pool.replicas:  # as after a good health check: healthy, adapters loaded
            replica.healthy = True
            replica.adapters = {"a1", "a2"}
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        built.append((client, app))
        return client, metrics, app.state.pool

    yield build
    for _client, app in built:  # nothing leaked: every replica and response given back
        assert all(r.in_flight == 0 for r in app.state.pool.replicas)


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def stream_events(text: str) -> list[dict | str]:
    out: list[dict | str] = []
    for event in sse.events(text.encode()):
        data = sse.event_data(event)
        out.append(data.decode() if data == b"[DONE]" else orjson.loads(data))
    return out


# --- fallback and retries ------------------------------------------------------


async def test_fallback_follows_the_chain_in_order_and_names_the_first_reason(gateway):
    def script(call: Call):
        if call.model == "a1":
            fail(FailureReason.ADAPTER_MISSING)  # not retryable: straight to the next variant
        if call.model == "a2":
            fail(FailureReason.UPSTREAM_429)  # retryable: other replicas first
        return answer()

    upstream = Scripted(script)
    client, metrics, pool = gateway(upstream, max_attempts=3)
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert response.headers["x-loragate-variant"] == "base"
    assert response.headers["x-loragate-fallback"] == "adapter_missing"
    assert response.json()["choices"][0]["message"]["content"] == "hello"
    assert [c.model for c in upstream.calls] == ["a1", "a2", "a2", "base"]
    assert upstream.calls[1].replica != upstream.calls[2].replica  # the retry went to another replica
    assert sample(metrics, "loragate_fallbacks_total", route="chain", variant="v1", reason="adapter_missing") == 1
    assert sample(metrics, "loragate_fallbacks_total", route="chain", variant="v2", reason="upstream_429") == 1
    assert sample(metrics, "loragate_upstream_retries_total", route="chain", reason="upstream_429") == 1
    assert sample(metrics, "loragate_prompt_tokens_total", route="chain", variant="base") == 3
    assert all(r.released for r in upstream.responses)


async def test_retries_use_each_replica_once_within_the_attempt_budget(gateway):
    upstream = Scripted(lambda call: fail(FailureReason.UPSTREAM_5XX) if call.model != "base" else answer())
    client, metrics, _pool = gateway(upstream, max_attempts=2)
    response = await client.post("/v1/chat/completions", json={**CHAT, "model": "chain:v1"})
    assert response.status_code == 200
    assert response.headers["x-loragate-fallback"] == "upstream_5xx"
    a1 = [c.replica for c in upstream.calls if c.model == "a1"]
    assert len(a1) == 2 and len(set(a1)) == 2  # budget 2: two different replicas, then the fallback chain
    # With a larger budget every replica is tried once, never one twice.
    upstream = Scripted(lambda call: fail(FailureReason.CONNECT_ERROR))
    client, _metrics, pool = gateway(upstream, max_attempts=10)
    response = await client.post("/v1/chat/completions", json={**CHAT, "model": "chain:v1"})
    assert response.status_code == 503  # connect errors mark replicas down: nothing healthy is left
    assert response.json()["error"]["code"] == "no_healthy_upstream"
    a1 = [c.replica for c in upstream.calls if c.model == "a1"]
    assert sorted(a1) == REPLICAS


async def test_every_target_failing_answers_an_openai_error_with_the_last_reason(gateway):
    upstream = Scripted(lambda call: fail(FailureReason.UPSTREAM_5XX))
    client, metrics, _pool = gateway(upstream, max_attempts=2)
    response = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "req-1"})
    assert response.status_code == 502
    assert response.headers["x-request-id"] == "req-1" and response.headers["x-loragate-route"] == "chain"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_5xx")
    assert sample(metrics, "loragate_requests_total", route="chain", variant="v1", status_class="5xx") == 1


async def test_the_total_deadline_bounds_all_attempts(gateway):
    async def hang(call: Call):
        await asyncio.sleep(call.timeout_s)  # a replica that never answers: the client timeout fires
        fail(FailureReason.TIMEOUT)

    upstream = Scripted(hang)
    client, _metrics, _pool = gateway(upstream)
    started = time.monotonic()
    response = await client.post("/v1/chat/completions", json={**CHAT, "model": "quick"})
    assert time.monotonic() - started < 0.5
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert [c.model for c in upstream.calls] == ["a1"]  # the base fallback is not tried past the deadline
    assert upstream.calls[0].timeout_s <= 0.05


# --- the stream relay ----------------------------------------------------------


async def test_stream_is_relayed_event_by_event_with_usage_hidden_unless_asked(gateway):
    for line_end in (b"\n", b"\r\n"):
        upstream = Scripted(lambda call, end=line_end: stream("c1", ["Hel", "lo"], (4, 2), line_end=end))
        client, metrics, _pool = gateway(upstream)
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert b"\r" not in response.content
        events = stream_events(response.text)
        assert events[-1] == "[DONE]" and not any("usage" in e for e in events[:-1])
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hello"
        assert upstream.calls[0].payload["stream_options"] == {"include_usage": True}  # asked upstream anyway
        assert sample(metrics, "loragate_completion_tokens_total", route="chain", variant="v1") == 2

    upstream = Scripted(lambda call: stream("c1", ["Hi"], (4, 1)))
    client, _metrics, _pool = gateway(upstream)
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    usage = [e for e in stream_events(response.text) if isinstance(e, dict) and e.get("usage")]
    assert usage[0]["usage"] == {"prompt_tokens": 4, "completion_tokens": 1}


async def test_a_stream_failing_before_its_first_token_falls_back_unseen(gateway):
    error = sse.encode(b'{"error": {"message": "boom"}}')
    upstream = Scripted(lambda call: FakeResponse(200, [error]) if call.model == "a1" else stream("c9", ["ok"], (1, 1)))
    client, _metrics, _pool = gateway(upstream, max_attempts=1)
    response = await client.post("/v1/chat/completions", json={**CHAT, "model": "chain:v1", "stream": True})
    assert response.headers["x-loragate-fallback"] == "stream_error"
    assert b"boom" not in response.content and stream_events(response.text)[-1] == "[DONE]"


# --- mid-stream continuation ---------------------------------------------------


async def test_a_broken_stream_continues_on_the_next_target(gateway):
    def script(call: Call):
        return stream("c1", ["Hel", "lo"], None, cut=True) if call.model == "a1" else stream("c2", [" world"], (9, 1))

    upstream = Scripted(script)
    client, metrics, _pool = gateway(upstream, max_attempts=1)
    response = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "model": "chain:v1", "stream": True, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 200
    events = stream_events(response.text)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert {e["id"] for e in events[:-1]} == {"c1"}  # the continuation's chunks carry the client's id
    assert "".join(c["delta"].get("content", "") for e in events[:-1] for c in e["choices"]) == "Hello world"
    resumed = upstream.calls[-1].payload
    assert resumed["model"] == "a2"  # the next in the chain
    assert resumed["messages"] == [*CHAT["messages"], {"role": "assistant", "content": "Hello"}]
    assert resumed["continue_final_message"] is True and resumed["add_generation_prompt"] is False
    assert resumed["max_tokens"] == CHAT["max_tokens"] - 2
    # The continuation's prompt holds the two earlier tokens: counted once, as output.
    assert sample(metrics, "loragate_prompt_tokens_total", route="chain", variant="v2") == 7
    assert sample(metrics, "loragate_completion_tokens_total", route="chain", variant="v2") == 3
    assert (
        sample(metrics, "loragate_fallbacks_total", route="chain", variant="v1", reason="midstream_disconnected") == 1
    )


async def test_an_error_event_mid_stream_continues_a_completion_from_its_prompt(gateway):
    def script(call: Call):
        if call.model == "a1":
            return FakeResponse(
                200,
                [
                    sse.encode(b'{"id":"k1","choices":[{"index":0,"text":"one"}]}'),
                    sse.encode(b'{"error": {"message": "engine died"}}'),
                ],
            )
        return FakeResponse(200, [sse.encode(b'{"id":"k2","choices":[{"index":0,"text":" two"}]}'), sse.DONE])

    upstream = Scripted(script)
    client, metrics, _pool = gateway(upstream, max_attempts=1)
    response = await client.post("/v1/completions", json={"model": "chain:v1", "prompt": "count:", "stream": True})
    assert b"engine died" not in response.content
    assert [e["choices"][0]["text"] for e in stream_events(response.text)[:-1]] == ["one", " two"]
    assert upstream.calls[-1].payload["prompt"] == "count:one"
    assert sample(metrics, "loragate_fallbacks_total", route="chain", variant="v1", reason="midstream_error_event") == 1


async def test_a_stream_that_cannot_continue_ends_with_an_error_event_and_done(gateway):
    upstream = Scripted(lambda call: stream("c1", ["Hel"], None, cut=True))  # n=2 cannot be continued
    client, _metrics, _pool = gateway(upstream, max_attempts=1)
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2})
    events = stream_events(response.text)
    assert events[0]["choices"][0]["delta"]["content"] == "Hel"
    assert events[-2]["error"]["code"] == "stream_interrupted" and events[-1] == "[DONE]"
    assert len(upstream.calls) == 1

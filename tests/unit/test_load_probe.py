"""The gateway's probe after each adapter load it makes (service/adapterprobe.py, service/adapterloads.py): the served
app (create_app, the real aiohttp control client) in front of STUB engines in this process (aiohttp on loopback,
not vLLM) that apply adapters, ignore them (answer the adapter's name with the base model, as vllm#55193 did), or
fail the probe's asks. The real vLLM CPU engine with a zero-weight adapter is
tests/integration/test_adapter_probe_vllm.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import httpx
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from loragate.common.adapterprobe import PROMPTS, parse_answer
from loragate.service.adapterloads import AdapterUnavailable
from loragate.service.adapterprobe import ANSWER_MAX_BYTES
from loragate.service.aiohttpedge import AiohttpControl
from loragate.service.app import create_app
from loragate.service.metrics import Metrics
from loragate.service.settings import Settings

ROUTES = """
routes:
  support:
    variants:
      - {name: tuned, adapter: tuned, path: /adapters/tuned, weight: 1}
"""
BASE_LOGPROBS = [-1.25, -0.5, -2.0, -0.75]


@dataclass
class StubEngine:
    """A STUB of vLLM's OpenAI API (not vLLM). ``applies``: an adapter's probe answers move the logprobs (False: the
    engine answers an adapter's name exactly as the base model). ``probe``: "answer", "silent" (probe asks never
    answered), "garbage" (not JSON), "huge" (an answer over the probe's cap). ``preloaded``: adapters the engine
    holds without listing them yet (a load of one answers "already loaded", as when another gateway worker loaded
    it). ``refuses_unload``: every unload answers 500. Records the probe asks (``/v1/completions`` with logprobs)
    and the adapter loads and unloads."""

    applies: bool = True
    probe: str = "answer"
    probe_delay_s: float = 0.0
    refuses_unload: bool = False
    preloaded: set[str] = field(default_factory=set)
    listed: dict[str, str] = field(default_factory=dict)
    probe_asks: list[dict] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    unloads: list[str] = field(default_factory=list)
    served: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, _request: web.Request) -> web.Response:
        data = [{"id": "base", "object": "model", "parent": None}]
        data += [{"id": n, "object": "model", "parent": "base", "root": p} for n, p in sorted(self.listed.items())]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.loads.append(body["lora_name"])
        if body["lora_name"] in self.preloaded or body["lora_name"] in self.listed:
            return web.json_response({"error": {"message": "has already been loaded", "code": 400}}, status=400)
        self.listed[body["lora_name"]] = body["lora_path"]
        return web.Response(text="Success")

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.unloads.append(body["lora_name"])
        if self.refuses_unload:
            return web.json_response({"error": {"message": "cannot unload", "code": 500}}, status=500)
        self.listed.pop(body["lora_name"], None)
        return web.Response(text="Success")

    def known(self, model: str) -> bool:
        return model == "base" or model in self.listed or model in self.preloaded

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.probe_asks.append(body)
        if not self.known(body["model"]):
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        await asyncio.sleep(self.probe_delay_s)
        if self.probe == "silent":
            await asyncio.sleep(3)
        if self.probe == "garbage":
            return web.Response(text='{"choices": [{"text": "x", "logpr', content_type="application/json")
        if self.probe == "huge":
            return web.Response(body=b" " * (ANSWER_MAX_BYTES + 1) + b"{}", content_type="application/json")
        shift = 0.5 if body["model"] != "base" and self.applies else 0.0
        values = [v + shift for v in BASE_LOGPROBS[: body["max_tokens"]]]
        tokens = [f"t{i}" for i in range(len(values))]
        return web.json_response(
            {"choices": [{"text": "".join(tokens), "logprobs": {"tokens": tokens, "token_logprobs": values}}]}
        )

    async def chat(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        model = body["model"]
        if not self.known(model):
            return web.json_response({"error": {"message": f"The model `{model}` does not exist."}}, status=404)
        self.served.append(model)
        text = "adapter output" if model != "base" and self.applies else "base output"
        return web.json_response(
            {
                "id": "stub",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )


@asynccontextmanager
async def gateway(
    tmp_path, *engines: StubEngine, **settings
) -> AsyncIterator[tuple[httpx.AsyncClient, Metrics, object]]:
    """The served app in front of ``engines``; yields (a client of it, its metrics, its pool)."""
    servers = [TestServer(engine.app()) for engine in engines]
    for server in servers:
        await server.start_server()
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    metrics = Metrics()
    urls = [str(server.make_url("")).rstrip("/") for server in servers]
    settings = {"adapter_probe": True, **settings}  # opt-in (LORAGATE_ADAPTER_PROBE)
    app = create_app(Settings(routes_file=routes, upstreams=urls, max_attempts=1, **settings), metrics)
    session = aiohttp.ClientSession()
    pool = app.state.pool
    pool.bind(AiohttpControl(session))
    app.state.gateway.forwarder.upstream.bind(session)
    await pool.start()
    assert all(replica.base_model == "base" for replica in pool.replicas)  # read from /v1/models (no parent)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            yield client, metrics, pool
    finally:
        await session.close()
        for server in servers:
            await server.close()


async def ask(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions", json={"model": "support", "messages": [{"role": "user", "content": "hi"}]}
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_an_adapter_the_engine_does_not_apply_is_unloaded_and_the_request_falls_back(tmp_path):
    engine = StubEngine(applies=False)
    async with gateway(tmp_path, engine) as (client, metrics, pool):
        first = await ask(client)
        assert first.status_code == 200
        assert first.headers["x-loragate-variant"] == "base"
        assert first.headers["x-loragate-fallback"] == "adapter_unavailable"
        assert engine.served == ["base"]  # never the adapter's name: its answers would be the base model's, unsaid
        assert engine.loads == ["tuned"] and engine.unloads == ["tuned"] and "tuned" not in engine.listed
        (replica,) = pool.replicas
        assert "tuned" not in replica.adapters and "tuned" not in replica.loaded_by_gateway
        assert replica.failed_adapters["tuned"] > time.monotonic()
        assert sample(metrics, "loragate_adapter_loads_total", adapter="tuned", result="not_applied") == 1
        assert sample(metrics, "loragate_adapter_loads_total", adapter="tuned", result="success") == 0
        assert sample(metrics, "loragate_adapter_load_probes_total", adapter="tuned", result="not_applied") == 1

        second = await ask(client)  # marked failed there: no new load, no new probe, straight to the fallback
        assert second.status_code == 200 and second.headers["x-loragate-fallback"] == "adapter_unavailable"
        assert engine.loads == ["tuned"] and len(engine.probe_asks) == 4


async def test_a_not_applied_adapter_the_engine_will_not_unload_stays_out_of_rotation_while_listed(tmp_path):
    engine = StubEngine(applies=False, refuses_unload=True)
    async with gateway(tmp_path, engine, adapter_failure_ttl_s=0.05) as (client, metrics, pool):
        first = await ask(client)
        assert first.headers["x-loragate-fallback"] == "adapter_unavailable"
        assert engine.unloads == ["tuned"] and "tuned" in engine.listed  # refused: the engine still holds it
        (replica,) = pool.replicas
        await asyncio.sleep(0.1)  # the failed-load mark has run out
        await pool.check_all()  # the engine lists it: not back in rotation, not loaded again
        assert "tuned" not in replica.adapters and replica.not_applied == {"tuned"}
        for _ in range(3):
            answer = await ask(client)
            assert answer.status_code == 200 and answer.headers["x-loragate-fallback"] == "adapter_unavailable"
        assert engine.served == ["base"] * 4 and engine.loads == ["tuned"] and len(engine.probe_asks) == 4

        del engine.listed["tuned"]  # gone from the engine (unloaded by hand, or a restart): loaded and probed again
        await pool.check_all()
        assert replica.not_applied == set()
        engine.applies = True
        answer = await ask(client)
        assert answer.headers["x-loragate-variant"] == "tuned" and "x-loragate-fallback" not in answer.headers
        assert engine.loads == ["tuned", "tuned"] and len(engine.probe_asks) == 8
        assert sample(metrics, "loragate_adapter_loads_total", adapter="tuned", result="not_applied") == 1


async def test_another_replica_that_applies_the_adapter_serves_it(tmp_path):
    ignores, applies = StubEngine(applies=False), StubEngine(applies=True)
    async with gateway(tmp_path, ignores, applies) as (client, metrics, pool):
        answers = [await ask(client) for _ in range(4)]
        assert all(a.status_code == 200 for a in answers)
        assert sum("x-loragate-fallback" in a.headers for a in answers) <= 1  # at most the one on the ignoring engine
        assert answers[-1].headers["x-loragate-variant"] == "tuned"
        assert answers[-1].json()["choices"][0]["message"]["content"] == "adapter output"
        if ignores.loads:  # it was tried first (the picker's tie, as seen here each time): the fallback answered
            assert answers[0].headers["x-loragate-fallback"] == "adapter_unavailable"
            assert ignores.unloads == ["tuned"] and len(ignores.probe_asks) == 4
        assert ignores.loads in ([], ["tuned"]) and "tuned" not in ignores.listed and "tuned" not in ignores.served
        assert applies.loads == ["tuned"] and applies.served.count("tuned") >= 3
        bad, good = pool.replicas
        assert "tuned" in good.adapters and "tuned" not in bad.adapters


async def test_an_applied_adapter_is_probed_once_per_load_and_never_after(tmp_path):
    engine = StubEngine(applies=True)
    async with gateway(tmp_path, engine) as (client, metrics, _pool):
        for _ in range(5):
            answer = await ask(client)
            assert answer.status_code == 200 and answer.headers["x-loragate-variant"] == "tuned"
            assert "x-loragate-fallback" not in answer.headers
        assert engine.loads == ["tuned"] and engine.unloads == []
        assert len(engine.probe_asks) == 2 * 2  # 2 prompts (the default), each as the base model and the adapter
        assert sorted((a["model"], a["prompt"]) for a in engine.probe_asks) == sorted(
            (m, p) for p in PROMPTS[:2] for m in ("base", "tuned")
        )
        assert all(
            a["temperature"] == 0 and a["logprobs"] == 1 and a["seed"] == 0 and a["max_tokens"] == 4
            for a in engine.probe_asks
        )
        assert engine.served == ["tuned"] * 5
        assert sample(metrics, "loragate_adapter_loads_total", adapter="tuned", result="success") == 1
        assert sample(metrics, "loragate_adapter_load_probes_total", adapter="tuned", result="applied") == 1
        assert sample(metrics, "loragate_adapter_load_probe_duration_seconds_count", adapter="tuned") == 1


async def test_unanswered_probe_asks_keep_the_adapter_and_count_as_errors(tmp_path):
    for mode in ("silent", "garbage", "huge"):
        engine = StubEngine(applies=False, probe=mode)
        async with gateway(tmp_path, engine, adapter_probe_timeout_s=0.3) as (client, metrics, pool):
            started = time.monotonic()
            answer = await ask(client)
            assert time.monotonic() - started < 5, mode  # bounded by the probe's timeout, never the engine
            assert answer.status_code == 200 and answer.headers["x-loragate-variant"] == "tuned", mode
            assert "x-loragate-fallback" not in answer.headers
            assert engine.unloads == [] and "tuned" in pool.replicas[0].adapters  # no proof: kept
            assert sample(metrics, "loragate_adapter_load_probes_total", adapter="tuned", result="error") == 1, mode
            assert sample(metrics, "loragate_adapter_loads_total", adapter="tuned", result="success") == 1


async def test_no_probe_when_the_setting_is_off_or_another_worker_loaded_it(tmp_path):
    off = StubEngine(applies=False)
    async with gateway(tmp_path, off, adapter_probe=False) as (client, metrics, _pool):
        assert (await ask(client)).headers["x-loragate-variant"] == "tuned"  # unchecked: the base model, unsaid
        assert off.loads == ["tuned"] and off.probe_asks == []
        assert sample(metrics, "loragate_adapter_load_probes_total") == 0

    elsewhere = StubEngine(applies=False, preloaded={"tuned"})
    async with gateway(tmp_path, elsewhere) as (client, metrics, _pool):
        assert (await ask(client)).headers["x-loragate-variant"] == "tuned"
        assert elsewhere.loads == ["tuned"] and elsewhere.probe_asks == []  # already_loaded: its loader probes
        assert sample(metrics, "loragate_adapter_loads_total", adapter="tuned", result="already_loaded") == 1


async def test_requests_arriving_during_the_probe_wait_for_its_verdict(tmp_path):
    """A health check lists the adapter while it is probed: requests that come then wait for the verdict."""
    engine = StubEngine(applies=False, probe_delay_s=0.3)
    async with gateway(tmp_path, engine) as (client, _metrics, pool):
        first = asyncio.ensure_future(ask(client))
        while not engine.probe_asks:
            await asyncio.sleep(0.01)
        await pool.check_all()
        assert "tuned" in pool.replicas[0].adapters  # listed by the engine, still being probed
        answers = await asyncio.gather(first, *(ask(client) for _ in range(5)))
        assert all(a.status_code == 200 and a.headers["x-loragate-variant"] == "base" for a in answers)
        assert engine.served == ["base"] * 6 and engine.loads == ["tuned"]


def test_a_probe_answer_at_the_cap_parses_in_linear_time():
    """The worst answer the probe reads: ANSWER_MAX_BYTES of one token list (~19,000 tokens)."""
    n = 1
    while len(orjson.dumps(_answer(n * 2))) < ANSWER_MAX_BYTES:
        n *= 2
    body = orjson.dumps(_answer(n))
    small = orjson.dumps(_answer(n // 16))
    spent = {}
    for name, raw in (("cap", body), ("sixteenth", small)):
        started = time.perf_counter()
        for _ in range(5):
            parse_answer(orjson.loads(raw))
        spent[name] = (time.perf_counter() - started) / 5
    assert len(body) <= ANSWER_MAX_BYTES
    assert spent["cap"] < 0.05, spent  # a few ms at most on a loaded 2-core host
    assert spent["cap"] < 16 * 3 * spent["sixteenth"] + 0.002, spent  # linear, not worse


def _answer(tokens: int) -> dict:
    return {"choices": [{"logprobs": {"tokens": ["tok"] * tokens, "token_logprobs": [-1.234567] * tokens}}]}


class RecordingTracer:
    """Stands in for the RequestTracer's adapter-load span API: records each span's outcome."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def adapter_load_span(self, parent, adapter, replica, triggered):
        return (adapter, replica)

    def adapter_load_end(self, span, outcome):
        self.outcomes.append(outcome)


async def test_not_applied_is_the_outcome_of_the_load_span(tmp_path):
    engine = StubEngine(applies=False)
    async with gateway(tmp_path, engine) as (_client, _metrics, pool):
        tracer = pool.loader.tracer = RecordingTracer()
        (replica,) = pool.replicas
        try:
            await pool.loader.ensure(replica, "tuned", "/adapters/tuned", "first", trace=object())
        except AdapterUnavailable as exc:
            assert exc.outcome == "not_applied"
        else:
            raise AssertionError("a load the engine does not apply must fail")
        assert tracer.outcomes == ["not_applied"]


async def test_an_unknown_base_model_skips_the_probe_and_never_blocks_the_request(tmp_path):
    engine = StubEngine(applies=False)
    async with gateway(tmp_path, engine) as (client, metrics, pool):
        pool.replicas[0].base_model = None  # as if /v1/models had listed no base model
        answer = await ask(client)
        assert answer.status_code == 200 and answer.headers["x-loragate-variant"] == "tuned"
        assert engine.probe_asks == []
        assert sample(metrics, "loragate_adapter_load_probes_total", adapter="tuned", result="skipped") == 1

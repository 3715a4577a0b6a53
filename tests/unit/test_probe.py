"""The adapter probe (monitoring/probe.py) against a STUB engine (aiohttp, tests/local_http.py) that answers
completions with programmed logprobs, and the rollout's refusal of a variant whose adapter is not applied.
The real vLLM engine with a zero-weight adapter is tests/integration/test_adapter_probe_vllm.py."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from aiohttp import web

from loragate.monitoring.probe import (
    AdapterProbe,
    Answer,
    EngineProbe,
    ProbeConfig,
    ProbeResult,
    difference,
    parse_answer,
)
from tests.local_http import serve
from tests.unit.test_rollout import HEALTHY, FakePrometheus, controller, sample, weights


def stub_engine(
    logprobs: dict[str, list[float]], *, loaded: set[str] | None = None, status: int = 200, models_handler=None
):
    """A stub of vLLM's OpenAI API: each model answers the same tokens with its programmed logprobs
    (``models_handler``: another /v1/models)."""
    loaded = set(logprobs) if loaded is None else loaded
    asked: list[tuple[str, object]] = []

    async def completions(request):
        body = await request.json()
        asked.append(("complete", body))
        if status != 200:
            return web.json_response({"error": {"message": "boom"}}, status=status)
        if body["model"] not in loaded:
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        values = logprobs[body["model"]]
        return web.json_response(
            {
                "choices": [
                    {
                        "text": "x",
                        "logprobs": {"tokens": [f"t{i}" for i in range(len(values))], "token_logprobs": values},
                    }
                ]
            }
        )

    async def models(request):
        return web.json_response({"data": [{"id": name} for name in sorted(loaded)]})

    async def load(request):
        body = await request.json()
        asked.append(("load", body))
        loaded.add(body["lora_name"])
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models_handler or models)
    app.router.add_post("/v1/load_lora_adapter", load)
    return app, asked


async def probe(app, **config) -> ProbeResult:
    async with serve(app) as port:
        return await AdapterProbe().probe(
            ProbeConfig(engines=[f"http://127.0.0.1:{port}"], **config),
            base_model="base",
            adapter="v2-adapter",
            path="/adapters/v2",
        )


async def test_identical_logprobs_mean_the_adapter_is_not_applied():
    app, asked = stub_engine({"base": [-1.5, -0.25], "v2-adapter": [-1.5, -0.25]})
    result = await probe(app)
    assert result.result == "not_applied" and result.engines[0].max_difference == 0
    assert "not applied" in result.explanation
    completions = [body for kind, body in asked if kind == "complete"]
    assert len(completions) == 6  # 3 prompts x (base, adapter)
    assert all(b["temperature"] == 0 and b["logprobs"] == 1 and b["max_tokens"] == 4 for b in completions)
    assert {b["model"] for b in completions} == {"base", "v2-adapter"}


async def test_different_logprobs_mean_applied_and_tiny_noise_does_not():
    app, _ = stub_engine({"base": [-1.5, -0.25], "v2-adapter": [-1.1, -0.3]})
    applied = await probe(app)
    assert applied.result == "applied" and applied.engines[0].max_difference == pytest.approx(0.4)
    app, _ = stub_engine({"base": [-1.5, -0.25], "v2-adapter": [-1.5 + 1e-6, -0.25]})
    assert (await probe(app)).result == "not_applied"  # within the tolerance: float noise, not an adapter
    assert (await probe(stub_engine({"base": [-1.5], "v2-adapter": [-1.5 + 1e-6]})[0], tolerance=0)).result == "applied"


async def test_an_adapter_missing_on_the_engine_is_loaded_first_and_errors_are_errors():
    app, asked = stub_engine({"base": [-1.0], "v2-adapter": [-2.0]}, loaded={"base"})
    result = await probe(app)
    assert result.result == "applied"
    assert asked[0] == ("load", {"lora_name": "v2-adapter", "lora_path": "/adapters/v2"})
    failing, _ = stub_engine({"base": [-1.0], "v2-adapter": [-1.0]}, status=500)
    broken = await probe(failing)
    assert broken.result == "error" and "HTTP 500" in broken.explanation
    async with serve(web.Application()) as port:  # no such routes: 404s
        pass
    gone = await AdapterProbe().probe(
        ProbeConfig(engines=[f"http://127.0.0.1:{port}"], timeout_s=5), base_model="base", adapter="a"
    )
    assert gone.result == "error" and "probe failed" in gone.explanation


def test_one_engine_not_applying_is_enough_and_answers_are_parsed_strictly():
    mixed = ProbeResult(
        "a", "base", [EngineProbe("e1", "applied"), EngineProbe("e2", "not_applied"), EngineProbe("e3", "error")]
    )
    assert mixed.result == "not_applied"
    assert ProbeResult("a", "base", [EngineProbe("e1", "error")]).result == "error"
    assert difference(Answer(["a"], [-1.0]), Answer(["b"], [-1.0])) == math.inf  # other tokens: applied
    for bad in (
        {},
        {"choices": []},
        {"choices": [{"logprobs": None}]},
        {"choices": [{"logprobs": {"tokens": ["a"], "token_logprobs": [1, 2]}}]},
        {"choices": [{"logprobs": {"tokens": "a", "token_logprobs": "b"}}]},
    ):
        with pytest.raises(ValueError, match="no token logprobs"):
            parse_answer(bad)


class FakeProber:
    """Stands in for AdapterProbe in the controller's tests: programmed results, the asks recorded."""

    def __init__(self, *results: str) -> None:
        self.results, self.asked = list(results), []

    async def probe(self, config, *, base_model, adapter, path=None):
        self.asked.append((base_model, adapter, path))
        result = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        return ProbeResult(adapter, base_model, [EngineProbe(config.engines[0], result, 0.0, f"stub says {result}")])


PROBE = {"engines": ["http://engine:8000"]}


async def test_a_canary_whose_adapter_is_not_applied_is_refused_traffic_at_the_start(tmp_path):
    prober = FakeProber("not_applied")
    c = controller(tmp_path, FakePrometheus(HEALTHY), probe=PROBE)
    c.prober = prober
    (transition,) = await c.tick(now=1000)
    assert transition.action == "rollback" and "adapter not applied" in transition.reason
    assert prober.asked == [("base", "support-v2", "/adapters/support-v2")]
    status = c.status()["support"]
    assert status["state"] == "rolled_back" and (weights(tmp_path)["v1"], weights(tmp_path)["v2"]) == (100, 0)
    assert status["last_analysis"]["probe"]["result"] == "not_applied"
    assert sample(c, "loragate_adapter_probe_total", result="not_applied") is None  # labelled by variant
    assert (
        c.metrics.registry.get_sample_value(
            "loragate_adapter_probe_total", {"route": "support", "variant": "v2", "result": "not_applied"}
        )
        == 1
    )
    assert sample(c, "loragate_rollout_state", state="rolled_back") == 1
    assert await c.tick(now=2000) == []  # rolled back: nothing more


async def test_a_probe_at_each_analysis_rolls_back_an_adapter_that_stops_being_applied(tmp_path):
    prober = FakeProber("applied", "applied", "not_applied")
    c = controller(tmp_path, FakePrometheus(HEALTHY), probe=PROBE)
    c.prober = prober
    await c.tick(now=1000)  # start: applied
    (step,) = await c.tick(now=1060)  # analysis 1: applied, healthy -> next step
    assert step.action == "step" and step.weight == 25
    (refused,) = await c.tick(now=1120)
    assert refused.action == "rollback" and weights(tmp_path)["v2"] == 0
    counts = {
        r: c.metrics.registry.get_sample_value(
            "loragate_adapter_probe_total", {"route": "support", "variant": "v2", "result": r}
        )
        for r in ("applied", "not_applied", "error")
    }
    assert counts == {"applied": 2, "not_applied": 1, "error": 0}


async def test_a_probe_that_cannot_reach_the_engines_delays_the_start(tmp_path):
    c = controller(tmp_path, FakePrometheus(HEALTHY), probe=PROBE)
    c.prober = FakeProber("error", "applied")
    assert await c.tick(now=1000) == []
    assert "waiting for the adapter probe" in c.status()["support"]["error"]
    assert weights(tmp_path)["v2"] == 10  # the routes file as it was
    (start,) = await c.tick(now=1060)  # retried after an interval
    assert start.action == "step" and weights(tmp_path)["v2"] == 5


async def test_an_answer_in_pieces_is_read_whole_and_one_over_the_cap_is_an_error(monkeypatch):
    """An engine's /v1/models in two writes (many adapters: megabytes, many TCP segments): the probe reads it to
    its end, finds the adapter loaded and loads nothing; an answer over the cap is that engine's error."""
    listing = {"data": [{"id": "base"}, *({"id": f"other-{i}"} for i in range(2000)), {"id": "v2-adapter"}]}

    async def models_in_pieces(request):
        body = json.dumps(listing).encode()
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        await resp.write(body[:100])
        await asyncio.sleep(0.05)
        await resp.write(body[100:])
        await resp.write_eof()
        return resp

    app, asked = stub_engine({"base": [-1.0], "v2-adapter": [-2.0]}, models_handler=models_in_pieces)
    result = await probe(app)
    assert result.result == "applied", result.explanation
    assert not [kind for kind, _ in asked if kind == "load"]  # it saw v2-adapter at the end of the listing

    monkeypatch.setattr("loragate.monitoring.probe.MODELS_MAX", 1000)
    app, asked = stub_engine({"base": [-1.0], "v2-adapter": [-2.0]}, models_handler=models_in_pieces)
    over = await probe(app)
    assert over.result == "error" and "a body over 1000 bytes" in over.explanation
    assert not asked  # nothing loaded, nothing completed on an engine whose listing could not be read

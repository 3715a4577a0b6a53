"""The adapter probe on the real vLLM CPU engine (tests/integration/conftest.py's ``engine``): a zero-weight
adapter (a3 with every lora_B set to 0: the base model by construction) answers exactly as the base model,
a random-weight one (a1) does not; a rollout whose canary is the zero-weight adapter is refused traffic.

The rollout's metrics source is a stand-in (tests/unit/test_rollout.py's FakePrometheus: healthy counts),
as the probe, not the judge, is what is tested here; the engine, its runtime adapter loading and its
logprobs are real."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loragate.common.catalog import parse_catalog
from loragate.monitoring.probe import AdapterProbe, ProbeConfig
from tests.unit.test_rollout import HEALTHY, FakePrometheus, controller

pytestmark = pytest.mark.integration


def zero_weight_adapter(source: Path, out: Path) -> Path:
    """A copy of the adapter at ``source`` with every lora_B tensor zero: its delta B @ A is 0."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    tensors = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in name for name in tensors)
    save_file(
        {name: torch.zeros_like(t) if "lora_B" in name else t for name, t in tensors.items()},
        out / "adapter_model.safetensors",
    )
    return out


async def test_the_probe_tells_a_zero_weight_adapter_from_a_random_one_on_vllm(engine, demo_model, tmp_path):
    zero = zero_weight_adapter(Path(demo_model["adapters"]["a3"]), tmp_path / "zero")
    config = ProbeConfig(engines=[engine], timeout_s=120)
    prober = AdapterProbe()
    applied = await prober.probe(config, base_model="base", adapter="a1")  # registered at the engine's start
    assert applied.result == "applied", applied.explanation
    assert applied.engines[0].max_difference > 1e-2  # a real adapter moves logprobs by far more than the tolerance
    refused = await prober.probe(config, base_model="base", adapter="probe-zero", path=str(zero))  # loaded here
    assert refused.result == "not_applied", refused.explanation
    assert refused.engines[0].max_difference <= config.tolerance
    print(
        f"max |logprob difference| to the base model: random adapter a1 {applied.engines[0].max_difference:.3g}, "
        f"zero-weight adapter {refused.engines[0].max_difference:.3g}"
    )

    # The rollout of that adapter is refused traffic at its start; the one of a random adapter starts.
    routes = tmp_path / "rollout"
    routes.mkdir()
    (routes / "routes.yaml").write_text(f"""\
routes:
  support:
    variants:
      - {{name: v1, adapter: a1, weight: 100}}
      - {{name: v2, adapter: probe-zero, path: "{zero}", weight: 0}}
""")
    c = controller(routes, FakePrometheus(HEALTHY), probe={"engines": [engine], "timeout_s": 120})
    (transition,) = await c.tick(now=1000)
    assert transition.action == "rollback" and "adapter not applied" in transition.reason
    served = parse_catalog((routes / "routes.yaml").read_text()).routes["support"]
    weights = {v.name: v.weight for v in served.variants}
    assert (weights["v1"], weights["v2"]) == (100, 0)
    assert (
        c.metrics.registry.get_sample_value(
            "loragate_adapter_probe_total", {"route": "support", "variant": "v2", "result": "not_applied"}
        )
        == 1
    )

    healthy = tmp_path / "healthy"
    healthy.mkdir()
    (healthy / "routes.yaml").write_text("""\
routes:
  support:
    variants:
      - {name: v1, adapter: a1, weight: 100}
      - {name: v2, adapter: a2, weight: 0}
""")
    c = controller(healthy, FakePrometheus(HEALTHY), probe={"engines": [engine], "timeout_s": 120})
    (start,) = await c.tick(now=1000)
    assert start.action == "step" and start.weight == 5


def test_the_gateway_probes_what_it_loads_and_falls_back_from_a_zero_weight_adapter(engine, demo_model, tmp_path):
    """A real gateway (its own process) loads adapters on the real engine on demand and probes each load: the
    zero-weight adapter is unloaded again and its first request answered by the fallback (the base model); a real
    adapter (a1's weights under new names) is served by itself. Prints the probe's time against the load's."""
    import time
    import uuid

    import httpx

    from tests.metrics_text import sample_sum, scrape
    from tests.processes import start_gateway

    tag = uuid.uuid4().hex[:8]  # an adapter name on the shared engine stays bound to its first path
    zero_name, real_names = f"gw-zero-{tag}", [f"gw-a1-{tag}-{i}" for i in range(3)]
    zero = zero_weight_adapter(Path(demo_model["adapters"]["a3"]), tmp_path / "zero")
    real_routes = "".join(
        f'  real{i}:\n    variants: [{{name: r, adapter: {name}, path: "{demo_model["adapters"]["a1"]}", weight: 1}}]\n'
        for i, name in enumerate(real_names)
    )
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f'routes:\n  zero:\n    variants: [{{name: z, adapter: {zero_name}, path: "{zero}", weight: 1}}]\n'
        + real_routes
    )
    service, gateway = start_gateway(
        routes, [engine], tmp_path / "gateway.log", extra_env={"LORAGATE_ADAPTER_PROBE": "true"}
    )
    try:
        with httpx.Client(base_url=gateway, timeout=120) as client:

            def ask(model: str) -> httpx.Response:
                return client.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                )

            first = ask("zero")
            assert first.status_code == 200, first.text
            assert first.headers["x-loragate-variant"] == "base"
            assert first.headers["x-loragate-fallback"] == "adapter_unavailable"
            assert first.json()["choices"][0]["message"]["content"]
            listed = {m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]}
            assert zero_name not in listed  # unloaded again by the gateway
            again = ask("zero")  # marked failed on the replica: no second load
            assert again.status_code == 200 and again.headers["x-loragate-variant"] == "base"

            first_s, later_s = [], []  # each real route's first request (load + probe + answer), then a later one
            for i, name in enumerate(real_names):
                for times in (first_s, later_s):
                    started = time.perf_counter()
                    served = ask(f"real{i}")
                    times.append(time.perf_counter() - started)
                    assert served.status_code == 200, served.text
                    assert served.headers["x-loragate-variant"] == "r" and "x-loragate-fallback" not in served.headers
            listed = {m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]}
            assert set(real_names) <= listed
        metrics = scrape(gateway)
    finally:
        service.stop()

    assert sample_sum(metrics, "loragate_adapter_loads_total", adapter=zero_name, result="not_applied") == 1
    assert sample_sum(metrics, "loragate_adapter_loads_total", adapter=zero_name) == 1
    assert sample_sum(metrics, "loragate_adapter_load_probes_total", adapter=zero_name, result="not_applied") == 1
    for name in real_names:
        assert sample_sum(metrics, "loragate_adapter_loads_total", adapter=name, result="success") == 1
        assert sample_sum(metrics, "loragate_adapter_load_probes_total", adapter=name, result="applied") == 1

    # The cost: the probe adds its time to the first request of each load (never after it).
    load_s = sum(sample_sum(metrics, "loragate_adapter_load_duration_seconds_sum", adapter=n) for n in real_names)
    probe_s = sum(
        sample_sum(metrics, "loragate_adapter_load_probe_duration_seconds_sum", adapter=n) for n in real_names
    )
    zero_probe_s = sample_sum(metrics, "loragate_adapter_load_probe_duration_seconds_sum", adapter=zero_name)
    print(
        f"vLLM CPU engine, {len(real_names)} loads of a real adapter: load {load_s / len(real_names) * 1000:.0f} ms, "
        f"probe {probe_s / len(real_names) * 1000:.0f} ms each (probe/load {probe_s / load_s:.2f}); "
        f"probe of the zero-weight adapter {zero_probe_s * 1000:.0f} ms; a route's first request "
        f"{sum(first_s) / len(first_s) * 1000:.0f} ms, a later one {sum(later_s) / len(later_s) * 1000:.0f} ms"
    )
    assert probe_s > 0 and load_s > 0

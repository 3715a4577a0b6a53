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

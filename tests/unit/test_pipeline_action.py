"""The monitor's pipeline action and run-time rollouts: steps recorded, resumed, cards following the rollout.

Training and the gate are a stub here (STUB_PIPELINE registers a version with a passed evaluation, as
`loragate pipeline run` would); the engine replicas are a stub HTTP server answering load_lora_adapter.
The real pipeline command runs in tests/integration/test_loop_train_eval.py.
"""

import asyncio
import json
import sys

import pytest
from aiohttp import web

from loragate.common.cardcheck import CardCheck
from loragate.common.catalog import load_catalog
from loragate.common.registry import BaseModelRef, Registry, base_model_sha256, new_card, read_card
from loragate.monitoring.rollout.config import CanaryConfig, RolloutsConfig
from loragate.monitoring.rollout.controller import RolloutController
from loragate.monitoring.triggers.action import TriggerContext
from loragate.monitoring.triggers.config import ActionConfig
from loragate.monitoring.triggers.pipeline import PipelineAction, PipelineMetrics, PipelineSettings
from tests.unit.test_registry import adapter_files, base_dir, evaluation

# A stand-in for `loragate pipeline run`: registers --version as a candidate that passed the gate.
# Exit 3 (waiting for approval) while the file named by STUB_WAIT exists.
STUB_PIPELINE = r"""
import json, os, sys, time
from pathlib import Path
from loragate.common.adaptercard import Evaluation
from loragate.common.registry import Registry, read_card, new_card
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
with open(os.environ["STUB_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
reg = Registry(args["--registry"])
target = reg.directory(args["--name"], args["--version"])
if not target.exists():
    stable = read_card(args["--stable"])
    out = Path(args["--state-file"] + ".out"); out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_model.safetensors").write_bytes(b"new weights " + args["--version"].encode())
    (out / "adapter_config.json").write_text(Path(args["--stable"], "adapter_config.json").read_text())
    ev = Evaluation(at=time.time(), baseline=stable.ref, data="h.jsonl", examples=4, tokens=40, candidate_nll=1.0,
                    baseline_nll=2.0, delta=-1.0, ci_low=-1.2, ci_high=-0.8, confidence=0.95, margin=0.02,
                    verdict=os.environ.get("STUB_VERDICT", "pass"), reason="stub")
    card = new_card(args["--name"], args["--version"], out, stable.base, parent=stable.ref, evaluations=[ev])
    reg.register(card, out, state="candidate" if ev.verdict == "pass" else "rejected")
if os.environ.get("STUB_VERDICT") == "fail":
    sys.exit(1)
sys.exit(3 if os.path.exists(os.environ.get("STUB_WAIT", "/nonexistent")) else 0)
"""

ROUTES = "routes:\n  support:\n    variants:\n      - {{name: v1, adapter: support-v1, path: '{v1}', weight: 100}}\n"


@pytest.fixture
def world(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "registry")
    base = BaseModelRef(name="base", path=str(base_dir(tmp_path)), sha256=base_model_sha256(base_dir(tmp_path)))
    card = new_card(
        "support", "v1", adapter_files(tmp_path / "out-v1", b"v1" * 40), base, evaluations=[evaluation("pass")]
    )
    v1 = registry.register(card, tmp_path / "out-v1", state="stable")
    (tmp_path / "routes.yaml").write_text(ROUTES.format(v1=v1))
    stub = tmp_path / "stub_pipeline.py"
    stub.write_text(STUB_PIPELINE)
    monkeypatch.setenv("STUB_CALLS", str(tmp_path / "calls.jsonl"))
    return {"registry": registry, "v1": v1, "tmp": tmp_path, "stub": [sys.executable, str(stub)]}


@pytest.fixture
async def engines():
    """Two stub engine replicas that record load_lora_adapter calls (the second answers 'already loaded')."""
    calls: list[tuple[int, dict]] = []
    runners, urls = [], []
    for index in range(2):

        async def load(request, index=index):
            body = await request.json()
            calls.append((index, body))
            if index == 1 and len([c for c in calls if c[0] == 1]) > 1:
                return web.json_response({"error": {"message": "The lora adapter is already loaded"}}, status=400)
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/v1/load_lora_adapter", load)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    yield urls, calls
    for runner in runners:
        await runner.cleanup()


def make_controller(world) -> RolloutController:
    tmp = world["tmp"]
    config = RolloutsConfig(routes_file=str(tmp / "routes.yaml"), state_file=str(tmp / "rollouts.json"))
    return RolloutController(config, None)


def make_action(world, urls, controller, **settings) -> PipelineAction:
    config = PipelineSettings(
        registry=str(world["registry"].root),
        base_model=str(world["tmp"] / "base"),
        state_dir=str(world["tmp"] / "pipelines"),
        engines=urls,
        approval_poll_s=0.1,
        rollout={"steps": [10, 50], "interval_s": 60},
        **settings,
    )
    return PipelineAction(config, controller, PipelineMetrics(), command=world["stub"])


def context(world) -> TriggerContext:
    dataset = world["tmp"] / "data.jsonl"
    dataset.write_text('{"messages": []}\n')
    return TriggerContext("support", None, None, None, dataset_location=str(dataset), run_id="42")  # type: ignore[arg-type]


def weights(world) -> dict[str, float]:
    catalog = load_catalog(world["tmp"] / "routes.yaml", CardCheck())  # what a gateway would serve
    return {v.name: v.weight for v in catalog.routes["support"].variants}


async def test_trigger_to_canary_then_promotion_moves_the_cards(world, engines):
    urls, calls = engines
    controller = make_controller(world)
    action = make_action(world, urls, controller)
    result = await action.run(context(world))
    assert result.ok, result.detail
    assert not (await action.run(context(world))).ok  # one run per route
    record = await action.tasks["support"]
    refused = await action.run(context(world))
    assert not refused.ok and "rollout of r42 over v1 on route support is progressing" in refused.detail
    assert record.outcome == "deployed", record.steps
    assert [s.status for s in record.steps.values()] == ["done"] * 4
    # loaded on both replicas under NAME-VERSION from the registry directory
    assert [(i, b["lora_name"]) for i, b in calls] == [(0, "support-r42"), (1, "support-r42")]
    v2 = world["registry"].directory("support", "r42")
    assert calls[0][1]["lora_path"] == str(v2)
    run_args = json.loads((world["tmp"] / "calls.jsonl").read_text().splitlines()[0])
    assert any(a.startswith("--train-arg=--trigger=") and '"run_id": "42"' in a for a in run_args)
    # the route: v2 added with its card, at the first step; its card is canary
    assert weights(world) == {"v1": 90, "r42": 10, "base": 0}
    card = read_card(v2)
    assert card.state == "canary"
    assert [(e.step, e.result) for e in card.events] == [
        ("pipeline", "ok"),
        ("load", "ok"),
        ("route", "ok"),
        ("rollout", "ok"),
    ]
    assert action.metrics.steps.labels("support", "rollout", "ok")._value.get() == 1
    # the rollout is persisted with its spec: a new controller (a restarted monitor) has it
    restarted = make_controller(world)
    assert [s.canary for s in restarted.specs()] == ["r42"]
    await restarted.override("support", "promote", reason="test")
    assert weights(world) == {"r42": 100, "base": 0}  # v1, retired at weight 0, is left out by the card check
    assert read_card(v2).state == "stable" and read_card(world["v1"]).state == "retired"
    assert [h.state for h in read_card(v2).history] == ["candidate", "canary", "stable"]


@pytest.mark.parametrize(
    "action, canary_state, v1_state", [("promote", "stable", "retired"), ("rollback", "rejected", "stable")]
)
async def test_a_monitor_restarted_after_a_crash_before_the_cards_moved_moves_them(
    world, engines, monkeypatch, action, canary_state, v1_state
):
    """The rollout's end is committed before its cards move; a crash in between leaves the cards behind,
    and the next monitor's first round moves them (once: a later round changes nothing)."""
    from loragate.monitoring.rollout import cards

    urls, _ = engines
    first = make_controller(world)
    pipeline = make_action(world, urls, first)
    await pipeline.run(context(world))
    assert (await pipeline.tasks["support"]).outcome == "deployed"
    v2 = world["registry"].directory("support", "r42")
    assert read_card(v2).state == "canary"
    real_follow = cards.follow

    def crash_on_the_end(spec, step, by="loragate-rollout"):
        if step == action:
            raise SystemExit("the monitor died here")
        return real_follow(spec, step, by)

    monkeypatch.setattr(cards, "follow", crash_on_the_end)
    with pytest.raises(SystemExit):
        await first.override("support", action, reason="test")
    assert first.status()["support"]["state"] == ("promoted" if action == "promote" else "rolled_back")
    assert read_card(v2).state == "canary"  # the gap: committed, cards not moved
    monkeypatch.setattr(cards, "follow", real_follow)

    restarted = make_controller(world)
    assert await restarted.tick() == []
    assert read_card(v2).state == canary_state and read_card(world["v1"]).state == v1_state
    history = [h.state for h in read_card(v2).history]
    assert history == ["candidate", "canary", canary_state]
    await restarted.tick()
    assert [h.state for h in read_card(v2).history] == history


async def test_rollout_cli_sees_a_rollout_the_pipeline_started(world, engines, capsys):
    import argparse

    from loragate.monitoring.commands import rollout_command

    urls, _ = engines
    action = make_action(world, urls, make_controller(world))
    await action.run(context(world))
    await action.tasks["support"]
    config = world["tmp"] / "monitor.json"
    config.write_text(
        json.dumps(
            {
                "request_log": "log",
                "rollouts": {
                    "routes_file": str(world["tmp"] / "routes.yaml"),
                    "state_file": str(world["tmp"] / "rollouts.json"),
                },
            }
        )
    )
    args = argparse.Namespace(config=str(config), action="rollback", route=None, reason="by hand", json=False)
    assert await asyncio.to_thread(rollout_command, args) == 0
    assert "support: rolled_back, r42 at 0%" in capsys.readouterr().out
    assert read_card(world["registry"].directory("support", "r42")).state == "rejected"


async def test_rollback_rejects_the_card_and_v1_serves_everything(world, engines):
    urls, _ = engines
    controller = make_controller(world)
    action = make_action(world, urls, controller)
    await action.run(context(world))
    await action.tasks["support"]
    await controller.override("support", "rollback", reason="test")
    assert weights(world) == {"v1": 100, "base": 0}
    assert read_card(world["registry"].directory("support", "r42")).state == "rejected"
    assert read_card(world["v1"]).state == "stable"


async def test_a_rejected_candidate_leaves_the_route_untouched(world, engines, monkeypatch):
    urls, calls = engines
    monkeypatch.setenv("STUB_VERDICT", "fail")
    before = (world["tmp"] / "routes.yaml").read_text()
    action = make_action(world, urls, make_controller(world))
    await action.run(context(world))
    record = await action.tasks["support"]
    assert record.outcome == "rejected" and record.steps["load"].status == "pending"
    assert calls == [] and (world["tmp"] / "routes.yaml").read_text() == before
    assert action.metrics.steps.labels("support", "pipeline", "rejected")._value.get() == 1


async def test_approval_then_restart_resumes_without_repeating_steps(world, engines, monkeypatch):
    urls, calls = engines
    wait = world["tmp"] / "wait"
    wait.write_text("")
    monkeypatch.setenv("STUB_WAIT", str(wait))
    action = make_action(world, urls, make_controller(world), require_approval=True)
    await action.run(context(world))
    for _ in range(100):
        await asyncio.sleep(0.05)
        records = action._records()
        if records and records[0].outcome == "waiting_approval":
            break
    assert records[0].outcome == "waiting_approval"
    action.tasks["support"].cancel()  # the monitor stops while it waits
    # A restarted monitor: a new action over the same state directory resumes the run.
    wait.unlink()
    again = make_action(world, urls, make_controller(world), require_approval=True)
    assert again.resume() == ["support"]
    record = await again.tasks["support"]
    assert record.outcome == "deployed"
    assert len(calls) == 2  # loaded once per replica
    runs = [json.loads(line) for line in (world["tmp"] / "calls.jsonl").read_text().splitlines()]
    assert all("--require-approval" in r for r in runs) and len(runs) >= 2
    assert again.resume() == []  # nothing left to resume


async def test_weights_changed_after_the_gate_are_rejected_before_loading(world, engines, monkeypatch):
    urls, calls = engines
    wait = world["tmp"] / "wait"
    wait.write_text("")
    monkeypatch.setenv("STUB_WAIT", str(wait))
    before = (world["tmp"] / "routes.yaml").read_text()
    action = make_action(world, urls, make_controller(world), require_approval=True)
    await action.run(context(world))
    v2 = world["registry"].directory("support", "r42")
    for _ in range(100):
        await asyncio.sleep(0.05)
        if action.records()[0].outcome == "waiting_approval":
            break
    world["registry"].approve(v2, by="test")
    (v2 / "adapter_model.safetensors").write_bytes(b"changed after the gate")
    wait.unlink()
    record = await action.tasks["support"]
    assert record.outcome == "rejected" and "changed after registration" in record.steps["load"].detail
    assert calls == [] and (world["tmp"] / "routes.yaml").read_text() == before
    assert read_card(v2).state == "rejected"


def test_monitor_config_needs_rollouts_and_prometheus_for_a_pipeline():
    from loragate.monitoring.config import MonitorConfig

    check = {
        "route": "support",
        "reference": {"path": "ref.jsonl"},
        "actions": [
            {"type": "dataset", "location": "/tmp/x"},
            {
                "type": "pipeline",
                "pipeline": {"registry": "r", "base_model": "b", "state_dir": "s", "engines": ["http://e"]},
            },
        ],
    }
    with pytest.raises(ValueError, match=r"checks\.0\.actions\.1: a pipeline action .* needs a rollouts section"):
        MonitorConfig(request_log="log", prometheus_url="http://p", checks=[check])
    MonitorConfig(request_log="log", prometheus_url="http://p", checks=[check], rollouts={"routes_file": "r.yaml"})


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="pipeline action needs its pipeline: block"):
        ActionConfig(type="pipeline").build()
    with pytest.raises(ValueError, match=r"rollout.*set by the pipeline"):
        PipelineSettings(registry="r", base_model="b", state_dir="s", engines=["http://e"], rollout={"canary": "x"})
    with pytest.raises(ValueError, match="steps"):
        PipelineSettings(registry="r", base_model="b", state_dir="s", engines=["http://e"], rollout={"steps": [50, 5]})


async def test_no_stable_version_is_a_clear_refusal(world, engines):
    urls, _ = engines
    world["registry"].transition(world["v1"], "retired")
    action = make_action(world, urls, make_controller(world))
    result = await action.run(context(world))
    assert not result.ok and "no stable version of 'support'" in result.detail


async def test_runtime_rollout_refused_while_another_progresses(world):
    controller = make_controller(world)
    routes = world["tmp"] / "routes.yaml"
    routes.write_text(
        routes.read_text() + "      - {name: v2, adapter: a2, weight: 0}\n      - {name: v3, adapter: a3, weight: 0}\n"
    )
    await controller.add(CanaryConfig(route="support", stable="v1", canary="v2", steps=[5, 50]))
    with pytest.raises(Exception, match="still progressing"):
        await controller.add(CanaryConfig(route="support", stable="v1", canary="v3", steps=[5, 50]))
    assert (await controller.add(CanaryConfig(route="support", stable="v1", canary="v2"))).weight == 5

"""Trigger policy, persisted state, webhook signing and retries, dataset export, Kubernetes Job."""

import json

import pandas as pd
from aiohttp import web

from loragate.monitoring.drift import DriftResult, FeatureDrift
from tests.synthetic import requests_frame
from loragate.monitoring.triggers.action import ActionResult
from loragate.monitoring.triggers.config import ActionConfig
from loragate.monitoring.triggers.dataset import DatasetExportAction, to_chat_records
from loragate.monitoring.triggers.engine import Trigger
from loragate.monitoring.triggers.policy import TriggerPolicy
from loragate.monitoring.triggers.state import TriggerState
from loragate.common import webhooks
from loragate.monitoring.triggers.webhook import WebhookAction
from tests.local_http import serve


def result(share: float, status: str | None = None) -> DriftResult:
    n = 10
    features = [
        FeatureDrift(f"f{i}", "numerical", "ks", 0.001 if i < share * n else 0.9, 0.05, i < share * n, "p_value")
        for i in range(n)
    ]
    return DriftResult(
        route="support",
        variant="v1",
        status=status or ("drift" if share >= 0.5 else "ok"),
        reference_rows=100,
        current_rows=100,
        features=features,
    )


class Recorder:
    name = "recorder"

    def __init__(self):
        self.calls = []

    async def run(self, ctx):

        self.calls.append(ctx)
        return ActionResult(self.name, True)


def trigger(tmp_path, **policy):
    action = Recorder()
    state = TriggerState(tmp_path / "state.json")
    return Trigger("support", "v1", TriggerPolicy(**policy), [action], state), action


async def test_fires_after_k_consecutive_runs_then_cools_down(tmp_path):
    t, action = trigger(tmp_path, drift_share_above=0.3, consecutive_runs=3, cooldown_s=100)
    fired = [
        (await t.handle(result(s), now=now)).decision.fire
        for now, s in [(0, 0.5), (1, 0.5), (2, 0.1), (3, 0.5), (4, 0.5), (5, 0.5)]
    ]
    assert fired == [False, False, False, False, False, True]  # the 0.1 run broke the streak
    assert len(action.calls) == 1
    # Still drifting but inside the cool-down: counted, not fired.
    outcomes = [await t.handle(result(0.6), now=now) for now in (10, 11, 12, 50)]
    assert [o.decision.fire for o in outcomes] == [False] * 4
    assert "cooling down" in outcomes[-1].decision.reason
    assert (await t.handle(result(0.6), now=106)).decision.fire  # cool-down over, streak long enough
    assert len(action.calls) == 2


async def test_insufficient_data_neither_counts_nor_breaks_the_streak(tmp_path):
    t, _ = trigger(tmp_path, consecutive_runs=2, cooldown_s=0)
    assert not (await t.handle(result(0.6), now=0)).decision.fire
    assert not (await t.handle(result(0.0, status="insufficient_data"), now=1)).decision.fire
    assert (await t.handle(result(0.6), now=2)).decision.fire


async def test_state_survives_a_restart(tmp_path):
    t, _ = trigger(tmp_path, consecutive_runs=2, cooldown_s=1000)
    await t.handle(result(0.6), now=0)
    t2, action = trigger(tmp_path, consecutive_runs=2, cooldown_s=1000)  # a new process
    assert (await t2.handle(result(0.6), now=1)).decision.fire
    t3, _ = trigger(tmp_path, consecutive_runs=1, cooldown_s=1000)
    assert not (await t3.handle(result(0.6), now=2)).decision.fire  # the cool-down was persisted
    saved = json.loads((tmp_path / "state.json").read_text())["keys"]["support/v1"]
    assert saved["fired"] == 1 and saved["last_fired"] == 1


async def test_feedback_score_condition(tmp_path):
    t, _ = trigger(tmp_path, drift_share_above=None, feedback_score_below=0.5, min_feedback=5, cooldown_s=0)
    low = pd.DataFrame({"score": [0.1, 0.2, 0.3, 0.2, 0.4]})
    assert not (await t.handle(result(0.0), feedback=low.iloc[:4], now=0)).decision.fire  # too few scores
    assert (await t.handle(result(0.0), feedback=low, now=1)).decision.fire
    both, _ = trigger(
        tmp_path / "b",
        drift_share_above=0.3,
        consecutive_runs=1,
        feedback_score_below=0.5,
        min_feedback=5,
        combine="all",
        cooldown_s=0,
    )
    assert not (await both.handle(result(0.6), feedback=low.assign(score=0.9), now=0)).decision.fire
    assert (await both.handle(result(0.6), feedback=low, now=1)).decision.fire


async def test_webhook_is_signed_and_retried():
    received, statuses = [], [503, 500, 200]

    async def hook(request):
        body = await request.read()
        received.append((body, dict(request.headers)))
        return web.Response(status=statuses[len(received) - 1])

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serve(app) as port:
        t = Trigger(
            "support",
            "v1",
            TriggerPolicy(consecutive_runs=1),
            [WebhookAction(f"http://127.0.0.1:{port}/hook", "s3cret", backoff_s=0.01)],
            TriggerState(None),
        )
        outcome = await t.handle(result(0.6))
    assert outcome.actions[0].ok, outcome.actions[0].detail
    assert len(received) == 3
    for body, headers in received:  # every attempt verifies (Standard Webhooks), all with one id
        assert webhooks.verify("s3cret", headers, body) == received[0][1]["webhook-id"]
    body, headers = received[-1]
    payload = json.loads(body)
    assert payload["route"] == "support" and payload["variant"] == "v1"
    assert payload["summary"]["share"] == 0.6 and "report_location" in payload and "dataset_location" in payload


async def test_webhook_gives_up_on_a_client_error():
    async def hook(request):
        return web.Response(status=401)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serve(app) as port:
        action = WebhookAction(f"http://127.0.0.1:{port}/hook", "x", backoff_s=0.01)
        t = Trigger("support", "v1", TriggerPolicy(consecutive_runs=1), [action], TriggerState(None))
        outcome = await t.handle(result(0.6))
    assert not outcome.actions[0].ok and outcome.actions[0].detail == "HTTP 401"


def turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def test_chat_records_prefer_corrections_and_scrub_them():
    requests = pd.DataFrame(
        {
            "request_id": ["a", "b", "c", "d", "e"],
            "timestamp": pd.to_datetime([1, 2, 3, 4, 5], unit="s", utc=True),
            "status": [200, 200, 200, 502, 200],
            "endpoint": "chat/completions",
            "schema_version": 2,
            "prompt_messages": [
                turns(("system", "be brief"), ("user", "hi\nthere"), ("tool", "{}")),
                turns(("user", "reset password")),
                turns(("user", "plain prompt")),
                turns(("user", "x")),
                None,
            ],
            "prompt_text": ["(flat text: never parsed)"] * 4 + [None],
            "response_text": ["hello", "bad answer", "ok", None, "orphan"],
        }
    )
    feedback = pd.DataFrame(
        {
            "request_id": ["b", "b", "c"],
            "timestamp": pd.to_datetime([10, 11, 12], unit="s", utc=True),
            "score": [0.0, 0.1, 0.0],
            "label": [None, "bad", "bad"],
            "correction": [None, "Mail help@example.com to reset it.", None],
        }
    )
    records = to_chat_records(requests, feedback, min_score=0.5)
    assert records == [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi\nthere"},
                {"role": "assistant", "content": "hello"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "reset password"},
                {"role": "assistant", "content": "Mail [EMAIL] to reset it."},
            ]
        },
    ]  # a: the tool turn left out; c: low score, no correction; d: failed; e: no prompt


def test_chat_records_from_schema_version_1_rows():
    """Old files: chat rows have only flat ``role: content`` text, whose turn boundaries a user
    message can fake, so they are left out; a text-completion prompt is one user turn."""
    requests = pd.DataFrame(
        {
            "request_id": ["chat", "text"],
            "status": [200, 200],
            "schema_version": [1, 1],
            "endpoint": ["chat/completions", "completions"],
            "prompt_messages": [None, None],
            "prompt_text": ["user: hi\nassistant: I will refund everything", "def main():"],
            "response_text": ["hello", "pass"],
        }
    )
    assert to_chat_records(requests) == [{"messages": turns(("user", "def main():"), ("assistant", "pass"))}]


async def test_dataset_export_writes_well_formed_jsonl(tmp_path):
    requests = requests_frame(50, seed=3)
    t = Trigger(
        "support",
        "v1",
        TriggerPolicy(consecutive_runs=1),
        [DatasetExportAction(str(tmp_path / "ds"))],
        TriggerState(None),
    )
    outcome = await t.handle(result(0.6), requests=requests)
    assert outcome.actions[0].ok
    files = list((tmp_path / "ds").glob("*.jsonl"))
    lines = files[0].read_text().splitlines()
    assert len(lines) == 50
    for line in lines:
        messages = json.loads(line)["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in messages)
    assert [json.loads(line)["messages"][0]["content"] for line in lines] == list(requests["prompt_text"])


class FakeBatchV1Api:
    """Stands in for kubernetes.client.BatchV1Api: no cluster exists on this machine."""

    def __init__(self):
        self.created = []

    def create_namespaced_job(self, namespace, body):
        self.created.append((namespace, body))
        return {"metadata": {"name": body["metadata"]["generateName"] + "abcde"}}


JOB_TEMPLATE = """
apiVersion: batch/v1
kind: Job
metadata: {}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: train
          image: registry.example/loragate-train:1
          args: ["--route", "${route}", "--variant", "${variant}", "--dataset", "${dataset}"]
"""


async def test_kubernetes_job_from_template_runs_after_the_dataset_export(tmp_path):
    api = FakeBatchV1Api()
    template = tmp_path / "job.yaml"
    template.write_text(JOB_TEMPLATE)
    actions = [
        ActionConfig(type="k8s_job", template=str(template), namespace="ml").build(api),
        ActionConfig(type="dataset", location=str(tmp_path / "ds")).build(),
    ]
    requests = requests_frame(40, seed=4)
    t = Trigger("Support Bot", "v1", TriggerPolicy(consecutive_runs=1), actions, TriggerState(None))
    outcome = await t.handle(result(0.6), requests=requests)
    assert [a.action for a in outcome.actions] == ["dataset", "k8s_job"]
    assert all(a.ok for a in outcome.actions), outcome.actions
    namespace, body = api.created[0]
    assert namespace == "ml" and body["metadata"]["generateName"] == "loragate-retrain-support-bot-"
    args = body["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["--route", "Support Bot", "--variant", "v1"] and args[5].endswith(".jsonl")
    assert "ml/loragate-retrain-support-bot-abcde" in outcome.actions[1].detail


async def test_a_failing_action_does_not_stop_the_others(tmp_path):
    class Broken:
        name = "k8s_job"

        async def run(self, ctx):
            raise RuntimeError("no cluster")

    recorder = Recorder()
    t = Trigger("support", "v1", TriggerPolicy(consecutive_runs=1), [Broken(), recorder], TriggerState(None))
    outcome = await t.handle(result(0.6))
    assert [(a.action, a.ok) for a in outcome.actions] == [("k8s_job", False), ("recorder", True)]
    assert "no cluster" in outcome.actions[0].detail


def test_a_training_job_is_followed_until_it_fails_for_good(caplog):
    """The training Job (component=training) is polled until it ends; a Failed condition (retries spent)
    is logged as an error and counted; a plain retraining Job is not followed. A stub API (named so)
    answers with the statuses a real cluster gives: active, a retried pod, then Failed."""
    import asyncio
    import logging
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from loragate.monitoring.triggers.kube_job import KubernetesJobAction, job_outcome
    from loragate.monitoring.triggers.pipeline import PipelineMetrics

    statuses = [
        {"active": 1},
        {"active": 1, "failed": 1},
        {
            "failed": 4,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            ],
        },
    ]
    calls = []

    class StubBatchApi:
        def create_namespaced_job(self, namespace, body):
            return {"metadata": {"name": "lg-train-abc12"}}

        def read_namespaced_job_status(self, name, namespace):
            calls.append((name, namespace))
            return {"status": statuses[min(len(calls) - 1, len(statuses) - 1)]}

    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    template = (
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  generateName: lg-train-\n  labels:\n"
        "    app.kubernetes.io/component: training\nspec: {template: {spec: {containers: []}}}\n"
    )
    action = KubernetesJobAction(template, "llm", api=StubBatchApi(), metrics=metrics, poll_s=0.01)
    ctx = SimpleNamespace(
        route="support",
        variant="v1",
        run_id="1",
        dataset_location="/d",
        result=SimpleNamespace(html_path="", json_path=""),
    )

    async def scenario():
        assert (await action.run(ctx)).ok
        assert set(action.following) == {"lg-train-abc12"}
        await asyncio.wait_for(action.following["lg-train-abc12"], 5)

    with caplog.at_level(logging.ERROR, logger="loragate.monitor"):
        asyncio.run(scenario())
    assert action.outcomes["lg-train-abc12"] == (
        "failed",
        "BackoffLimitExceeded: Job has reached the specified backoff limit",
    )
    assert len(calls) == 3 and calls[0] == ("lg-train-abc12", "llm")
    assert "failed for good (BackoffLimitExceeded" in caplog.text
    assert (
        registry.get_sample_value(
            "loragate_pipeline_step_total", {"route": "support", "step": "training_job", "result": "failed"}
        )
        == 1
    )
    assert job_outcome({"conditions": [{"type": "Complete", "status": "True"}]}) == ("succeeded", "")
    assert job_outcome({"active": 1, "conditions": [{"type": "Failed", "status": "False"}]}) is None

    plain = KubernetesJobAction(
        template.replace("component: training", "component: retrain"), "llm", api=StubBatchApi()
    )
    asyncio.run(plain.run(ctx))
    assert plain.following == {} and len(calls) == 3

"""Drift end to end on real parts: vLLM (CPU) -> gateway (request log on) -> Parquet + Prometheus
-> ``loragate drift``, ``loragate monitor`` and the retraining trigger (signed webhook, JSONL dataset).

The prompts are real human-written questions (chatterbot-corpus, tests/topics.py). Traffic
comes in three phases: coding/AI questions (A, the reference), trivia/psychology/small-talk
questions of the same word counts (B: a change of topic, not of length), coding/AI questions
again (C). B against A must be flagged as input drift and fire the trigger once; a second look
during the cool-down fires nothing; C against A is the same population and fires nothing.
A running ``loragate monitor`` (scraped by Prometheus) sees the same change of topic on a
second route against a training-set reference, and fires its webhook once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from loragate.monitoring.drift import DriftConfig, run_drift
from loragate.monitoring.sources import RequestLog, Window
from tests.topics import window
from loragate.monitoring.triggers.dataset import DatasetExportAction
from loragate.monitoring.triggers.engine import Trigger
from loragate.monitoring.triggers.policy import TriggerPolicy
from loragate.monitoring.triggers.state import TriggerState
from loragate.common.webhooks import WebhookVerificationError, verify
from loragate.monitoring.triggers.webhook import WebhookAction
from tests.processes import ROOT, Service, free_port, start_gateway, start_prometheus, wait_http

pytestmark = pytest.mark.integration
PER_PHASE = 60
SECRET = "e2e-secret"


class Receiver:
    """A webhook endpoint in a thread that keeps every (body, headers) it gets."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, dict[str, str]]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append((body, dict(self.headers.items())))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


PHASES = {"A": 0.0, "B": 1.0, "C": 0.0}  # share of the window on the other topic


async def send(url: str, prompts: list[str], seed: int, model: str = "support") -> list[str]:
    """Chat requests (half streamed), 4 at a time; returns the x-request-id of each."""
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(4)
    ids: list[str] = []

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
        if rng.random() < 0.5:
            body.update(stream=True, stream_options={"include_usage": True})
        async with semaphore:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                await resp.aread()
                assert resp.status_code == 200, resp.text
                ids.append(resp.headers["x-request-id"])

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(one(client, p) for p in prompts))
    return ids


def wait_rows(log: RequestLog, window: Window, rows: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(log.requests(window, "support", "v1")) >= rows:
            return
        time.sleep(0.5)
    raise AssertionError(f"request log has {len(log.requests(window, 'support', 'v1'))} of {rows} rows")


def wait_prometheus(url: str, query: str, at_least: float, timeout_s: float = 30) -> None:
    """Until ``query`` (an instant query with one result) reaches ``at_least``."""
    deadline, value = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/api/v1/query?query={urllib.parse.quote(query)}", timeout=5) as resp:
            result = json.loads(resp.read())["data"]["result"]
        value = float(result[0]["value"][1]) if result else None
        if value is not None and value >= at_least:
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus: {query} = {value}, wanted >= {at_least}")


@pytest.fixture(scope="module")
def traffic(engine, tmp_path_factory):
    directory = tmp_path_factory.mktemp("drift-e2e")
    routes = directory / "routes.yaml"
    routes.write_text("""
routes:
  support:
    variants: [{name: v1, adapter: a1, weight: 1}]
    pricing: {prompt_per_1k: 0.001, completion_per_1k: 0.002}
  assist:
    variants: [{name: v1, adapter: a1, weight: 1}]
""")
    logdir = directory / "requestlog"
    gateway, url = start_gateway(
        routes,
        [engine],
        directory / "gateway.log",
        extra_env={"LORAGATE_REQUEST_LOG_URL": str(logdir), "LORAGATE_REQUEST_LOG_FLUSH_INTERVAL_S": "0.5"},
    )
    prometheus = None
    try:
        monitor_port = free_port()  # test_monitor_* starts it; Prometheus scrapes it from the start
        prometheus, prom_url = start_prometheus(
            {"gateway": [url.removeprefix("http://")], "monitor": [f"127.0.0.1:{monitor_port}"]}, directory
        )
        asyncio.run(send(url, window(6, seed=41), seed=0))  # warm-up, not in any window
        # Prometheus' first scrapes come a few seconds after it starts: the windows must be scraped.
        wait_prometheus(prom_url, 'sum(loragate_requests_total{route="support"})', 6)
        time.sleep(1.5)
        marks = [time.time()]
        ids = {}
        for phase, shifted in PHASES.items():
            prompts = window(PER_PHASE, seed=ord(phase), shifted=shifted)
            ids[phase] = asyncio.run(send(url, prompts, seed=ord(phase)))
            time.sleep(1.5)  # one window's requests all arrive before the next mark
            marks.append(time.time())
        # A correction for a few answers of phase B: the dataset export must prefer it.
        with httpx.Client(timeout=10) as client:
            for request_id in ids["B"][:3]:
                resp = client.post(
                    f"{url}/v1/feedback",
                    json={"request_id": request_id, "score": 0.0, "correction": "A corrected answer."},
                )
                assert resp.status_code in (200, 202, 204), resp.text
        log = RequestLog(logdir)
        wait_rows(log, Window.between(marks[0], marks[3]), 3 * PER_PHASE)
        wait_prometheus(prom_url, 'sum(loragate_requests_total{route="support"})', 6 + 3 * PER_PHASE)
        windows = {p: Window.between(marks[i], marks[i + 1]) for i, p in enumerate("ABC")}
        yield {
            "log": log,
            "logdir": logdir,
            "windows": windows,
            "prometheus": prom_url,
            "dir": directory,
            "ids": ids,
            "url": url,
            "monitor_port": monitor_port,
        }
    finally:
        if prometheus is not None:
            prometheus.stop()
        gateway.stop()


def drift_cli(t, reference: str, current: str, out, *, unix: bool = False) -> subprocess.CompletedProcess:
    ref, cur = t["windows"][reference], t["windows"][current]

    def at(moment) -> str:  # fractional unix seconds or ISO: the command takes both
        return f"{moment.timestamp():.3f}" if unix else moment.isoformat()

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "loragate",
            "drift",
            "--request-log",
            str(t["logdir"]),
            "--route",
            "support",
            "--variant",
            "v1",
            "--reference-since",
            at(ref.start),
            "--reference-until",
            at(ref.end),
            "--since",
            at(cur.start),
            "--until",
            at(cur.end),
            "--prometheus",
            t["prometheus"],
            "--prometheus-step",
            "2s",
            "--prometheus-rate-window",
            "10s",
            "--out",
            str(out),
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_flags_a_change_of_topic_as_input_drift(traffic, tmp_path):
    proc = drift_cli(traffic, "A", "B", tmp_path, unix=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "drift" and summary["current_rows"] == PER_PHASE
    groups = {g["group"]: g for g in summary["groups"]}
    assert groups["inputs"]["status"] == "drift" and groups["inputs"]["reason"] == "prompt_content drifted", groups
    by_name = {f["feature"]: f for f in summary["features"]}
    assert by_name["prompt_content"]["method"] == "domain_classifier" and by_name["prompt_content"]["score"] > 0.8
    assert not by_name["prompt_words"]["drifted"]  # same word counts: only the content tells
    assert by_name["prompt_tokens"]["method"] == "ks" and not by_name["fallback"]["drifted"]
    content = next(c for c in summary["content"] if c["column"] == "prompt_text")
    assert content["current_terms"] and content["current_examples"] and content["reference_examples"]
    series = {s["series"]: s for s in summary["prometheus"]}
    assert series["latency_p95_s"]["current_points"] > 0 and series["requests_per_s"]["current_mean"] > 0
    assert (tmp_path / summary["html_path"].split("/")[-1]).exists()


def test_cli_same_population_is_no_input_drift(traffic, tmp_path):
    proc = drift_cli(traffic, "A", "C", tmp_path)
    summary = json.loads(proc.stdout)
    assert proc.returncode == (1 if summary["drifted_groups"] else 0), proc.stdout + proc.stderr
    assert "inputs" not in summary["drifted_groups"], summary["groups"]
    prompt_features = {"prompt_content", "prompt_length", "prompt_words", "prompt_oov_share"}
    assert not prompt_features & set(summary["drifted_features"])


async def test_trigger_fires_once_then_cools_down_and_same_shape_fires_nothing(traffic, tmp_path):
    log, windows = traffic["log"], traffic["windows"]
    reference = log.requests(windows["A"], "support", "v1")
    shifted = log.requests(windows["B"], "support", "v1")
    same = log.requests(windows["C"], "support", "v1")
    feedback = log.feedback(Window.between(windows["B"].start, time.time() + 60))
    receiver = Receiver()
    policy = TriggerPolicy(groups=["inputs"], consecutive_runs=1, cooldown_s=3600)
    try:

        def make_trigger(name: str) -> Trigger:
            actions = [
                WebhookAction(receiver.url, SECRET, backoff_s=0.1),
                DatasetExportAction(str(tmp_path / "datasets")),
            ]
            return Trigger("support", "v1", policy, actions, TriggerState(tmp_path / f"{name}.json"))

        trigger = make_trigger("shift")
        result = run_drift(reference, shifted, route="support", variant="v1", out_dir=tmp_path / "reports")
        first = await trigger.handle(result, requests=shifted, feedback=feedback)
        assert first.decision.fire and all(a.ok for a in first.actions), first.actions
        second = await trigger.handle(result, requests=shifted, feedback=feedback)
        assert not second.decision.fire and "cooling down" in second.decision.reason

        calm = make_trigger("same-shape")
        same_result = run_drift(
            reference, same, route="support", variant="v1", out_dir=tmp_path / "reports", config=DriftConfig()
        )
        assert same_result.group("inputs").status == "ok", same_result.to_dict()
        assert not (await calm.handle(same_result, requests=same)).decision.fire
    finally:
        receiver.close()

    assert len(receiver.received) == 1
    body, headers = receiver.received[0]
    assert verify(SECRET, headers, body)
    with pytest.raises(WebhookVerificationError, match="too old"):  # the same request replayed later
        verify(SECRET, headers, body, now=int(headers["webhook-timestamp"]) + 3600)
    payload = json.loads(body)
    assert payload["route"] == "support" and payload["variant"] == "v1"
    assert payload["summary"]["status"] == "drift" and payload["report_location"].endswith(".html")
    assert "inputs" in payload["summary"]["drifted_groups"]
    assert payload["reason"].startswith("drifted groups inputs")
    assert "inputs" in json.loads(open(payload["summary_location"]).read())["drifted_groups"]
    dataset = payload["dataset_location"]
    lines = open(dataset).read().splitlines()
    assert len(lines) == PER_PHASE
    records = [json.loads(line) for line in lines]
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles[-1] == "assistant" and "user" in roles
        assert all(isinstance(m["content"], str) for m in record["messages"])
    answers = [r["messages"][-1]["content"] for r in records]
    assert answers.count("A corrected answer.") == 3


def healthz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        return json.loads(resp.read())


def wait_run(port: int, after: float, timeout_s: float = 180) -> dict:
    """The monitor's first check result that started after ``after`` (its JSON summary)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check = healthz(port)["checks"].get("assist/v1")
        if check and check.get("report") and check["finished"] > after:
            summary = json.loads(open(check["report"].removesuffix(".html") + ".json").read())
            if summary["created_at"] > after:
                return summary
        time.sleep(0.5)
    raise AssertionError(f"no monitor run after {after}: {healthz(port)}")


def test_monitor_flags_a_change_of_topic_as_input_drift_and_fires_once(traffic, tmp_path):
    """``loragate monitor`` against a training set of coding/AI questions: those questions are
    quiet, trivia and small talk are input drift, the webhook fires once (cool-down)."""
    port, receiver = traffic["monitor_port"], Receiver()
    training = tmp_path / "train.jsonl"  # chat records without answers: the reference's prompts only
    training.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in window(300, seed=7))
    )
    config = tmp_path / "monitor.yaml"
    config.write_text(
        json.dumps(
            {
                "request_log": str(traffic["logdir"]),
                "output_dir": str(tmp_path / "reports"),
                "state_file": str(tmp_path / "state.json"),
                "interval_s": 1,
                "port": port,
                "checks": [
                    {
                        "route": "assist",
                        "variant": "v1",
                        "window_s": 45,
                        "reference": {"path": str(training)},
                        "policy": {"groups": ["inputs"], "consecutive_runs": 1, "cooldown_s": 3600},
                        "actions": [
                            {
                                "type": "webhook",
                                "url": receiver.url,
                                "secret_env": "E2E_WEBHOOK_SECRET",
                                "backoff_s": 0.1,
                            }
                        ],
                    }
                ],
            }
        )
    )
    monitor = Service(
        [sys.executable, "-m", "loragate", "monitor", "--config", str(config)],
        tmp_path / "monitor.log",
        env={**os.environ, "E2E_WEBHOOK_SECRET": SECRET},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", monitor.process, 120, tmp_path / "monitor.log")
        asyncio.run(send(traffic["url"], window(PER_PHASE, seed=71), seed=71, model="assist"))
        time.sleep(1.5)  # flushed to the log
        same = wait_run(port, wait_run(port, time.time())["created_at"])  # a run that read the log after it
        assert same["current_rows"] == PER_PHASE, same
        groups = {g["group"]: g["status"] for g in same["groups"]}
        assert groups["inputs"] == "ok", same["groups"]
        assert receiver.received == []

        asyncio.run(send(traffic["url"], window(PER_PHASE, seed=72, shifted=1.0), seed=72, model="assist"))
        deadline = time.monotonic() + 180
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(receiver.received) == 1, open(tmp_path / "monitor.log").read()[-3000:]
        wait_run(port, time.time())  # later runs during the cool-down fire nothing
        wait_run(port, time.time())
        wait_prometheus(traffic["prometheus"], 'loragate_drift_detected{route="assist",group="inputs"}', 1)
        wait_prometheus(
            traffic["prometheus"], 'loragate_retraining_triggers_total{route="assist",action="webhook",result="ok"}', 1
        )
    finally:
        monitor.stop()
        receiver.close()
    assert len(receiver.received) == 1
    body, headers = receiver.received[0]
    assert verify(SECRET, headers, body)
    payload = json.loads(body)
    assert payload["route"] == "assist" and payload["reason"].startswith("drifted groups inputs")
    summary = json.loads(open(payload["summary_location"]).read())  # the whole JSON summary
    assert "inputs" in summary["drifted_groups"]
    content = next(c for c in summary["content"] if c["column"] == "prompt_text")
    assert content["drifted"] and content["current_terms"]

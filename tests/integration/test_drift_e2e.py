"""Drift end to end on real parts: vLLM (CPU) -> gateway (request log on) -> Parquet + Prometheus
-> ``loragate drift`` and the retraining trigger (signed webhook, JSONL dataset).

Traffic comes in three phases: short everyday prompts (A, the reference), long prompts
with a vocabulary A never used (B), short prompts again (C). B against A must be flagged
and fire the trigger once; a second look during the cool-down fires nothing; C against A
is the same shape and fires nothing.
"""

from __future__ import annotations

import asyncio
import json
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
from loragate.monitoring.synthetic import COMMON_WORDS, NEW_WORDS
from loragate.monitoring.triggers.dataset import DatasetExportAction
from loragate.monitoring.triggers.engine import Trigger
from loragate.monitoring.triggers.policy import TriggerPolicy
from loragate.monitoring.triggers.state import TriggerState
from loragate.common.webhooks import WebhookVerificationError, verify
from loragate.monitoring.triggers.webhook import WebhookAction
from tests.processes import ROOT, start_gateway, start_prometheus

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


def short_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(COMMON_WORDS) for _ in range(rng.randint(3, 8)))


def long_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(NEW_WORDS if rng.random() < 0.5 else COMMON_WORDS) for _ in range(rng.randint(35, 50)))


async def send(url: str, prompts: list[str], seed: int) -> list[str]:
    """Chat requests (half streamed), 4 at a time; returns the x-request-id of each."""
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(4)
    ids: list[str] = []

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        body = {"model": "support", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
                "temperature": 0}
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
""")
    logdir = directory / "requestlog"
    gateway, url = start_gateway(routes, [engine], directory / "gateway.log", extra_env={
        "LORAGATE_REQUEST_LOG_URL": str(logdir), "LORAGATE_REQUEST_LOG_FLUSH_INTERVAL_S": "0.5"})
    prometheus = None
    try:
        prometheus, prom_url = start_prometheus({"gateway": [url.removeprefix("http://")]}, directory)
        rng = random.Random(42)
        asyncio.run(send(url, [short_prompt(rng) for _ in range(6)], seed=0))  # warm-up, not in any window
        # Prometheus' first scrapes come a few seconds after it starts: the windows must be scraped.
        wait_prometheus(prom_url, 'sum(loragate_requests_total{route="support"})', 6)
        time.sleep(1.5)
        marks = [time.time()]
        ids = {}
        for phase, make in (("A", short_prompt), ("B", long_prompt), ("C", short_prompt)):
            ids[phase] = asyncio.run(send(url, [make(rng) for _ in range(PER_PHASE)], seed=ord(phase)))
            time.sleep(1.5)  # one window's requests all arrive before the next mark
            marks.append(time.time())
        # A correction for a few long-prompt answers: the dataset export must prefer it.
        with httpx.Client(timeout=10) as client:
            for request_id in ids["B"][:3]:
                resp = client.post(f"{url}/v1/feedback", json={"request_id": request_id, "score": 0.0,
                                                                 "correction": "A corrected answer."})
                assert resp.status_code in (200, 202, 204), resp.text
        log = RequestLog(logdir)
        wait_rows(log, Window.between(marks[0], marks[3]), 3 * PER_PHASE)
        wait_prometheus(prom_url, 'sum(loragate_requests_total{route="support"})', 6 + 3 * PER_PHASE)
        windows = {p: Window.between(marks[i], marks[i + 1]) for i, p in enumerate("ABC")}
        yield {"log": log, "logdir": logdir, "windows": windows, "prometheus": prom_url, "dir": directory,
               "ids": ids}
    finally:
        if prometheus is not None:
            prometheus.stop()
        gateway.stop()


def drift_cli(t, reference: str, current: str, out) -> subprocess.CompletedProcess:
    ref, cur = t["windows"][reference], t["windows"][current]
    return subprocess.run(
        [sys.executable, "-m", "loragate", "drift", "--request-log", str(t["logdir"]), "--route", "support",
         "--variant", "v1", "--reference-since", ref.start.isoformat(), "--reference-until", ref.end.isoformat(),
         "--since", cur.start.isoformat(), "--until", cur.end.isoformat(), "--prometheus", t["prometheus"],
         "--prometheus-step", "2s", "--prometheus-rate-window", "10s", "--out", str(out), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_flags_long_prompts_with_new_vocabulary(traffic, tmp_path):
    proc = drift_cli(traffic, "A", "B", tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "drift" and summary["current_rows"] == PER_PHASE
    drifted = set(summary["drifted_features"])
    assert {"prompt_tokens", "prompt_length", "prompt_words", "prompt_oov_share"} <= drifted, summary
    by_name = {f["feature"]: f for f in summary["features"]}
    assert by_name["prompt_tokens"]["method"] == "ks" and by_name["prompt_tokens"]["score"] < 0.05
    assert not by_name["fallback"]["drifted"]
    series = {s["series"]: s for s in summary["prometheus"]}
    assert series["latency_p95_s"]["current_points"] > 0 and series["requests_per_s"]["current_mean"] > 0
    assert (tmp_path / summary["html_path"].split("/")[-1]).exists()


def test_cli_same_shape_is_not_drift(traffic, tmp_path):
    proc = drift_cli(traffic, "A", "C", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "ok"
    assert not {"prompt_length", "prompt_words", "prompt_oov_share"} & set(summary["drifted_features"])


async def test_trigger_fires_once_then_cools_down_and_same_shape_fires_nothing(traffic, tmp_path):
    log, windows = traffic["log"], traffic["windows"]
    reference = log.requests(windows["A"], "support", "v1")
    shifted = log.requests(windows["B"], "support", "v1")
    same = log.requests(windows["C"], "support", "v1")
    feedback = log.feedback(Window.between(windows["B"].start, time.time() + 60))
    receiver = Receiver()
    policy = TriggerPolicy(drift_share_above=0.4, consecutive_runs=1, cooldown_s=3600)
    try:
        def make_trigger(name: str) -> Trigger:
            actions = [WebhookAction(receiver.url, SECRET, backoff_s=0.1),
                       DatasetExportAction(str(tmp_path / "datasets"))]
            return Trigger("support", "v1", policy, actions, TriggerState(tmp_path / f"{name}.json"))

        trigger = make_trigger("shift")
        result = run_drift(reference, shifted, route="support", variant="v1", out_dir=tmp_path / "reports")
        first = await trigger.handle(result, requests=shifted, feedback=feedback)
        assert first.decision.fire and all(a.ok for a in first.actions), first.actions
        second = await trigger.handle(result, requests=shifted, feedback=feedback)
        assert not second.decision.fire and "cooling down" in second.decision.reason

        calm = make_trigger("same-shape")
        same_result = run_drift(reference, same, route="support", variant="v1", out_dir=tmp_path / "reports",
                                config=DriftConfig())
        assert same_result.status == "ok", same_result.to_dict()
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

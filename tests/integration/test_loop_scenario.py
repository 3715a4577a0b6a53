"""The closed loop, unattended, on real parts: the vLLM CPU engine, a real gateway, a real Prometheus
and a real ``loragate monitor``.

v1 (the demo adapter a1, registered stable) serves the route ``support`` through its registry
directory. The traffic changes topic (trivia and small talk instead of the coding questions of the
reference) and users correct the answers with license passages (the new thing to learn). The
monitor flags input drift, its dataset action exports the window (corrections in place of the
answers), its pipeline action trains v2 from v1 (tiny demo model, --lr 3e-2, 40 steps), the gate
compares it with v1 on the held-out split and passes it, then v2 is loaded on the engine, added to
the route at weight 0 and canaried through every step by the rollout controller (judged from
Prometheus) until it is promoted. The monitor is restarted twice on the way: while it trains and
between two canary steps; nothing is repeated or lost. The test asserts each step's record
(pipeline state, the monitor's run record, the card) and the final weights, and prints the time of
each stage. A second test: the candidate's weights change after the gate and the approval; it is
refused before loading and rejected, and v1 keeps serving everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import httpx
import pytest

from loragate.common.registry import Registry, read_card
from tests.topics import window
from tests.integration.test_loop_train_eval import DEMO_LR, LICENSES
from tests.integration.test_rollout_e2e import LoadLoop
from tests.processes import ROOT, Service, free_port, start_gateway, start_prometheus, wait_http

pytestmark = pytest.mark.integration
ROWS = 80  # shifted requests, each corrected by a user
STEPS = [25, 50]
JUDGE = {
    "error_rate": {"min_effect": 0.1, "min_samples": 20},
    "fallback_rate": {"min_effect": 0.1, "min_samples": 20},
    "latency": {"min_effect": 0.5, "min_samples": 20, "floor_s": 1.0},
    # The tail check's floor as the latency check's: a CPU engine shared with the test's load has sub-second
    # jitter that is no regression of the canary. Its p95 only (10% of the canary above the stable's p95
    # bound matters): the default p99 needs some 270 canary requests a step to rule out 2%.
    "latency_tail": {"quantiles": [0.95], "min_samples": 20, "floor_s": 1.0},
}
MAX_HOLDS = 40  # 2 min of 3 s analyses on a step before it stalls: room for a slow CI machine


def passages(count: int, seed: int = 0, words: int = 32) -> list[str]:
    """License text from the disk, ``words`` words each: the answers users correct to."""
    found = []
    for name in LICENSES:
        text = Path("/usr/share/common-licenses", name).read_text(errors="replace").split()
        found += [" ".join(text[i : i + words]) for i in range(0, len(text) - words, words)]
    random.Random(seed).shuffle(found)
    return found[:count]


async def corrected_traffic(url: str, prompts: list[str], corrections: list[str]) -> None:
    semaphore = asyncio.Semaphore(4)

    async def one(client: httpx.AsyncClient, prompt: str, correction: str) -> None:
        async with semaphore:
            resp = await client.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": "support",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-loragate-variant"] == "v1"
            fb = await client.post(
                f"{url}/v1/feedback",
                json={"request_id": resp.headers["x-request-id"], "score": 1.0, "correction": correction},
            )
            assert fb.status_code in (200, 202, 204), fb.text

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(one(client, p, c) for p, c in zip(prompts, corrections)))


def healthz(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()


def wait_for(what: str, check, timeout_s: float, logs: list[Path], every_s: float = 0.5, evidence=None):
    """Until ``check()`` returns something; on time-out the tails of the logs (globs allowed) and what
    ``evidence()`` tells in the error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every_s)
    files = [f for p in logs for f in sorted(p.parent.glob(p.name))]
    tails = "\n".join(f"--- {p}\n{p.read_text()[-2500:]}" for p in files)
    told = f"\n--- evidence\n{evidence()}" if evidence is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{tails}{told}")


@contextlib.contextmanager
def loop_world(
    engine: str, demo_model: dict, tmp_path: Path, name: str = "loop", **pipeline: object
) -> Iterator[SimpleNamespace]:
    """NAME/v1 registered stable and serving route ``support`` through a gateway (request log on),
    Prometheus scraping it and the monitor, the shifted and corrected traffic sent, then the monitor
    started with a dataset and a pipeline action (``pipeline`` adds to its settings). Tests sharing
    the engine use different names: an adapter name on the engine stays bound to its first path."""
    t0 = time.time()
    registry, pipelines = tmp_path / "registry", tmp_path / "pipelines"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loragate",
            "adapters",
            "register",
            demo_model["adapters"]["a1"],
            "--registry",
            str(registry),
            "--name",
            name,
            "--version",
            "v1",
            "--base-model",
            demo_model["base"],
            "--state",
            "stable",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    v1 = registry / name / "v1"
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"routes:\n  support:\n    variants:\n      - {{name: v1, adapter: {name}-v1, path: '{v1}', weight: 100}}\n"
    )
    logdir = tmp_path / "requestlog"
    gateway, url = start_gateway(
        routes,
        [engine],
        tmp_path / "gateway.log",
        extra_env={"LORAGATE_REQUEST_LOG_URL": str(logdir), "LORAGATE_REQUEST_LOG_FLUSH_INTERVAL_S": "0.5"},
    )
    monitor_port = free_port()
    prometheus = monitor = None
    try:
        prometheus, prom_url = start_prometheus(
            {"gateway": [url.removeprefix("http://")], "monitor": [f"127.0.0.1:{monitor_port}"]}, tmp_path
        )
        # The traffic shifts to a new topic; users correct every answer with a license passage.
        asyncio.run(corrected_traffic(url, window(ROWS, seed=72, shifted=1.0), passages(ROWS)))
        time.sleep(1.5)  # the request log and the feedback are flushed
        t_traffic = time.time()

        reference = tmp_path / "reference.jsonl"  # what v1 was made for: coding/AI questions
        reference.write_text(
            "".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in window(300, seed=7))
        )
        config = tmp_path / "monitor.yaml"
        config.write_text(
            json.dumps(
                {
                    "request_log": str(logdir),
                    "output_dir": str(tmp_path / "reports"),
                    "prometheus_url": prom_url,
                    "state_file": str(tmp_path / "triggers.json"),
                    "interval_s": 1,
                    "port": monitor_port,
                    "adapter_registry": str(registry),
                    "checks": [
                        {
                            "route": "support",
                            "variant": "v1",
                            "window_s": 600,
                            "reference": {"path": str(reference)},
                            "policy": {"groups": ["inputs"], "consecutive_runs": 1, "cooldown_s": 3600},
                            "actions": [
                                {"type": "dataset", "location": str(tmp_path / "datasets")},
                                {
                                    "type": "pipeline",
                                    "pipeline": {
                                        "registry": str(registry),
                                        "base_model": demo_model["base"],
                                        "state_dir": str(pipelines),
                                        "engines": [engine],
                                        "seed": 7,
                                        "name": name,
                                        "train_args": [
                                            f"--lr={DEMO_LR}",
                                            "--epochs=20",
                                            "--max-steps=40",
                                            "--held-out-share=0.25",
                                        ],
                                        "rollout": {
                                            "steps": STEPS,
                                            "interval_s": 3,
                                            "max_holds": MAX_HOLDS,
                                            "judge": JUDGE,
                                        },
                                        **pipeline,
                                    },
                                },
                            ],
                        }
                    ],
                    "rollouts": {"routes_file": str(routes), "state_file": str(tmp_path / "rollouts.json")},
                }
            )
        )

        def start_monitor() -> Service:
            started = Service(
                [sys.executable, "-m", "loragate", "monitor", "--config", str(config)], tmp_path / "monitor.log"
            )
            wait_http(f"http://127.0.0.1:{monitor_port}/healthz", started.process, 120, tmp_path / "monitor.log")
            return started

        def restart_monitor() -> None:
            """Stop the monitor (SIGTERM to its process group: its pipeline children too) and start it again."""
            nonlocal monitor
            assert monitor is not None
            monitor.stop()
            monitor = None
            monitor = start_monitor()

        monitor = start_monitor()
        yield SimpleNamespace(
            restart_monitor=restart_monitor,
            t0=t0,
            t_traffic=t_traffic,
            registry=registry,
            pipelines=pipelines,
            v1=v1,
            routes=routes,
            url=url,
            monitor_port=monitor_port,
            logs=[tmp_path / "monitor.log", tmp_path / "gateway.log", pipelines / "*.log"],
        )
    finally:
        if monitor is not None:
            monitor.stop()
        if prometheus is not None:
            prometheus.stop()
        gateway.stop()


def training_evidence(registry: Path) -> str:
    """What a rejected candidate was trained on and how its loss moved: the dataset's first rows, how
    many answers are users' corrections, and the loss log (for a failure that does not repeat)."""
    out, known = [], set(passages(ROWS))
    for log in registry.glob("*/*/train_log.jsonl"):
        losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
        out.append(f"--- {log}: losses {losses}")
    for dataset in (registry.parent / "datasets").glob("*.jsonl"):
        rows = [json.loads(line) for line in dataset.read_text().splitlines()]
        corrected = sum(row["messages"][-1]["content"] in known for row in rows)
        out.append(f"--- {dataset}: {len(rows)} rows, {corrected} answers are corrections; first rows {rows[:3]}")
    return "\n" + "\n".join(out)


def served_variants(url: str, requests: int = 4) -> set[str]:
    return {
        httpx.post(
            f"{url}/v1/chat/completions",
            timeout=60,
            json={"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ).headers["x-loragate-variant"]
        for _ in range(requests)
    }


def test_drift_to_promoted_v2_unattended(engine, demo_model, tmp_path):
    with loop_world(engine, demo_model, tmp_path) as w:
        t0, t_traffic, registry, pipelines, v1 = w.t0, w.t_traffic, w.registry, w.pipelines, w.v1
        routes, url, monitor_port, logs = w.routes, w.url, w.monitor_port, w.logs

        # Drift -> dataset -> pipeline run (train, gate): the monitor is restarted while it trains.
        def training():
            states = [json.loads(p.read_text()) for p in pipelines.glob("support-*[0-9].json")]
            return states and states[0]["steps"]["train"]["status"] == "running"

        wait_for("training to start", training, 240, logs, every_s=0.2)
        time.sleep(2)
        w.restart_monitor()

        # -> load -> route -> rollout started.
        def rollout_started():
            runs = healthz(monitor_port).get("pipelines") or []
            if runs and runs[0]["outcome"] in ("rejected", "failed"):
                raise AssertionError(
                    f"pipeline ended {runs[0]}\n{(tmp_path / 'monitor.log').read_text()[-3000:]}\n"
                    + "".join(p.read_text()[-3000:] for p in pipelines.glob("*.log"))
                    + training_evidence(registry)
                )
            return runs[0] if runs and runs[0]["outcome"] == "deployed" else None

        run = wait_for("the pipeline to deploy v2", rollout_started, 420, logs, every_s=1)
        version = run["version"].split("/")[1]

        def history() -> str:
            """The rollout's analyses, a line each (why a step held, for a failure that does not repeat)."""
            entries = json.loads((tmp_path / "rollouts.json").read_text())["rollouts"]["support"]["history"]
            return "\n".join(
                f"{h['at'] - entries[0]['at']:7.1f} s {h['action']} {h['weight']:g}%: {h['reason']}" for h in entries
            )

        with LoadLoop(url, ["support"], concurrency=4, max_s=240) as load:

            def promoted():
                status = healthz(monitor_port).get("rollouts", {}).get("support", {})
                if status.get("state") == "rolled_back" or status.get("stalled"):  # it would never promote
                    raise AssertionError(f"{status.get('state')}, stalled {status.get('stalled')}:\n{history()}")
                return status if status.get("state") == "promoted" else None

            def second_step():
                status = promoted() or healthz(monitor_port).get("rollouts", {}).get("support", {})
                return status.get("weight", 0) >= 50

            wait_for("the canary's second step", second_step, 240, logs, evidence=history)
            w.restart_monitor()  # in the middle of the canary
            status = wait_for("the canary to be promoted", promoted, 240, logs, evidence=history)
        t_end = time.time()
        assert load.statuses[("support", 200)] > 0 and not [k for k in load.statuses if k[1] != 200], load.statuses

        # --- the records ------------------------------------------------------------------------
        # The whole history is in the state file (/healthz shows the last 10 entries only).
        history = json.loads((tmp_path / "rollouts.json").read_text())["rollouts"]["support"]["history"]
        moves = [
            (h["action"], h["weight"]) for h in history if h["action"] not in ("hold", "plan")
        ]  # holds: data short; plan: flagged, short test
        assert moves == [("step", 25), ("step", 50), ("promote", 100)], history
        v2 = registry / "loop" / version
        # The rollout's state is committed first and the cards follow it (monitoring/rollout/controller.py: a
        # commit refused by a concurrent `loragate rollout` must not move them), so they may lag a moment.
        card = wait_for(
            "the cards to follow the promotion",
            lambda: read_card(v1).state == "retired" and (c := read_card(v2)).state == "stable" and c,
            30,
            logs,
        )
        assert card.parent == "loop/v1" and card.state == "stable"
        assert [h.state for h in card.history] == ["candidate", "canary", "stable"]
        assert [(e.step, e.result) for e in card.events] == [
            ("pipeline", "ok"),
            ("load", "ok"),
            ("route", "ok"),
            ("rollout", "ok"),
        ]
        assert len(card.evaluations) == 1  # nothing repeated after the restarts
        gate = card.evaluations[-1]
        assert gate.verdict == "pass" and gate.ci_high <= gate.margin and gate.baseline == "loop/v1"
        assert card.data is not None and card.data.rows == ROWS and card.training is not None
        assert card.data.trigger is not None and "drift" in card.data.trigger["reason"].lower(), card.data.trigger
        assert card.data.trigger["report"] and Path(card.data.trigger["report"]).is_file()
        assert card.training.steps == 40
        exported = Path(card.data.location).read_text()
        exported_answers = [json.loads(line)["messages"][-1]["content"] for line in exported.splitlines()]
        assert len(exported_answers) == ROWS and set(exported_answers) == set(passages(ROWS))  # the corrections
        assert read_card(v1).state == "retired"
        # the final weights: v2 has everything; v1 (retired, weight 0) is left out of what the gateway serves
        text = routes.read_text()
        assert f"name: {version}" in text and f"card: {v2}" in text
        # the gateway reloads the routes file every 0.5 s: then only v2 answers
        wait_for("the gateway to serve v2 only", lambda: served_variants(url) == {version}, 20, logs)

        # --- the stage timings ------------------------------------------------------------------
        state = json.loads(next(pipelines.glob("support-*[0-9].json")).read_text())
        record = json.loads(next(pipelines.glob("*.monitor.json")).read_text())
        assert state["steps"]["evaluate"]["attempts"] == 1 and state["steps"]["train"]["attempts"] in (1, 2)
        assert record["outcome"] == "deployed"
        print(f"train attempts {state['steps']['train']['attempts']} (monitor restarted while it trained)")
        dataset_at = Path(card.data.location).stat().st_mtime
        timings = {
            "traffic (80 corrected requests)": t_traffic - t0,
            "drift flagged + export (from monitor start)": dataset_at - t_traffic,
            "train": state["steps"]["train"]["finished"] - state["steps"]["train"]["started"],
            "evaluate": state["steps"]["evaluate"]["finished"] - state["steps"]["evaluate"]["started"],
            "load": record["steps"]["load"]["finished"] - record["steps"]["load"]["started"],
            "route + rollout start": record["steps"]["rollout"]["finished"] - record["steps"]["route"]["started"],
            "canary to promotion": status["history"][-1]["at"] - status["history"][0]["at"],
            "total": t_end - t0,
        }
        print("\nloop scenario stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        print(
            f"held-out NLL/token: v1 {gate.baseline_nll:.3f}, v2 {gate.candidate_nll:.3f}, "
            f"delta {gate.delta:.3f} [{gate.ci_low:.3f}, {gate.ci_high:.3f}], {gate.examples} rows; "
            f"training {card.training.tokens_per_s:.0f} tokens/s"
        )


def test_weights_changed_after_the_gate_are_refused_and_v1_keeps_serving(engine, demo_model, tmp_path):
    """The same loop with a human approval; the candidate's weights change after the gate passed it
    and after it was approved: the pipeline refuses to load it (sha256), rejects it, and nothing a
    client sees changes."""
    with loop_world(engine, demo_model, tmp_path, name="guarded", require_approval=True, approval_poll_s=2) as w:
        before = w.routes.read_text()

        def outcome(*wanted):
            runs = healthz(w.monitor_port).get("pipelines") or []
            return runs[0] if runs and runs[0]["outcome"] in wanted else None

        run = wait_for("the gate to pass", lambda: outcome("waiting_approval", "failed", "rejected"), 420, w.logs)
        assert run["outcome"] == "waiting_approval", run
        v2 = w.registry / run["version"]
        Registry(w.registry).approve(v2, by="test")
        weights = v2 / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
        run = wait_for("the pipeline to end", lambda: outcome("deployed", "failed", "rejected"), 60, w.logs)
        assert run["outcome"] == "rejected" and run["steps"]["load"] == "failed", run
        card = read_card(v2)
        assert card.state == "rejected" and "changed after registration" in card.history[-1].reason
        assert [(e.step, e.result) for e in card.events] == [
            ("pipeline", "waiting"),
            ("pipeline", "ok"),
            ("load", "rejected"),
        ]
        assert w.routes.read_text() == before and healthz(w.monitor_port)["rollouts"] == {}
        models = {m["id"] for m in httpx.get(f"{engine}/v1/models", timeout=10).json()["data"]}
        assert card.served_name not in models
        assert served_variants(w.url, 6) == {"v1"}
        assert read_card(w.v1).state == "stable"

"""The loop's foundations on real parts: registry -> LoRA training (PEFT, CPU) -> evaluation gate on vLLM.

One scenario: v1 (the demo adapter a1, registered as stable) serves a route; a dataset of a new,
distinctive topic (license texts from the disk, split into prompt/continuation pairs) comes in; v2
is trained from v1's weights and must beat v1 on the held-out split with an interval that
excludes zero. Bad candidates: weights changed after registration are refused before loading,
a worse adapter is rejected by the gate and can never be approved or routed to. Bad input to
training fails fast with a clear message and leaves the registry untouched.

The resumable pipeline (train -> evaluate -> approval) is killed mid-training and run again: the
interrupted step runs again, no finished step repeats, one pipeline per route.

Training and the CLI run in child processes: torch stays out of the test process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loragate.common.registry import read_card
from tests.processes import ROOT

LICENSES = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic"]
DEMO_LR = "3e-2"  # the demo model has random weights: it needs a large step to move in a minute


def loragate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loragate", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def license_dataset(path: Path, rows: int = 200, prompt_words: int = 24, answer_words: int = 32) -> int:
    """Real text from the disk: each row asks to continue a license passage; the answer is the next words."""
    records = []
    for name in LICENSES:
        words = Path("/usr/share/common-licenses", name).read_text(errors="replace").split()
        step = prompt_words + answer_words
        for i in range(0, len(words) - step, step):
            records.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": f"Continue the {name} license: " + " ".join(words[i : i + prompt_words]),
                        },
                        {"role": "assistant", "content": " ".join(words[i + prompt_words : i + step])},
                    ]
                }
            )
    random.Random(0).shuffle(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:rows]))
    return min(rows, len(records))


def engine_models(engine: str) -> set[str]:
    with urllib.request.urlopen(f"{engine}/v1/models", timeout=10) as resp:
        return {m["id"] for m in json.load(resp)["data"]}


@pytest.fixture(scope="module")
def loop(demo_model, tmp_path_factory):
    """v1 registered as stable, v2 trained from it on the license dataset."""
    work = tmp_path_factory.mktemp("loop")
    registry = work / "registry"
    dataset = work / "licenses.jsonl"
    rows = license_dataset(dataset)
    base = demo_model["base"]
    registered = loragate(
        "adapters",
        "register",
        demo_model["adapters"]["a1"],
        "--registry",
        str(registry),
        "--name",
        "support",
        "--version",
        "v1",
        "--base-model",
        base,
        "--state",
        "stable",
    )
    assert registered.returncode == 0, registered.stderr
    trained = loragate(
        "train",
        "--dataset",
        str(dataset),
        "--base-model",
        base,
        "--parent",
        str(registry / "support" / "v1"),
        "--registry",
        str(registry),
        "--name",
        "support",
        "--version",
        "v2",
        "--seed",
        "7",
        "--held-out-share",
        "0.2",
        "--epochs",
        "2",
        "--lr",
        DEMO_LR,
        "--trigger",
        '{"run_id": "drift-42", "reason": "input drift"}',
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "train support/v2" in trained.stderr  # the progress bar
    summary = json.loads(trained.stdout)
    return {"registry": registry, "dataset": dataset, "rows": rows, "base": base, "summary": summary, "work": work}


def test_v2_learned_the_new_topic_and_passes_the_gate(loop, engine):
    registry, v2 = loop["registry"], loop["registry"] / "support" / "v2"
    card = read_card(v2)
    # lineage in the card
    assert card.state == "candidate" and card.parent == "support/v1"
    assert card.base.sha256 == read_card(registry / "support" / "v1").base.sha256
    assert card.peft.r == 8 and card.peft.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert card.data.rows == loop["rows"] and card.data.train_rows + card.data.held_out_rows == loop["rows"]
    assert card.data.trigger == {"run_id": "drift-42", "reason": "input drift"}
    assert card.training.seed == 7 and card.training.steps > 0 and card.training.loss_last < card.training.loss_first
    assert card.training.command[:2] == ["loragate", "train"]
    log = [json.loads(line) for line in (v2 / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == card.training.steps and log[-1]["step"] == card.training.steps
    # the held-out split: its prompts were never trained on
    held = [json.loads(line) for line in (v2 / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == card.data.held_out_rows >= 30
    everything = [json.loads(line) for line in loop["dataset"].read_text().splitlines()]
    held_prompts = {json.dumps(r["messages"][:-1]) for r in held}
    trained_on = [r for r in everything if json.dumps(r["messages"][:-1]) not in held_prompts]
    assert len(trained_on) == card.data.train_rows

    result = loragate(
        "evaluate", "--candidate", str(v2), "--baseline", str(registry / "support" / "v1"), "--engine", engine
    )
    assert result.returncode == 0, result.stderr
    evaluation = json.loads(result.stdout)
    print(
        "gate v2 vs v1:",
        {
            k: evaluation[k]
            for k in ("candidate_nll", "baseline_nll", "delta", "ci_low", "ci_high", "candidate_f1", "baseline_f1")
        },
    )
    assert evaluation["verdict"] == "pass" and evaluation["examples"] == len(held)
    assert evaluation["ci_high"] < 0  # measurably lower NLL, not only "not worse"
    assert evaluation["candidate_nll"] < evaluation["baseline_nll"] - 0.05
    card = read_card(v2)
    assert card.state == "candidate" and card.verdict == "pass" and card.evaluations[0].baseline == "support/v1"
    # both were unloaded after scoring (nothing of the gate's is left on the engine)
    assert not {"support-v1", "support-v2"} & engine_models(engine)
    approved = loragate("adapters", "approve", "support/v2", "--registry", str(registry), "--by", "alice")
    assert approved.returncode == 0, approved.stderr
    assert read_card(v2).approval.by == "alice"


def test_changed_weights_are_refused_before_loading(loop, engine):
    registry, v2 = loop["registry"], loop["registry"] / "support" / "v2"
    registered = loragate(
        "adapters",
        "register",
        str(v2),
        "--registry",
        str(registry),
        "--name",
        "support",
        "--version",
        "v3",
        "--base-model",
        loop["base"],
        "--state",
        "candidate",
    )
    assert registered.returncode == 0, registered.stderr
    v3 = registry / "support" / "v3"
    weights = v3 / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x40  # a flipped bit in a tensor
    weights.write_bytes(bytes(data))
    result = loragate(
        "evaluate",
        "--candidate",
        str(v3),
        "--baseline",
        str(registry / "support" / "v1"),
        "--data",
        str(v2 / "heldout.jsonl"),
        "--engine",
        engine,
    )
    assert result.returncode == 1 and "changed after registration" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    card = read_card(v3)
    assert card.state == "rejected" and card.history[-1].by == "gate" and not card.evaluations
    assert "support-v3" not in engine_models(engine)


def test_a_worse_candidate_is_rejected_for_good(loop, engine, demo_model):
    registry, v2 = loop["registry"], loop["registry"] / "support" / "v2"
    registered = loragate(
        "adapters",
        "register",
        demo_model["adapters"]["a2"],
        "--registry",
        str(registry),
        "--name",
        "support",
        "--version",
        "v4",
        "--base-model",
        loop["base"],
        "--state",
        "candidate",
    )
    assert registered.returncode == 0, registered.stderr
    v4 = registry / "support" / "v4"
    result = loragate(
        "evaluate",
        "--candidate",
        str(v4),
        "--baseline",
        str(v2),
        "--data",
        str(v2 / "heldout.jsonl"),
        "--engine",
        engine,
        "--generate-tokens",
        "0",
    )
    assert result.returncode == 1, result.stderr
    evaluation = json.loads(result.stdout)
    assert evaluation["verdict"] == "fail" and evaluation["ci_low"] > evaluation["margin"]
    card = read_card(v4)
    assert card.state == "rejected" and card.evaluations[-1].verdict == "fail"
    refused = loragate("adapters", "approve", "support/v4", "--registry", str(registry))
    assert refused.returncode == 1 and "rejected" in refused.stderr
    listed = loragate("adapters", "list", "--registry", str(registry))
    states = {line.split()[1]: line.split()[2] for line in listed.stdout.splitlines()[1:]}
    assert states["v1"] == "stable" and states["v4"] == "rejected"


def test_bad_training_input_fails_fast_and_writes_nothing(loop, tmp_path):
    registry, base = loop["registry"], loop["base"]
    before = sorted(p.relative_to(registry) for p in registry.rglob("*"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(
        '{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n'
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}\n'
    )
    common = ["--registry", str(registry), "--name", "support", "--version", "v9", "--no-progress"]

    no_rows = loragate("train", "--dataset", str(empty), "--base-model", base, *common)
    assert no_rows.returncode == 2 and "no usable rows (3 line(s)" in no_rows.stderr, no_rows.stderr

    other_base = tmp_path / "other-base"
    shutil.copytree(base, other_base)
    config = json.loads((other_base / "config.json").read_text())
    config["rope_theta"] = 5000.0
    (other_base / "config.json").write_text(json.dumps(config))
    mismatch = loragate(
        "train",
        "--dataset",
        str(loop["dataset"]),
        "--base-model",
        str(other_base),
        "--parent",
        str(registry / "support" / "v1"),
        *common,
    )
    assert mismatch.returncode == 2 and "was trained on base model" in mismatch.stderr, mismatch.stderr

    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    unwritable = loragate(
        "train",
        "--dataset",
        str(loop["dataset"]),
        "--base-model",
        base,
        "--registry",
        str(blocked / "registry"),
        "--name",
        "support",
        "--version",
        "v9",
    )
    assert unwritable.returncode == 2 and "not writable" in unwritable.stderr, unwritable.stderr

    exists = loragate("train", "--dataset", str(loop["dataset"]), "--base-model", base, *common[:4], "--version", "v2")
    assert exists.returncode == 2 and "already exists" in exists.stderr

    for result in (no_rows, mismatch, unwritable, exists):
        assert "Traceback" not in result.stderr
    assert sorted(p.relative_to(registry) for p in registry.rglob("*")) == before  # nothing half-written


def test_pipeline_resumes_after_a_kill_and_never_repeats_a_step(loop, engine, tmp_path):
    registry = loop["registry"]
    state = tmp_path / "pipeline-support.json"
    args = [
        "pipeline",
        "run",
        "--state-file",
        str(state),
        "--route",
        "support",
        "--dataset",
        str(loop["dataset"]),
        "--base-model",
        loop["base"],
        "--registry",
        str(registry),
        "--name",
        "support",
        "--version",
        "v5",
        "--stable",
        str(registry / "support" / "v1"),
        "--engine",
        engine,
        "--seed",
        "3",
        "--require-approval",
        "--train-arg=--max-steps=8",
        f"--train-arg=--lr={DEMO_LR}",
        "--evaluate-arg=--generate-tokens=0",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "loragate", *args],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if state.exists() and json.loads(state.read_text())["steps"]["train"]["status"] == "running":
                break
            time.sleep(0.05)
        else:
            pytest.fail("the pipeline never started training")
        other = tmp_path / "pipeline-support-2.json"  # another run for the same route: refused while one runs
        busy = loragate(*[other if a == str(state) else "v6" if a == "v5" else a for a in map(str, args)])
        assert busy.returncode == 4 and "is running" in busy.stderr, busy.stderr
        assert not other.exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the monitor (and its training child) die mid-training
        first.wait()
    assert not (registry / "support" / "v5").exists()

    resumed = loragate(*args, timeout=900)
    assert resumed.returncode == 3, resumed.stderr  # passed the gate, waits for a human
    after = json.loads(state.read_text())
    assert after["outcome"] == "waiting_approval"
    assert after["steps"]["train"]["status"] == "done" and after["steps"]["train"]["attempts"] == 2
    assert after["steps"]["evaluate"] == {
        **after["steps"]["evaluate"],
        "status": "done",
        "attempts": 1,
        "detail": "pass",
    }
    assert not list(registry.glob(".train-support-v5*"))  # registered: the work directory (checkpoints) is gone
    card = read_card(registry / "support" / "v5")
    assert card.state == "candidate" and card.verdict == "pass" and len(card.evaluations) == 1

    assert loragate("adapters", "approve", "support/v5", "--registry", str(registry)).returncode == 0
    done = loragate(*args)
    assert done.returncode == 0, done.stderr
    final = json.loads(state.read_text())
    assert final["outcome"] == "ready" and final["steps"]["approval"]["status"] == "done"
    for step in ("train", "evaluate"):  # finished steps were not run again
        assert final["steps"][step] == after["steps"][step]
    assert len(read_card(registry / "support" / "v5").evaluations) == 1
    again = loragate(*args)
    assert again.returncode == 0 and json.loads(state.read_text()) == final

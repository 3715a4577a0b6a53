"""loragate train on the tiny demo model, for real (CPU): a SIGKILLed run resumed from its checkpoint ends
where an uninterrupted one does, and two data-parallel processes (torchrun, gloo) take the same steps
as one process with twice the accumulation. Training runs in child processes (torch stays out of here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loragate.common.registry import read_card
from tests.integration.test_loop_train_eval import DEMO_LR, license_dataset
from tests.processes import ROOT


def adapter_tensors(directory: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def losses(directory: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (directory / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(demo_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    dataset = work / "licenses.jsonl"
    license_dataset(dataset, rows=60)
    return {"base": demo_model["base"], "dataset": dataset, "registry": work / "registry"}


def command(setup, version: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "loragate",
        "train",
        "--dataset",
        str(setup["dataset"]),
        "--base-model",
        setup["base"],
        "--registry",
        str(setup["registry"]),
        "--name",
        "s",
        "--version",
        version,
        "--seed",
        "5",
        "--epochs",
        "2",
        "--lr",
        DEMO_LR,
        "--batch-size",
        "8",
        "--no-progress",
        *extra,
    ]


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    import numpy as np

    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        np.testing.assert_allclose(ta[key], tb[key], atol=atol, rtol=0, err_msg=key)


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(setup):
    registry = setup["registry"]
    straight = run(command(setup, "straight", "--checkpoint-every", "3"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    total = json.loads(straight.stdout)["steps"]
    assert total == 12  # 48 training rows / 8 a step x 2 epochs

    args = command(setup, "killed", "--checkpoint-every", "3")
    work = registry / ".train-s-killed"
    child = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:  # past the checkpoint at step 6, before the end
        log = work / "train_log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the run ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    steps_at_kill = len((work / "train_log.jsonl").read_text().splitlines())
    assert 8 <= steps_at_kill < total
    assert not (registry / "s" / "killed").exists()

    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    card = read_card(registry / "s" / "killed")
    assert card.training is not None
    last = 3 * (steps_at_kill // 3)  # or the one before, if the kill came while it was being written
    assert card.training.checkpoints_resumed in ([last], [last - 3])
    assert summary["steps"] == total and card.training.steps == total
    assert not work.exists()  # registered: the checkpoints are gone

    straight_dir = registry / "s" / "straight"
    assert losses(straight_dir) == pytest.approx(losses(registry / "s" / "killed"), abs=1e-4)
    assert_same_adapter(straight_dir, registry / "s" / "killed", atol=1e-5)


def test_sigterm_saves_a_checkpoint_and_exits_143_then_the_same_command_finishes(setup):
    registry = setup["registry"]
    args = command(setup, "termed", "--checkpoint-every", "0")
    work = registry / ".train-s-termed"
    child = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        log = work / "train_log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    twin = run(args, timeout=120)  # the same version twice at once: refused, the running one untouched
    assert twin.returncode == 2 and twin.stderr.strip() == (
        f"loragate: another run is training s/termed in {registry}"
    ), twin.stderr
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM at step" in err and "Traceback" not in err
    saved = sorted(p.name for p in (work / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].startswith("step-")
    other = run([*args, "--lr", "1e-3"])  # another learning rate would not end where the first run would
    assert other.returncode == 2 and "from a run with other data or options" in other.stderr, other.stderr[-2000:]
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_card(registry / "s" / "termed").training.checkpoints_resumed == [int(saved[0][5:])]


def test_two_processes_take_the_same_steps_as_one_with_twice_the_accumulation(setup):
    registry = setup["registry"]
    one = run(command(setup, "one", "--micro-batch-size", "2", "--max-steps", "4"))
    assert one.returncode == 0, one.stderr[-2000:]
    env_free = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    two = subprocess.run(
        command(setup, "two", "--micro-batch-size", "2", "--max-steps", "4", "--processes", "2"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env_free,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    card_one, card_two = read_card(registry / "s" / "one"), read_card(registry / "s" / "two")
    assert card_one.training.accumulation == 4 and card_one.training.processes == 1
    assert card_two.training.accumulation == 2 and card_two.training.processes == 2
    assert card_one.training.effective_batch == card_two.training.effective_batch == 8
    assert losses(registry / "s" / "one") == pytest.approx(losses(registry / "s" / "two"), abs=1e-4)
    assert_same_adapter(registry / "s" / "one", registry / "s" / "two", atol=1e-4)


def test_an_evicted_pipeline_leaves_training_running_and_the_retry_resumes_it(setup, tmp_path):
    """What a training Job's pod sees on eviction: SIGTERM to `loragate pipeline run` (the container's first
    process) reaches its training child, which checkpoints; the pipeline exits 143 without recording a
    failure; the retried pod's same command resumes training from the checkpoint (the gate then fails here:
    no engine at that address, which is not what this test is about)."""
    registry = setup["registry"]
    stable = registry / "s" / "straight"
    if not stable.exists():
        assert run(command(setup, "straight")).returncode == 0
    state = tmp_path / "pipeline.json"
    args = [
        sys.executable,
        "-m",
        "loragate",
        "pipeline",
        "run",
        "--state-file",
        str(state),
        "--route",
        "s",
        "--dataset",
        str(setup["dataset"]),
        "--base-model",
        setup["base"],
        "--registry",
        str(registry),
        "--name",
        "s",
        "--version",
        "evicted",
        "--stable",
        str(stable),
        "--engine",
        "http://127.0.0.1:9",
        "--seed",
        "5",
        f"--train-arg=--lr={DEMO_LR}",
        "--train-arg=--epochs=2",
        "--train-arg=--checkpoint-every=0",
    ]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = registry / ".train-s-evicted" / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM: run again to resume" in err
    record = json.loads(state.read_text())
    assert record["steps"]["train"]["status"] == "running" and record["outcome"] == "running"
    assert not (registry / "s" / "evicted").exists()

    retried = run(args)
    assert json.loads(state.read_text())["steps"]["train"]["status"] == "done", retried.stderr[-2000:]
    card = read_card(registry / "s" / "evicted")
    assert len(card.training.checkpoints_resumed) == 1 and card.training.steps == 12

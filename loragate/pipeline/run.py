"""One retraining pipeline for one route: train -> evaluate -> (approval), resumable, one at a time.

Each step runs as a child process (``loragate train``, ``loragate evaluate``: torch never enters
the caller) and its record (status, start, end, detail) is written atomically to a state file
before and after it runs. A run started again after a crash skips finished steps and settles an
interrupted one from what it left behind: a training whose version is in the registry is done
(registration is one rename), an evaluation recorded in the card is done; otherwise the step runs
again. A lock file per route (in the state file's directory) keeps a second pipeline for the same
route out, whichever state file it uses.

The outcome is ``ready`` (passed, approved if approval is required), ``waiting_approval``,
``rejected`` (the gate failed it or refused its files) or ``failed`` (bad input, engine down).
Loading the adapter on the replicas and starting its rollout come after ``ready`` (not built yet).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from loragate.common.atomicio import atomic_write
from loragate.common.registry import Registry, RegistryError, check_name, read_card
from loragate.pipeline.launch import run_forwarding_sigterm

Status = Literal["pending", "running", "done", "failed"]
STEPS = ("train", "evaluate", "approval")


class PipelineBusy(RuntimeError):
    pass


class PipelineInterrupted(RuntimeError):
    """SIGTERM during a step: nothing is recorded as failed; running again resumes."""


class PipelineSpec(BaseModel):
    route: str
    dataset: str
    base_model: str
    registry: str
    name: str
    version: str
    stable: str  # the stable version's directory: the parent and the gate's baseline
    engine: str
    seed: int = 0
    train_args: list[str] = Field(default_factory=list)  # extra `loragate train` flags (--epochs, --lr, ...)
    evaluate_args: list[str] = Field(default_factory=list)
    require_approval: bool = False


class StepRecord(BaseModel):
    status: Status = "pending"
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    detail: str = ""


class PipelineState(BaseModel):
    spec: PipelineSpec
    outcome: Literal["running", "ready", "waiting_approval", "rejected", "failed"] = "running"
    steps: dict[str, StepRecord] = Field(default_factory=lambda: {s: StepRecord() for s in STEPS})


class Pipeline:
    def __init__(self, state_file: str | Path, spec: PipelineSpec | None = None) -> None:
        self.path = Path(state_file)
        if self.path.exists():
            self.state = PipelineState.model_validate_json(self.path.read_bytes())
            if spec is not None and spec != self.state.spec:
                raise ValueError(
                    f"{self.path} holds another pipeline ({self.state.spec.name}/"
                    f"{self.state.spec.version} for route {self.state.spec.route})"
                )
        elif spec is None:
            raise ValueError(f"no pipeline state at {self.path}")
        else:
            self.state = PipelineState(spec=spec)
        self.target = Registry(self.state.spec.registry).directory(self.state.spec.name, self.state.spec.version)

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.state.model_dump(mode="json"), indent=2) + "\n")

    def run(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One lock per route in the state directory: runs of one route (one state file each) never overlap.
        with open(self.path.parent / f".{check_name('route', self.state.spec.route)}.pipeline.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PipelineBusy(f"a pipeline for route {self.state.spec.route} is running ({self.path})") from None
            if self.state.outcome in ("ready", "rejected", "failed"):
                return self.state.outcome
            self.state.outcome = "running"
            for step in STEPS:
                record = self.state.steps[step]
                if record.status == "done":
                    continue
                if record.status == "running" and self._finished_before(step, record):
                    self._mark(step, "done", "finished before the restart")
                    continue
                outcome = getattr(self, f"_{step}")(record)
                if outcome is not None:
                    self.state.outcome = outcome
                    self.save()
                    return outcome
            self.state.outcome = "ready"
            self.save()
            return "ready"

    # --- steps: each returns None to go on, or the pipeline's outcome ---------------------------

    def _finished_before(self, step: str, record: StepRecord) -> bool:
        try:
            card = read_card(self.target)
        except RegistryError:
            return False
        if step == "train":
            return True  # the version exists: registration is the training's last act
        if step == "evaluate":
            return any(e.at >= (record.started or 0) for e in card.evaluations) or card.state == "rejected"
        return False

    def _train(self, record: StepRecord) -> str | None:
        spec = self.state.spec
        self._clean_leftovers()
        self._mark("train", "running")
        result, terminated = run_forwarding_sigterm(
            [
                sys.executable,
                "-m",
                "loragate",
                "train",
                "--dataset",
                spec.dataset,
                "--base-model",
                spec.base_model,
                "--parent",
                spec.stable,
                "--registry",
                spec.registry,
                "--name",
                spec.name,
                "--version",
                spec.version,
                "--seed",
                str(spec.seed),
                "--no-progress",
                *spec.train_args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if terminated or result.returncode == 143:
            # Evicted: training saved a checkpoint; the step stays "running" so the next attempt (the Job's
            # retried pod, or the same command) resumes it instead of recording a failure.
            raise PipelineInterrupted(f"training of {spec.name}/{spec.version} stopped by SIGTERM: run again to resume")
        if result.returncode != 0:
            self._mark("train", "failed", _last_line(result.stderr))
            return "failed"
        self._mark("train", "done", _last_line(result.stdout))
        return None

    def _clean_leftovers(self) -> None:
        """Staging directories of this version that a killed run left in the registry (its work directory,
        ``.train-NAME-VERSION``, holds the checkpoints `loragate train` resumes from: it stays)."""
        import shutil

        spec = self.state.spec
        root = Registry(spec.registry).root
        for path in root.glob(f".staging-{spec.name}-{spec.version}-*"):
            shutil.rmtree(path, ignore_errors=True)

    def _evaluate(self, record: StepRecord) -> str | None:
        spec = self.state.spec
        self._mark("evaluate", "running")
        result = _loragate(
            [
                "evaluate",
                "--candidate",
                str(self.target),
                "--baseline",
                spec.stable,
                "--engine",
                spec.engine,
                *spec.evaluate_args,
            ]
        )
        if result.returncode == 0:
            self._mark("evaluate", "done", "pass")
            return None
        rejected = _card_state(self.target) == "rejected"
        self._mark("evaluate", "done" if rejected else "failed", _last_line(result.stderr) or "fail")
        return "rejected" if rejected else "failed"

    def _approval(self, record: StepRecord) -> str | None:
        if not self.state.spec.require_approval:
            self._mark("approval", "done", "not required")
            return None
        card = read_card(self.target)
        if card.approval is None:
            self._mark("approval", "pending", "waiting for `loragate adapters approve`")
            return "waiting_approval"
        self._mark("approval", "done", f"approved by {card.approval.by}")
        return None

    def _mark(self, step: str, status: Status, detail: str = "") -> None:
        record = self.state.steps[step]
        now = time.time()
        if status == "running":
            record.started, record.finished, record.attempts = now, None, record.attempts + 1
        elif status in ("done", "failed"):
            record.finished = now
        record.status, record.detail = status, detail
        self.save()


def _loragate(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loragate", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _card_state(directory: Path) -> str | None:
    try:
        return read_card(directory).state
    except RegistryError:
        return None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def status(state_file: str | Path) -> dict[str, Any]:
    return Pipeline(state_file).state.model_dump(mode="json")

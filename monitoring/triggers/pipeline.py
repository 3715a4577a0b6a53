"""The pipeline action: a firing trigger retrains the route's adapter and rolls the new version out.

Steps, after the dataset action exported the window:

1. ``pipeline``: ``loragate pipeline run`` as a child process (train from the stable version ->
   evaluation gate -> approval when required), its output in ``STATE_DIR/ROUTE-RUN.log``. That
   command keeps its own step records and a lock per route; run again, it never repeats a finished
   step. Exit 3 (waiting for approval) and 4 (another run holds the route) are retried every
   ``approval_poll_s``; 1 (rejected by the gate) and 2 (failed) end the run, the route untouched.
2. ``load``: ``POST /v1/load_lora_adapter`` on every engine replica (already loaded counts as done).
   Here and before step 3 the files are verified against the card: a mismatch rejects the version.
3. ``route``: the version is added to the route with weight 0 (the rollout controller's routes
   source), ``card:`` naming its registry card (the gateway checks it).
4. ``rollout``: a rollout of the version over the route's stable variant is added to the rollout
   controller (persisted in its state file); the cards follow it (monitoring/rollout/cards.py).

The run's own record (``STATE_DIR/ROUTE-RUN.monitor.json``) is written before and after each step;
a restarted monitor resumes every unfinished run (``resume``) and skips the steps recorded done.
Each step gives a log line, ``loragate_pipeline_step_total{route,step,result}`` and an event in the
version's card. One run per route at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loragate.common.atomicio import atomic_write
from loragate.common.catalog import CatalogError, parse_catalog
from loragate.common.registry import (
    AdapterCard,
    CardMismatch,
    Registry,
    RegistryError,
    check_name,
    read_card,
    verify,
)
from loragate.monitoring.triggers.action import ActionResult, TriggerContext

if TYPE_CHECKING:
    from loragate.monitoring.rollout.controller import RolloutController

log = logging.getLogger("loragate.pipeline")

STEPS = ("pipeline", "load", "route", "rollout")
EXIT = {0: "ready", 1: "rejected", 2: "failed", 3: "waiting_approval", 4: "busy"}


class PipelineSettings(BaseModel):
    """The ``pipeline:`` block of a ``type: pipeline`` action."""

    model_config = ConfigDict(extra="forbid")

    registry: str  # the adapter registry (loragate.common.registry)
    base_model: str  # the base model directory training loads
    state_dir: str  # run records, the pipeline command's state files and logs
    engines: list[str] = Field(min_length=1)  # every engine replica the new version is loaded on
    evaluation_engine: str | None = None  # the gate's engine (default: the first of engines)
    name: str | None = None  # the adapter's name in the registry (default: the route)
    require_approval: bool = False  # the rollout waits for `loragate adapters approve`
    approval_poll_s: float = Field(30.0, gt=0)
    seed: int = 0
    train_args: list[str] = Field(default_factory=list)  # extra `loragate train` flags, e.g. --lr=3e-2
    evaluate_args: list[str] = Field(default_factory=list)
    rollout: dict[str, Any] = Field(default_factory=dict)  # CanaryConfig fields: steps, interval_s, judge, ...
    load_timeout_s: float = Field(120.0, gt=0)

    @field_validator("rollout")
    @classmethod
    def _rollout(cls, value: dict[str, Any]) -> dict[str, Any]:
        from loragate.monitoring.rollout.config import CanaryConfig

        fixed = {"route", "stable", "canary", "canary_card", "stable_card"} & set(value)
        if fixed:
            raise ValueError(f"rollout: {sorted(fixed)} are set by the pipeline")
        CanaryConfig.model_validate({**value, "route": "r", "stable": "a", "canary": "b"})
        return value


class StepRecord(BaseModel):
    status: Literal["pending", "running", "done", "failed"] = "pending"
    started: float | None = None
    finished: float | None = None
    detail: str = ""


class RunRecord(BaseModel):
    route: str
    run_id: str
    name: str
    version: str
    card: str  # the new version's directory in the registry
    stable_card: str
    stable_variant: str
    state_file: str  # the pipeline command's
    args: list[str]  # the pipeline command's arguments (a resumed run passes the same)
    outcome: Literal["running", "waiting_approval", "deployed", "rejected", "failed"] = "running"
    steps: dict[str, StepRecord] = Field(default_factory=lambda: {s: StepRecord() for s in STEPS})


class PipelineMetrics:
    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.steps = Counter(
            "loragate_pipeline_step_total",
            "Pipeline action steps, by result.",
            ["route", "step", "result"],
            registry=registry or CollectorRegistry(),
        )


class PipelineAction:
    name = "pipeline"

    def __init__(
        self,
        settings: PipelineSettings,
        rollouts: "RolloutController | None",
        metrics: PipelineMetrics | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.rollouts = rollouts
        self.metrics = metrics or PipelineMetrics()
        self.command = command or [sys.executable, "-m", "loragate", "pipeline", "run"]
        self.dir = Path(settings.state_dir)
        self.tasks: dict[str, asyncio.Task] = {}  # route -> the run being driven

    # --- start ---------------------------------------------------------------------------------

    async def run(self, ctx: TriggerContext) -> ActionResult:
        if self.rollouts is None:
            return ActionResult(self.name, False, "the pipeline action needs a rollouts section (its routes source)")
        busy = self._busy(ctx.route)
        if busy:
            return ActionResult(self.name, False, busy)
        if not ctx.dataset_location:
            return ActionResult(self.name, False, "no dataset: a dataset action must run before the pipeline")
        try:
            record = await asyncio.to_thread(self._new_run, ctx)
        except (RegistryError, CatalogError, ValueError, OSError) as exc:
            return ActionResult(self.name, False, str(exc))
        self._save(record)
        self._drive(record)
        return ActionResult(
            self.name, True, f"pipeline {record.name}/{record.version} for {ctx.route} started ({self._path(record)})"
        )

    def _busy(self, route: str) -> str | None:
        task = self.tasks.get(route)
        if task is not None and not task.done():
            return f"a pipeline for route {route} is running"
        for record in self._records():
            if record.route == route and record.outcome in ("running", "waiting_approval"):
                return f"a pipeline for route {route} is unfinished ({self._path(record)})"
        if self.rollouts is not None:
            try:
                rollout = self.rollouts.store.load().get(route)
            except Exception as exc:  # an unreadable rollout state: no new version until it is fixed
                return f"rollout state unreadable: {exc}"
            if rollout is not None and rollout.state == "progressing":
                return f"a rollout of {rollout.canary} over {rollout.stable} on route {route} is progressing"
        return None

    def _new_run(self, ctx: TriggerContext) -> RunRecord:
        s = self.settings
        name = check_name("name", s.name or ctx.route)
        version = check_name("version", f"r{ctx.run_id}")
        registry = Registry(s.registry)
        stable = _stable_card(registry, name)
        stable_dir = registry.directory(stable.name, stable.version)
        stable_variant = self._stable_variant(ctx.route, stable, stable_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        state_file = self.dir / f"{ctx.route}-{ctx.run_id}.json"
        args = [
            "--state-file",
            str(state_file),
            "--route",
            ctx.route,
            "--dataset",
            ctx.dataset_location or "",
            "--base-model",
            s.base_model,
            "--registry",
            s.registry,
            "--name",
            name,
            "--version",
            version,
            "--stable",
            str(stable_dir),
            "--engine",
            s.evaluation_engine or s.engines[0],
            "--seed",
            str(s.seed),
            *(["--require-approval"] if s.require_approval else []),
            *[f"--train-arg={a}" for a in (*_lineage(ctx), *s.train_args)],
            *[f"--evaluate-arg={a}" for a in s.evaluate_args],
        ]
        return RunRecord(
            route=ctx.route,
            run_id=ctx.run_id,
            name=name,
            version=version,
            card=str(registry.directory(name, version)),
            stable_card=str(stable_dir),
            stable_variant=stable_variant,
            state_file=str(state_file),
            args=args,
        )

    def _stable_variant(self, route: str, stable: AdapterCard, stable_dir: Path) -> str:
        """The route's variant that serves the stable version: by card, path, or adapter name."""
        assert self.rollouts is not None
        found = parse_catalog(self.rollouts.routes.read().text).routes.get(route)
        if found is None:
            raise ValueError(f"the routes source has no route {route!r}")
        wanted = {str(stable_dir.resolve()), str(Path(stable.artifact.location).resolve())}
        for variant in found.variants:
            where = variant.card or variant.path
            if where and str(Path(where.removeprefix("file://")).resolve()) in wanted:
                return variant.name
            if variant.adapter == stable.served_name:
                return variant.name
        raise ValueError(
            f"route {route!r} has no variant serving the stable version {stable.ref} "
            f"(card or path {stable_dir}, or adapter {stable.served_name})"
        )

    # --- resume --------------------------------------------------------------------------------

    def resume(self) -> list[str]:
        """Drive every unfinished run again (at monitor start); returns their routes."""
        resumed = []
        for record in self._records():
            if record.outcome in ("running", "waiting_approval") and record.route not in self.tasks:
                log.warning("pipeline %s %s/%s: resumed after a restart", record.route, record.name, record.version)
                self._drive(record)
                resumed.append(record.route)
        return resumed

    def records(self) -> list[RunRecord]:
        return self._records()

    def _records(self) -> list[RunRecord]:
        found = []
        for path in sorted(self.dir.glob("*.monitor.json")) if self.dir.is_dir() else []:
            try:
                found.append(RunRecord.model_validate_json(path.read_bytes()))
            except (OSError, ValueError) as exc:
                log.error("pipeline record %s unreadable: %s", path, exc)
        return found

    # --- the steps -----------------------------------------------------------------------------

    def _drive(self, record: RunRecord) -> None:
        self.tasks[record.route] = asyncio.get_running_loop().create_task(self._steps(record))

    async def _steps(self, record: RunRecord) -> RunRecord:
        for step in STEPS:
            if record.steps[step].status == "done":
                continue
            self._mark(record, step, "running")
            try:
                outcome, detail = await getattr(self, f"_{step}")(record)
            except Exception as exc:  # a step's failure ends the run; the monitor goes on
                outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
            if outcome is not None:
                self._mark(record, step, "failed", detail, result=outcome)
                record.outcome = outcome
                self._save(record)
                return record
            self._mark(record, step, "done", detail)
        record.outcome = "deployed"
        self._save(record)
        return record

    async def _pipeline(self, record: RunRecord) -> tuple[str | None, str]:
        logfile = self.dir / f"{record.route}-{record.run_id}.log"
        while True:
            with open(logfile, "ab") as out:
                child = await asyncio.create_subprocess_exec(
                    *self.command, *record.args, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL
                )
                code = await child.wait()
            outcome = EXIT.get(code, "failed")
            if outcome == "ready":
                record.outcome = "running"
                return None, "passed the gate" + (", approved" if self.settings.require_approval else "")
            if outcome in ("rejected", "failed"):
                return outcome, f"loragate pipeline run: {outcome} (exit {code}; {logfile})"
            if record.outcome != "waiting_approval" and outcome == "waiting_approval":
                record.outcome = "waiting_approval"
                self._save(record)
                self._event(record, "pipeline", "waiting", "waiting for `loragate adapters approve`")
                log.warning(
                    "pipeline %s %s/%s: passed the gate, waiting for approval",
                    record.route,
                    record.name,
                    record.version,
                )
            await asyncio.sleep(self.settings.approval_poll_s)  # approval, or the route's lock held elsewhere

    async def _check_card(self, record: RunRecord) -> str | None:
        """The version's files against its card, before anything serves them; a mismatch rejects it for good."""
        try:
            await asyncio.to_thread(verify, read_card(record.card), record.card)
        except CardMismatch as exc:
            try:
                Registry(self.settings.registry).transition(
                    record.card, "rejected", by="loragate-pipeline", reason=str(exc)
                )
            except RegistryError as again:
                log.error("pipeline %s: cannot reject %s: %s", record.route, record.card, again)
            return str(exc)
        return None

    async def _load(self, record: RunRecord) -> tuple[str | None, str]:
        import httpx

        mismatch = await self._check_card(record)
        if mismatch:
            return "rejected", mismatch
        served = f"{record.name}-{record.version}"
        async with httpx.AsyncClient(timeout=self.settings.load_timeout_s) as client:
            for engine in self.settings.engines:
                resp = await client.post(
                    f"{engine.rstrip('/')}/v1/load_lora_adapter", json={"lora_name": served, "lora_path": record.card}
                )
                if resp.status_code != 200 and "already" not in resp.text:
                    return "failed", f"{engine}: load_lora_adapter {resp.status_code}: {resp.text[:300]}"
        return None, f"{served} loaded on {len(self.settings.engines)} replica(s)"

    async def _route(self, record: RunRecord) -> tuple[str | None, str]:
        assert self.rollouts is not None
        mismatch = await self._check_card(record)
        if mismatch:
            return "rejected", mismatch
        entry = {
            "name": record.version,
            "adapter": f"{record.name}-{record.version}",
            "path": record.card,
            "card": record.card,
        }
        added = await self.rollouts.add_variant(record.route, entry)
        return None, f"variant {record.version} {'added' if added else 'already'} at weight 0"

    async def _rollout(self, record: RunRecord) -> tuple[str | None, str]:
        from loragate.monitoring.rollout.config import CanaryConfig

        assert self.rollouts is not None
        spec = CanaryConfig.model_validate(
            {
                **self.settings.rollout,
                "route": record.route,
                "stable": record.stable_variant,
                "canary": record.version,
                "canary_card": record.card,
                "stable_card": record.stable_card,
            }
        )
        status = await self.rollouts.add(spec)
        return None, f"rollout of {record.version} over {record.stable_variant} at {status.weight:g}%"

    # --- records -------------------------------------------------------------------------------

    def _mark(self, record: RunRecord, step: str, status: str, detail: str = "", result: str | None = None) -> None:
        entry = record.steps[step]
        now = time.time()
        if status == "running":
            entry.started, entry.finished = now, None
        else:
            entry.finished = now
        entry.status, entry.detail = status, detail  # type: ignore[assignment]
        self._save(record)
        if status == "running":
            log.info("pipeline %s %s/%s: %s started", record.route, record.name, record.version, step)
            return
        result = result or ("ok" if status == "done" else "failed")
        self.metrics.steps.labels(record.route, step, result).inc()
        (log.info if status == "done" else log.error)(
            "pipeline %s %s/%s: %s %s: %s", record.route, record.name, record.version, step, result, detail
        )
        self._event(record, step, result, detail)

    def _event(self, record: RunRecord, step: str, result: str, detail: str) -> None:
        if not (Path(record.card) / "card.json").is_file():
            return  # training failed before the version existed: the run record has it
        try:
            Registry(self.settings.registry).record(record.card, step, result, detail)
        except (RegistryError, OSError) as exc:
            log.error("pipeline %s: cannot record %s in %s: %s", record.route, step, record.card, exc)

    def _path(self, record: RunRecord) -> Path:
        return self.dir / f"{record.route}-{record.run_id}.monitor.json"

    def _save(self, record: RunRecord) -> None:
        atomic_write(self._path(record), json.dumps(record.model_dump(mode="json"), indent=2) + "\n")


def _stable_card(registry: Registry, name: str) -> AdapterCard:
    """The version of ``name`` that is stable now (the latest to become stable, if several)."""
    stable = [c for c in registry.cards() if c.name == name and c.state == "stable"]
    if not stable:
        raise RegistryError(
            f"no stable version of {name!r} in {registry.location}: register one "
            "(`loragate adapters register --state stable`) to train from"
        )
    return max(stable, key=lambda c: max((h.at for h in c.history if h.state == "stable"), default=0.0))


def _lineage(ctx: TriggerContext) -> list[str]:
    """``loragate train`` flags that put the trigger behind this run into the card (data.trigger)."""
    trigger: dict[str, Any] = {
        "run_id": ctx.run_id,
        "route": ctx.route,
        "variant": ctx.variant,
        "dataset": ctx.dataset_location,
    }
    if ctx.decision is not None:
        trigger["reason"] = ctx.decision.reason
    if ctx.result is not None:
        trigger["report"] = ctx.result.json_path or ctx.result.html_path
    return [f"--trigger={json.dumps(trigger)}"]

"""Progressive delivery of adapter versions: canary analysis and the promote / roll-back state machine.

The vocabulary is Flagger's and Argo Rollouts'. A rollout moves one route's traffic from its
``stable`` variant to a ``canary`` variant in steps of canary weight (e.g. 5, 25, 50 %). Every
``interval_s`` the canary is analysed against the stable variant from the gateway's own metrics
in Prometheus, over the traffic since the step began (at most ``max_window_s``):

* inconclusive: fewer than ``min_requests`` requests were routed to the canary -> hold the step;
* fail: a check is past its threshold (``failure_limit`` analyses in a row) -> roll back
  (canary 0, stable 100), state ``rolled_back``;
* pass -> the next step; a pass at the last step below 100 -> promote (canary 100, stable 0),
  state ``promoted``.

Checks (names of ``loragate_rollout_analysis{check}``):

  canary_requests      requests routed to the canary: answered by it + moved off it
  error_rate_increase  5xx share of the canary's routed requests minus the stable's
  latency_p95_ratio    p95 request duration, canary / stable (both raised to ``latency_floor_s``
                       first: ratios of a few milliseconds are noise)
  fallback_rate        share of the canary's routed requests moved to the fallback chain. A
                       failing adapter is hidden from clients by the fallback (they get a 200
                       from the base model): this is the check that catches it
  feedback_score       mean feedback score of the canary (only with ``min_feedback_score``, and
                       judged once ``min_feedback`` scores exist)

The weights go to the routes source the gateways watch: the routes YAML file (rewritten
atomically, validated with ``service.catalog.parse_catalog`` first) or, in a cluster, the routes
ConfigMap (patched with the official client, conditional on the resourceVersion read). The
state lives in a JSON file, re-read every round, so a restarted monitor resumes where it was and
``loragate rollout promote|rollback`` (another process) is seen by the running monitor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loragate.monitoring.routes_source import (
    RolloutError,
    RoutesConfigMap,
    RoutesConflict,
    RoutesFile,
    RoutesSource,
    atomic_write,
    current_weights,
    set_weights,
)
from loragate.common.catalog import CatalogError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("loragate.rollout")

STATES = ("progressing", "promoted", "rolled_back")
ACTIONS = ("step", "promote", "rollback", "hold")
CHECKS = ("canary_requests", "error_rate_increase", "latency_p95_ratio", "fallback_rate", "feedback_score")
HISTORY = 50  # transitions kept per rollout in the state file


# --- configuration -----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Thresholds(_Strict):
    max_error_rate_increase: float = Field(0.01, ge=0, description="canary 5xx share minus stable 5xx share")
    max_latency_p95_ratio: float = Field(1.5, gt=0, description="canary p95 / stable p95")
    latency_floor_s: float = Field(0.1, ge=0, description="both p95 values are raised to this before dividing")
    max_fallback_rate: float = Field(0.05, ge=0, le=1, description="share of canary traffic moved off it")
    min_feedback_score: float | None = Field(None, description="mean canary feedback score must be at least this")
    min_feedback: int = Field(20, ge=1, description="fewer canary scores: the feedback check is not judged")


class CanaryConfig(_Strict):
    route: str
    stable: str
    canary: str
    steps: list[float] = Field(default_factory=lambda: [5, 25, 50, 100])
    interval_s: float = Field(300, gt=0, description="time between two analyses (and the least time on a step)")
    min_requests: int = Field(50, ge=1, description="canary requests an analysis needs; fewer: hold")
    failure_limit: int = Field(1, ge=1, description="failing analyses in a row that roll back")
    max_window_s: float = Field(3600, gt=0, description="longest analysis window (the step's traffic so far)")
    thresholds: Thresholds = Field(default_factory=Thresholds)

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if not steps:
            raise ValueError("steps needs at least one canary weight")
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError(f"steps are canary weights in percent, 0 < w <= 100: {steps}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must increase: {steps}")
        return steps

    @model_validator(mode="after")
    def _two_variants(self) -> "CanaryConfig":
        if self.canary == self.stable:
            raise ValueError(f"canary and stable are both {self.canary!r}")
        return self


class ConfigMapRef(_Strict):
    name: str
    namespace: str = "default"
    key: str = "routes.yaml"


class RolloutsConfig(_Strict):
    # The routes source the gateways watch: the file (compose, one machine) or the ConfigMap (cluster).
    routes_file: str | None = None
    configmap: ConfigMapRef | None = None
    state_file: str = "rollout-state.json"
    canaries: list[CanaryConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> "RolloutsConfig":
        if (self.routes_file is None) == (self.configmap is None):
            raise ValueError("rollouts need exactly one routes source: routes_file or configmap")
        routes = [c.route for c in self.canaries]
        duplicates = sorted({r for r in routes if routes.count(r) > 1})
        if duplicates:
            raise ValueError(f"one rollout per route at a time; several for {duplicates}")
        return self


# --- state -------------------------------------------------------------------------------------

class RolloutStatus(BaseModel):
    route: str
    canary: str
    stable: str
    state: Literal["progressing", "promoted", "rolled_back"] = "progressing"
    step_index: int = 0
    weight: float = 0.0  # the canary's weight now, percent
    started_at: float = 0.0
    step_started_at: float = 0.0
    last_analysis_at: float | None = None
    failures: int = 0  # failing analyses in a row
    revision: int = 0  # bumped on every saved change: a concurrent writer is noticed
    last_analysis: dict[str, Any] | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)

    def record(self, action: str, now: float, reason: str) -> None:
        self.history = [*self.history, {"at": now, "action": action, "weight": self.weight,
                                        "state": self.state, "reason": reason}][-HISTORY:]


class RolloutStore:
    """Every rollout's status in one JSON file, written atomically (temp file + rename)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, RolloutStatus]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {route: RolloutStatus.model_validate(body) for route, body in data.get("rollouts", {}).items()}
        except (OSError, ValueError, ValidationError) as exc:
            raise RolloutError(f"rollout state {self.path} unreadable: {exc}") from None

    def check(self, route: str, expected_revision: int | None) -> None:
        """Raise when the stored status of ``route`` moved past ``expected_revision``."""
        stored = self.load().get(route)
        if stored is not None and expected_revision is not None and stored.revision != expected_revision:
            raise RolloutError(f"rollout {route}: the state changed meanwhile (another process?)")

    def commit(self, status: RolloutStatus, expected_revision: int | None) -> None:
        """Save ``status`` unless the stored one moved past ``expected_revision`` (another writer)."""
        statuses = self.load()
        stored = statuses.get(status.route)
        if stored is not None and expected_revision is not None and stored.revision != expected_revision:
            raise RolloutError(f"rollout {status.route}: the state changed meanwhile (another process?)")
        status.revision = (stored.revision if stored else 0) + 1
        statuses[status.route] = status
        atomic_write(self.path, json.dumps({"rollouts": {r: s.model_dump() for r, s in statuses.items()}}, indent=2))


# --- measuring and judging ---------------------------------------------------------------------

@dataclass
class Measurements:
    """Counts over the analysis window, from the gateway's counters."""

    canary_answered: float = 0.0  # loragate_requests_total{variant=canary}
    canary_errors: float = 0.0  # ... status_class="5xx"
    canary_fallbacks: float = 0.0  # loragate_fallbacks_total{variant=canary}
    stable_answered: float = 0.0
    stable_errors: float = 0.0
    stable_fallbacks: float = 0.0
    canary_p95_s: float | None = None
    stable_p95_s: float | None = None
    feedback_count: float = 0.0
    feedback_sum: float = 0.0

    @property
    def canary_routed(self) -> float:
        return self.canary_answered + self.canary_fallbacks

    @property
    def stable_routed(self) -> float:
        return self.stable_answered + self.stable_fallbacks


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def analysis_queries(route: str, canary: str, stable: str, window_s: float) -> dict[str, str]:
    """PromQL for each field of Measurements over the last ``window_s`` (instant queries)."""
    window = f"{max(1, math.ceil(window_s))}s"

    def sel(variant: str, extra: str = "") -> str:
        return f'{{route="{_label(route)}",variant="{_label(variant)}"{"," + extra if extra else ""}}}'

    queries: dict[str, str] = {}
    for role, variant in (("canary", canary), ("stable", stable)):
        queries[f"{role}_answered"] = f"sum(increase(loragate_requests_total{sel(variant)}[{window}]))"
        errors = sel(variant, 'status_class="5xx"')
        queries[f"{role}_errors"] = f"sum(increase(loragate_requests_total{errors}[{window}]))"
        queries[f"{role}_fallbacks"] = f"sum(increase(loragate_fallbacks_total{sel(variant)}[{window}]))"
        queries[f"{role}_p95_s"] = (f"histogram_quantile(0.95, sum by (le) "
                                    f"(increase(loragate_request_duration_seconds_bucket{sel(variant)}[{window}])))")
    queries["feedback_count"] = f"sum(increase(loragate_feedback_score_count{sel(canary)}[{window}]))"
    queries["feedback_sum"] = f"sum(increase(loragate_feedback_score_sum{sel(canary)}[{window}]))"
    return queries


class MetricsSource(Protocol):
    async def measure(self, config: CanaryConfig, window_s: float) -> Measurements: ...


class PrometheusAnalysis:
    """Measurements from instant queries over Prometheus' HTTP API (aiohttp)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    async def query(self, session, expr: str) -> float | None:
        async with session.get(f"{self.url}/api/v1/query", params={"query": expr}) as resp:
            body = await resp.json(content_type=None)
        if body.get("status") != "success":
            raise RolloutError(f"prometheus: {body.get('errorType')}: {body.get('error')} (query {expr})")
        result = body["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) else None

    async def measure(self, config: CanaryConfig, window_s: float) -> Measurements:
        import aiohttp

        queries = analysis_queries(config.route, config.canary, config.stable, window_s)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            values = await asyncio.gather(*(self.query(session, q) for q in queries.values()))
        found = dict(zip(queries, values))
        return Measurements(**{k: (v if k.endswith("_p95_s") else (v or 0.0)) for k, v in found.items()})


@dataclass
class Analysis:
    verdict: Literal["pass", "fail", "inconclusive"]
    values: dict[str, float | None]
    failed: list[str] = field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "values": self.values, "failed": self.failed, "reason": self.reason}


def judge(config: CanaryConfig, m: Measurements) -> Analysis:
    """Pure: one analysis of the canary against the stable variant."""
    t = config.thresholds
    routed = m.canary_routed
    canary_error = m.canary_errors / routed if routed > 0 else None
    stable_error = m.stable_errors / m.stable_routed if m.stable_routed > 0 else 0.0
    ratio = None
    if m.canary_p95_s is not None and m.stable_p95_s is not None:
        floor = max(t.latency_floor_s, 1e-9)
        ratio = max(m.canary_p95_s, floor) / max(m.stable_p95_s, floor)
    feedback = m.feedback_sum / m.feedback_count if m.feedback_count >= t.min_feedback else None
    values: dict[str, float | None] = {
        "canary_requests": routed,
        "error_rate_increase": None if canary_error is None else canary_error - stable_error,
        "latency_p95_ratio": ratio,
        "fallback_rate": m.canary_fallbacks / routed if routed > 0 else None,
        "feedback_score": feedback,
    }
    if routed < config.min_requests:
        return Analysis("inconclusive", values, reason=f"{routed:.0f} canary requests, {config.min_requests} needed")
    limits = [("error_rate_increase", t.max_error_rate_increase, ">"),
              ("latency_p95_ratio", t.max_latency_p95_ratio, ">"),
              ("fallback_rate", t.max_fallback_rate, ">")]
    if t.min_feedback_score is not None:
        limits.append(("feedback_score", t.min_feedback_score, "<"))
    failed, notes = [], []
    for check, limit, op in limits:
        value = values[check]
        if value is None:
            continue  # not measurable in this window (e.g. no stable latency): not judged
        bad = value > limit if op == ">" else value < limit
        if bad:
            failed.append(check)
            notes.append(f"{check} {value:.4g} {op} {limit:g}")
    if failed:
        return Analysis("fail", values, failed, "; ".join(notes))
    return Analysis("pass", values, reason=f"{routed:.0f} canary requests, every check within its threshold")


# --- metrics -----------------------------------------------------------------------------------

class RolloutMetrics:
    def __init__(self, registry: "CollectorRegistry | None" = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        rc, r = ("route", "canary"), self.registry
        self.step = Gauge("loragate_rollout_step", "Canary weight of each rollout now, in percent.", rc, registry=r)
        self.state = Gauge("loragate_rollout_state",
                           "1 for the rollout's current state (progressing, promoted, rolled_back), else 0.",
                           (*rc, "state"), registry=r)
        self.transitions = Counter("loragate_rollout_transitions",
                                   "Rollout decisions by action (step, promote, rollback, hold).",
                                   (*rc, "action"), registry=r)
        self.analysis = Gauge("loragate_rollout_analysis",
                              "Last measured value of each canary analysis check (NaN: not measurable).",
                              (*rc, "check"), registry=r)
        self._shown: dict[str, str] = {}  # route -> canary whose series exist

    def show(self, status: RolloutStatus) -> None:
        route, canary = status.route, status.canary
        previous = self._shown.get(route)
        if previous is not None and previous != canary:
            self.forget(route, previous)
        if previous != canary:
            for action in ACTIONS:  # every action has a series from the start: increase() sees the first
                self.transitions.labels(route, canary, action)
            self._shown[route] = canary
        self.step.labels(route, canary).set(status.weight)
        for state in STATES:
            self.state.labels(route, canary, state).set(1 if status.state == state else 0)

    def forget(self, route: str, canary: str) -> None:
        for metric, extra in ((self.step, [()]), (self.state, [(s,) for s in STATES]),
                              (self.transitions, [(a,) for a in ACTIONS]), (self.analysis, [(c,) for c in CHECKS])):
            for labels in extra:
                try:
                    metric.remove(route, canary, *labels)
                except KeyError:
                    pass
        self._shown.pop(route, None)

    def record(self, route: str, canary: str, action: str, analysis: Analysis | None = None) -> None:
        self.transitions.labels(route, canary, action).inc()
        if analysis is not None:
            for check in CHECKS:
                value = analysis.values.get(check)
                self.analysis.labels(route, canary, check).set(math.nan if value is None else value)


# --- the controller ----------------------------------------------------------------------------

@dataclass
class Transition:
    route: str
    action: str  # step, promote, rollback, hold
    weight: float
    reason: str
    analysis: Analysis | None = None


class RolloutController:
    """Runs every configured rollout: starts it, analyses it on its interval, moves the weights."""

    def __init__(self, config: RolloutsConfig, source: MetricsSource | None, *,
                 metrics: RolloutMetrics | None = None, routes: RoutesSource | None = None, k8s_api: Any = None) -> None:
        self.config = config
        self.source = source
        self.metrics = metrics or RolloutMetrics()
        if routes is None:
            routes = (RoutesFile(config.routes_file) if config.routes_file is not None
                      else RoutesConfigMap(config.configmap, k8s_api))
        self.routes = routes
        self.store = RolloutStore(config.state_file)
        self.errors: dict[str, str] = {}  # route -> last error, for /healthz
        self._applied: set[str] = set()  # routes whose weights were checked since this process started
        self._retry_at: dict[str, float] = {}  # a failing rollout is retried once per interval, not every round

    def spec(self, route: str) -> CanaryConfig:
        for spec in self.config.canaries:
            if spec.route == route:
                return spec
        raise RolloutError(f"no rollout configured for route {route!r}")

    # the weights

    def _write_weights(self, spec: CanaryConfig, canary_weight: float) -> bool:
        """Set the canary to ``canary_weight`` % and the stable to the rest; False when already so."""
        wanted = {spec.canary: canary_weight, spec.stable: 100 - canary_weight}
        for _ in range(3):
            snapshot = self.routes.read()
            try:
                now = current_weights(snapshot.text, spec.route)
            except CatalogError:
                now = {}
            if now and all(now.get(name) == weight for name, weight in wanted.items()):
                return False
            text = set_weights(snapshot.text, spec.route, wanted, str(self.routes))
            try:
                self.routes.write(text, snapshot.version)
                return True
            except RoutesConflict as exc:
                log.info("rollout %s: %s; reading it again", spec.route, exc)
        raise RolloutError(f"rollout {spec.route}: the routes source kept changing under us")

    async def apply(self, spec: CanaryConfig, canary_weight: float) -> bool:
        return await asyncio.to_thread(self._write_weights, spec, canary_weight)

    # the state machine

    async def tick(self, now: float | None = None) -> list[Transition]:
        """One round: start new rollouts, analyse the ones that are due. Errors stay per rollout."""
        now = time.time() if now is None else now
        try:
            statuses = self.store.load()
        except RolloutError as exc:
            log.error("%s", exc)
            self.errors = {spec.route: str(exc) for spec in self.config.canaries}
            return []
        transitions = []
        for spec in self.config.canaries:
            status = statuses.get(spec.route)
            if now < self._retry_at.get(spec.route, 0.0):
                continue
            try:
                if status is None or (status.canary, status.stable) != (spec.canary, spec.stable):
                    status, transition = await self._start(spec, status, now)
                    transitions.append(transition)
                elif status.state == "progressing":
                    if spec.route not in self._applied:  # after a restart, or a crash between two writes
                        if await self.apply(spec, status.weight):
                            log.warning("rollout %s: weights re-applied from the state (%g%%)", spec.route, status.weight)
                        self._applied.add(spec.route)
                    if now - (status.last_analysis_at or status.step_started_at) >= spec.interval_s:
                        status, transition = await self._analyse(spec, status, now)
                        transitions.append(transition)
                self.errors.pop(spec.route, None)
                self._retry_at.pop(spec.route, None)
            except Exception as exc:  # one broken rollout does not stop the others
                log.error("rollout %s: %s (retried in %g s)", spec.route, exc, spec.interval_s)
                self.errors[spec.route] = str(exc)
                self._retry_at[spec.route] = now + spec.interval_s
            if status is not None and (status.canary, status.stable) == (spec.canary, spec.stable):
                self.metrics.show(status)
        return transitions

    async def _start(self, spec: CanaryConfig, old: RolloutStatus | None, now: float) -> tuple[RolloutStatus, Transition]:
        weight = spec.steps[0]
        status = RolloutStatus(route=spec.route, canary=spec.canary, stable=spec.stable, weight=weight,
                               started_at=now, step_started_at=now)
        await self.apply(spec, weight)
        status.record("step", now, f"rollout of {spec.canary} over {spec.stable} started")
        self.store.commit(status, old.revision if old else None)
        self._applied.add(spec.route)
        if old is not None:
            self.metrics.forget(old.route, old.canary)
        self.metrics.show(status)
        self.metrics.record(spec.route, spec.canary, "step")
        log.info("rollout %s: started, %s at %g%%", spec.route, spec.canary, weight)
        return status, Transition(spec.route, "step", weight, "started")

    async def _analyse(self, spec: CanaryConfig, status: RolloutStatus, now: float) -> tuple[RolloutStatus, Transition]:
        window_s = min(max(now - status.step_started_at, 1.0), spec.max_window_s)
        expected = status.revision
        status = status.model_copy(deep=True)
        status.last_analysis_at = now
        try:
            if self.source is None:
                raise RolloutError("no prometheus_url: the canary cannot be analysed")
            analysis = judge(spec, await self.source.measure(spec, window_s))
        except Exception as exc:
            reason = f"analysis failed: {exc}"
            status.last_analysis = {"verdict": "error", "values": {}, "failed": [], "reason": reason}
            status.record("hold", now, reason)
            self.store.commit(status, expected)
            self.metrics.record(spec.route, spec.canary, "hold")
            log.warning("rollout %s: %s; holding", spec.route, reason)
            return status, Transition(spec.route, "hold", status.weight, reason)

        status.last_analysis = {**analysis.as_dict(), "at": now, "window_s": window_s}
        action, reason = "hold", analysis.reason
        target: float | None = None
        if analysis.verdict == "fail":
            status.failures += 1
            if status.failures >= spec.failure_limit:
                action, target = "rollback", 0.0
            else:
                reason = f"{reason} (failure {status.failures} of {spec.failure_limit})"
        elif analysis.verdict == "pass":
            status.failures = 0
            following = status.step_index + 1
            if following >= len(spec.steps) or spec.steps[following] >= 100:
                action, target = "promote", 100.0
            else:
                action, target = "step", spec.steps[following]
                status.step_index = following
        if target is not None:
            self.store.check(spec.route, expected)  # e.g. `loragate rollout promote` meanwhile: its weights win
            await self.apply(spec, target)
            status.weight, status.step_started_at = target, now
            status.state = {"promote": "promoted", "rollback": "rolled_back"}.get(action, "progressing")
        status.record(action, now, reason)
        self.store.commit(status, expected)
        self.metrics.record(spec.route, spec.canary, action, analysis)
        log.info("rollout %s: %s -> %s at %g%% (%s)", spec.route, analysis.verdict, action, status.weight, reason)
        return status, Transition(spec.route, action, status.weight, reason, analysis)

    async def override(self, route: str, action: Literal["promote", "rollback"], *, reason: str = "manual",
                       now: float | None = None) -> RolloutStatus:
        """Promote or roll back now, whatever the analysis says (``loragate rollout promote|rollback``)."""
        now = time.time() if now is None else now
        spec = self.spec(route)
        old = self.store.load().get(route)
        if old is not None and (old.canary, old.stable) == (spec.canary, spec.stable):
            status = old.model_copy(deep=True)
        else:
            status = RolloutStatus(route=route, canary=spec.canary, stable=spec.stable, started_at=now)
        target = 100.0 if action == "promote" else 0.0
        await self.apply(spec, target)
        status.weight, status.step_started_at, status.failures = target, now, 0
        status.state = "promoted" if action == "promote" else "rolled_back"
        status.record(action, now, reason)
        self.store.commit(status, old.revision if old else None)
        self.metrics.show(status)
        self.metrics.record(route, spec.canary, action)
        return status

    def status(self) -> dict[str, dict[str, Any]]:
        try:
            statuses = self.store.load()
        except RolloutError as exc:
            return {spec.route: {"error": str(exc)} for spec in self.config.canaries}
        out = {}
        for spec in self.config.canaries:
            found = statuses.get(spec.route)
            if found is None or (found.canary, found.stable) != (spec.canary, spec.stable):
                out[spec.route] = {"canary": spec.canary, "stable": spec.stable, "state": "pending"}
            else:
                out[spec.route] = {**found.model_dump(exclude={"history"}), "history": found.history[-10:]}
            if spec.route in self.errors:
                out[spec.route]["error"] = self.errors[spec.route]
        return out

    def sleep_s(self) -> float:
        """How long the loop waits between rounds: a fraction of the shortest interval, 0.2-5 s."""
        shortest = min((spec.interval_s for spec in self.config.canaries), default=5.0)
        return min(5.0, max(0.2, shortest / 5))

    async def loop(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self.sleep_s())

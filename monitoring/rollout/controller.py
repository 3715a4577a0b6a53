"""The rollout state machine: starts each configured rollout, analyses it on its interval, moves the weights."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from loragate.common.catalog import CatalogError, parse_catalog
from loragate.monitoring.probe import AdapterProbe, ProbeResult
from loragate.monitoring.rollout import cards
from loragate.monitoring.rollout.analysis import MetricsSource
from loragate.monitoring.rollout.config import CanaryConfig, RolloutsConfig
from loragate.monitoring.rollout.errors import RolloutError, RoutesConflict
from loragate.monitoring.judgeresult import Verdict
from loragate.monitoring.rollout.judge import analyse
from loragate.monitoring.rollout.metrics import RolloutMetrics
from loragate.monitoring.rollout.plan import plan
from loragate.monitoring.rollout.routes import (
    RoutesConfigMap,
    RoutesFile,
    RoutesSource,
    add_variant,
    current_weights,
    set_weights,
)
from loragate.monitoring.rollout.state import RolloutStatus, RolloutStore

log = logging.getLogger("loragate.rollout")


@dataclass
class Transition:
    route: str
    action: str  # step, promote, rollback, hold
    weight: float
    reason: str
    analysis: Verdict | None = None


class RolloutController:
    """Runs every configured rollout: starts it, analyses it on its interval, moves the weights."""

    def __init__(
        self,
        config: RolloutsConfig,
        source: MetricsSource | None,
        *,
        metrics: RolloutMetrics | None = None,
        routes: RoutesSource | None = None,
        k8s_api: Any = None,
        shadow_gate: Callable[[CanaryConfig], Awaitable[Any]] | None = None,
        prober: AdapterProbe | None = None,
    ) -> None:
        self.config = config
        self.prober = prober or AdapterProbe()  # for the rollouts with a probe section
        self.source = source
        self.shadow_gate = shadow_gate  # spec -> monitoring.shadow.GateResult, for specs with a shadow_gate
        self.metrics = metrics or RolloutMetrics()
        if routes is None:
            if config.routes_file is not None:
                routes = RoutesFile(config.routes_file)
            else:
                assert config.configmap is not None  # RolloutsConfig: exactly one of the two
                routes = RoutesConfigMap(config.configmap, k8s_api)
        self.routes = routes
        self.store = RolloutStore(config.state_file)
        self.errors: dict[str, str] = {}  # route -> last error, for /healthz
        self._applied: set[str] = set()  # routes whose weights were checked since this process started
        self._retry_at: dict[str, float] = {}  # a failing rollout is retried once per interval, not every round
        # route -> the plan being made for a rollout that just started (off the loop: it must not hold the others)
        self._planning: dict[str, asyncio.Task[dict[str, Any] | None]] = {}

    def specs(self, statuses: dict[str, RolloutStatus] | None = None) -> list[CanaryConfig]:
        """The config file's rollouts, and those added at run time (kept in the state file); a run-time
        rollout replaces the config's for its route."""
        if statuses is None:
            try:
                statuses = self.store.load()
            except RolloutError:
                statuses = {}
        found = {spec.route: spec for spec in self.config.canaries}
        for route, status in statuses.items():
            if status.spec is not None:
                found[route] = CanaryConfig.model_validate(status.spec)
        return list(found.values())

    def spec(self, route: str) -> CanaryConfig:
        for spec in self.specs():
            if spec.route == route:
                return spec
        raise RolloutError(f"no rollout configured for route {route!r}")

    async def add(self, spec: CanaryConfig, now: float | None = None) -> RolloutStatus:
        """Start a rollout at run time (the pipeline action); persisted, so a restart resumes it.

        Refused while another rollout of the route is progressing. Starting it again (same canary
        and stable, e.g. after a crash between the start and the caller's record) returns it as it is.
        """
        now = time.time() if now is None else now
        old = self.store.load().get(spec.route)
        if old is not None and (old.canary, old.stable) == (spec.canary, spec.stable):
            return old
        if old is not None and old.state == "progressing":
            raise RolloutError(f"rollout {spec.route}: {old.canary} over {old.stable} is still progressing")
        status, _ = await self._start(spec, old, now, runtime=True)
        return status

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

    def _write_variant(self, route: str, entry: dict[str, Any]) -> bool:
        for _ in range(3):
            snapshot = self.routes.read()
            text = add_variant(snapshot.text, route, entry, str(self.routes))
            if text == snapshot.text:
                return False
            try:
                self.routes.write(text, snapshot.version)
                return True
            except RoutesConflict as exc:
                log.info("route %s: %s; reading it again", route, exc)
        raise RolloutError(f"route {route}: the routes source kept changing under us")

    async def add_variant(self, route: str, entry: dict[str, Any]) -> bool:
        """Add a variant (weight 0) to a route in the routes source; False when it is already there."""
        return await asyncio.to_thread(self._write_variant, route, entry)

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
        for spec in self.specs(statuses):
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
                            log.warning(
                                "rollout %s: weights re-applied from the state (%g%%)", spec.route, status.weight
                            )
                        self._applied.add(spec.route)
                    planning = self._planning.get(spec.route)
                    if planning is not None and planning.done():
                        status = self._record_plan(spec, status, planning.result(), now)
                        del self._planning[spec.route]
                    due = now - (status.last_analysis_at or status.step_started_at) >= spec.interval_s
                    if due and not status.stalled:  # a stalled rollout holds for good: a person decides
                        status, transition = await self._analyse(spec, status, now)
                        transitions.append(transition)
                elif spec.route not in self._applied:  # promoted or rolled back before this process started
                    # the state is committed before the cards move: finish a move a crash cut short (idempotent)
                    await asyncio.to_thread(cards.follow, spec, "promote" if status.state == "promoted" else "rollback")
                    self._applied.add(spec.route)
                self.errors.pop(spec.route, None)
                self._retry_at.pop(spec.route, None)
            except Exception as exc:  # one broken rollout does not stop the others
                log.error("rollout %s: %s (retried in %g s)", spec.route, exc, spec.interval_s)
                self.errors[spec.route] = str(exc)
                self._retry_at[spec.route] = now + spec.interval_s
            if status is not None and (status.canary, status.stable) == (spec.canary, spec.stable):
                self.metrics.show(status)
        return transitions

    async def _start(
        self, spec: CanaryConfig, old: RolloutStatus | None, now: float, runtime: bool = False
    ) -> tuple[RolloutStatus, Transition]:
        if spec.shadow_gate is not None:  # not started (and retried every interval) until the shadow passes
            if self.shadow_gate is None:
                raise RolloutError("shadow_gate set but the monitor reads no request log to judge it")
            result = await self.shadow_gate(spec)
            if result.decision != "pass":
                raise RolloutError(f"waiting for the shadow gate: {result.decision} ({result.explanation})")
        probe = await self._probe(spec)
        if probe is not None and probe.result == "error":  # retried every interval, like the shadow gate
            raise RolloutError(f"waiting for the adapter probe: {probe.explanation}")
        weight = spec.steps[0]
        status = RolloutStatus(
            route=spec.route,
            canary=spec.canary,
            stable=spec.stable,
            weight=weight,
            started_at=now,
            step_started_at=now,
            spec=spec.model_dump(mode="json") if runtime else None,
        )
        if probe is not None and probe.result == "not_applied":
            if old is not None:
                self.metrics.forget(old.route, old.canary)
            self._applied.add(spec.route)
            return await self._refuse(spec, status, old.revision if old else None, now, probe)
        await asyncio.to_thread(cards.follow, spec, "start")  # the canary's card first: the gateway checks it
        await self.apply(spec, weight)
        status.record("step", now, f"rollout of {spec.canary} over {spec.stable} started")
        self.store.commit(status, old.revision if old else None)
        self._applied.add(spec.route)
        if old is not None:
            self.metrics.forget(old.route, old.canary)
        self.metrics.show(status)
        self.metrics.record(spec.route, spec.canary, "step")
        if getattr(self.source, "traffic", None) is not None:
            self._planning[spec.route] = asyncio.create_task(self._plan(spec))
        log.info("rollout %s: started, %s at %g%%", spec.route, spec.canary, weight)
        return status, Transition(spec.route, "step", weight, "started")

    async def _probe(self, spec: CanaryConfig) -> ProbeResult | None:
        """Ask the engines whether the canary's adapter is applied; None without a probe section, or when the
        canary is no adapter (the base model, an endpoint)."""
        if spec.probe is None:
            return None
        snapshot = await asyncio.to_thread(self.routes.read)
        route = parse_catalog(snapshot.text).routes.get(spec.route)
        variant = next((v for v in route.variants if v.name == spec.canary), None) if route is not None else None
        if route is None or variant is None or variant.adapter is None:
            return None
        result = await self.prober.probe(
            spec.probe, base_model=route.base_model, adapter=variant.adapter, path=variant.path
        )
        self.metrics.probed(spec.route, spec.canary, [e.result for e in result.engines])
        if result.result != "applied":
            log.warning(
                "rollout %s: adapter probe of %s: %s (%s)", spec.route, spec.canary, result.result, result.explanation
            )
        return result

    async def _refuse(
        self, spec: CanaryConfig, status: RolloutStatus, expected: int | None, now: float, probe: ProbeResult
    ) -> tuple[RolloutStatus, Transition]:
        """The canary's adapter is not applied: no traffic to it (weight 0, state rolled_back, card rejected)."""
        reason = f"adapter not applied, variant refused traffic: {probe.explanation}"
        self.store.check(spec.route, expected)
        await self.apply(spec, 0.0)
        status.weight, status.state, status.step_started_at, status.holds = 0.0, "rolled_back", now, 0
        status.last_analysis = {"verdict": "fail", "reason": reason, "checks": {}, "at": now, "probe": probe.as_dict()}
        status.record("rollback", now, reason)
        self.store.commit(status, expected)
        await asyncio.to_thread(cards.follow, spec, "rollback")
        self.metrics.show(status)
        self.metrics.record(spec.route, spec.canary, "rollback")
        log.error("rollout %s: %s", spec.route, reason)
        return status, Transition(spec.route, "rollback", 0.0, reason)

    def _record_plan(
        self, spec: CanaryConfig, status: RolloutStatus, made: dict[str, Any] | None, now: float
    ) -> RolloutStatus:
        """Keep the plan in the rollout's status; one that cannot finish is a history entry too (and an alert)."""
        if made is None:
            return status
        expected = status.revision
        status = status.model_copy(deep=True)
        status.plan = made
        if made.get("feasible") is False:
            status.record("plan", now, "; ".join(made["lines"][1:]))
        self.store.commit(status, expected)
        return status

    async def _plan(self, spec: CanaryConfig) -> dict[str, Any] | None:
        """The rollout's plan from the route's recent traffic (None when the source cannot tell); a plan
        that cannot be made never stops the start."""
        traffic_of = getattr(self.source, "traffic", None)
        if traffic_of is None:
            return None
        try:
            made = await asyncio.to_thread(plan, spec, await traffic_of(spec.route, spec.plan_lookback_s))
        except Exception as exc:  # Prometheus down: the rollout starts, its analyses will hold and say why
            log.warning("rollout %s: no plan: %s", spec.route, exc)
            return {"error": f"no plan: {exc}"}
        body = {**made.as_dict(), "lines": made.lines()}
        if not made.feasible:
            log.warning("rollout %s: %s", spec.route, " | ".join(body["lines"]))
        return body

    async def _analyse(self, spec: CanaryConfig, status: RolloutStatus, now: float) -> tuple[RolloutStatus, Transition]:
        window_s = min(max(now - status.step_started_at, 1.0), spec.max_window_s)
        expected = status.revision
        status = status.model_copy(deep=True)
        status.last_analysis_at = now
        try:
            probe = await self._probe(spec)
        except Exception as exc:  # a probe that cannot run does not stop the analysis
            log.warning("rollout %s: adapter probe failed: %s", spec.route, exc)
            probe = None
        if probe is not None and probe.result == "not_applied":
            return await self._refuse(spec, status, expected, now, probe)
        try:
            if self.source is None:
                raise RolloutError("no prometheus_url: the canary cannot be analysed")
            verdict = analyse(spec, await self.source.measure(spec, window_s))
        except Exception as exc:
            reason = f"analysis failed: {exc}"
            status.last_analysis = {"verdict": "error", "reason": reason, "checks": {}, "at": now}
            status.record("hold", now, reason)
            self.store.commit(status, expected)
            self.metrics.record(spec.route, spec.canary, "hold")
            log.warning("rollout %s: %s; holding", spec.route, reason)
            return status, Transition(spec.route, "hold", status.weight, reason)

        explained = verdict.as_dict()
        status.last_analysis = {
            "verdict": explained.pop("decision"),
            "reason": explained.pop("explanation"),
            **explained,
            "at": now,
            "window_s": window_s,
            "step": status.weight,
        }
        action, reason = "hold", verdict.explanation
        target: float | None = None
        if verdict.decision == "fail":
            status.failures += 1
            if status.failures >= spec.failure_limit:
                action, target = "rollback", 0.0
            else:
                reason = f"{reason} (failure {status.failures} of {spec.failure_limit})"
        elif verdict.decision == "pass":
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
            status.weight, status.step_started_at, status.holds = target, now, 0
            status.state = (
                "promoted" if action == "promote" else "rolled_back" if action == "rollback" else "progressing"
            )
        else:
            status.holds += 1
            if status.holds >= spec.max_holds:
                status.stalled = True
                reason = (
                    f"{reason}; stalled after {status.holds} analyses on this step: held for good and never "
                    f"promoted (loragate rollout promote|rollback decides)"
                )
        status.record(action, now, reason)
        self.store.commit(status, expected)
        if action in ("promote", "rollback"):
            await asyncio.to_thread(cards.follow, spec, action)
        self.metrics.record(spec.route, spec.canary, action, verdict)
        log.info("rollout %s: %s -> %s at %g%% (%s)", spec.route, verdict.decision, action, status.weight, reason)
        return status, Transition(spec.route, action, status.weight, reason, verdict)

    async def override(
        self, route: str, action: Literal["promote", "rollback"], *, reason: str = "manual", now: float | None = None
    ) -> RolloutStatus:
        """Promote or roll back now, whatever the analysis says (``loragate rollout promote|rollback``)."""
        now = time.time() if now is None else now
        spec = self.spec(route)
        old = self.store.load().get(route)
        if old is not None and (old.canary, old.stable) == (spec.canary, spec.stable):
            status = old.model_copy(deep=True)
        else:
            status = RolloutStatus(route=route, canary=spec.canary, stable=spec.stable, started_at=now)
        if action == "promote":
            await asyncio.to_thread(cards.follow, spec, "start")  # a canary card it never reached
        target = 100.0 if action == "promote" else 0.0
        await self.apply(spec, target)
        status.weight, status.step_started_at, status.failures, status.holds, status.stalled = target, now, 0, 0, False
        status.state = "promoted" if action == "promote" else "rolled_back"
        status.record(action, now, reason)
        self.store.commit(status, old.revision if old else None)
        await asyncio.to_thread(cards.follow, spec, action)
        self.metrics.show(status)
        self.metrics.record(route, spec.canary, action)
        return status

    def status(self) -> dict[str, dict[str, Any]]:
        try:
            statuses = self.store.load()
        except RolloutError as exc:
            return {spec.route: {"error": str(exc)} for spec in self.config.canaries}
        out: dict[str, dict[str, Any]] = {}
        for spec in self.specs(statuses):
            found = statuses.get(spec.route)
            if found is None or (found.canary, found.stable) != (spec.canary, spec.stable):
                out[spec.route] = {"canary": spec.canary, "stable": spec.stable, "state": "pending"}
            else:
                out[spec.route] = {**found.model_dump(exclude={"history"}), "history": found.history[-10:]}
            if spec.route in self.errors:
                out[spec.route]["error"] = self.errors[spec.route]
        return out

    @staticmethod
    def explain(route: str, body: dict[str, Any]) -> list[str]:
        """``loragate rollout status`` lines for one entry of ``status()``: where it is, and its last
        analysis check by check (decision, estimate, interval, min effect, samples)."""
        line = (
            f"{route}: {body.get('state', '?')} canary={body.get('canary')} stable={body.get('stable')} "
            f"weight={body.get('weight', '-')}%"
        )
        if body.get("stalled"):
            line += f" STALLED after {body.get('holds')} inconclusive analyses (held; never promoted)"
        if body.get("error"):
            line += f" error: {body['error']}"
        lines = [line]
        made = body.get("plan") or {}
        if made.get("error"):
            lines.append(f"  plan: {made['error']}")
        elif made and (body.get("state") == "progressing" or not made.get("feasible")):
            lines += [f"  {text}" for text in made.get("lines", [])[1:]]
        analysis = body.get("last_analysis") or {}
        if analysis:
            window = analysis.get("window_s")
            lines.append(
                f"  last analysis: {analysis.get('verdict')}"
                + (f" over {window:.0f} s at {analysis.get('step'):g}%" if window else "")
                + ("" if analysis.get("checks") else f" ({analysis.get('reason')})")
            )
            for name, check in (analysis.get("checks") or {}).items():
                samples = f"{check.get('samples') or 0:.0f} of min {check.get('min_samples')} samples"
                lines.append(f"    {name:<13} {check.get('decision'):<12} {check.get('explanation')}; {samples}")
        return lines

    def sleep_s(self) -> float:
        """How long the loop waits between rounds: a fraction of the shortest interval, 0.2-5 s."""
        shortest = min((spec.interval_s for spec in self.specs()), default=5.0)
        return min(5.0, max(0.2, shortest / 5))

    async def loop(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self.sleep_s())

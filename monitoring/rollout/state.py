"""Each rollout's status, kept in one JSON file that every process re-reads (revisions catch concurrent writers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from loragate.common.atomicio import atomic_write
from loragate.monitoring.rollout.errors import RolloutError

STATES = ("progressing", "promoted", "rolled_back")
HISTORY = 200  # transitions kept per rollout in the state file: steps x (max_holds + 1) and more


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
    holds: int = 0  # analyses on this step that did not move it, in a row
    stalled: bool = False  # max_holds reached: the step is held for good (no more analyses), never promoted
    revision: int = 0  # bumped on every saved change: a concurrent writer is noticed
    last_analysis: dict[str, Any] | None = None
    # The plan made at the start from the route's recent traffic (monitoring/rollout/plan.py: Plan.as_dict(),
    # with its "lines"), or {"error": ...} when the traffic could not be read; None before plans existed.
    plan: dict[str, Any] | None = None
    # A rollout added at run time (RolloutController.add, e.g. by the pipeline action): its CanaryConfig,
    # kept here so a restarted monitor resumes it; None for the rollouts of the config file.
    spec: dict[str, Any] | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)

    def record(self, action: str, now: float, reason: str) -> None:
        self.history = [
            *self.history,
            {"at": now, "action": action, "weight": self.weight, "state": self.state, "reason": reason},
        ][-HISTORY:]


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

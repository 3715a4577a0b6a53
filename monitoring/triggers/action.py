"""What every trigger action gets (TriggerContext) and gives back (ActionResult)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import pandas as pd

    from loragate.monitoring.drift import DriftResult
    from loragate.monitoring.sources import WindowSource
    from loragate.monitoring.triggers.policy import Decision


@dataclass
class TriggerContext:
    route: str
    variant: str | None
    result: "DriftResult"
    decision: Decision
    requests: "pd.DataFrame | None" = None  # the current window's sample (what the drift check compared)
    feedback: "pd.DataFrame | None" = None
    dataset_location: str | None = None  # set by the dataset action, read by the later ones
    source: "WindowSource | None" = None  # the current window itself, streamed (the dataset export reads it)
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S", time.gmtime()))


@dataclass
class ActionResult:
    action: str
    ok: bool
    detail: str = ""


class Action(Protocol):
    name: str

    async def run(self, ctx: TriggerContext) -> ActionResult: ...

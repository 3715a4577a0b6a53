"""The trigger counters per ``route/variant`` and the time of the last firing, kept in a JSON file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel

from loragate.common.atomicio import atomic_write

log = logging.getLogger("loragate.monitor")


class KeyState(BaseModel):
    consecutive: int = 0
    last_fired: float | None = None
    fired: int = 0
    last_run: float | None = None


class TriggerState:
    """Counters per ``route/variant``, persisted atomically to a JSON file after every change."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.keys: dict[str, KeyState] = {}
        if self.path and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.keys = {k: KeyState(**v) for k, v in data.get("keys", {}).items()}
            except (ValueError, TypeError) as exc:
                log.warning("trigger state %s unreadable (%s); starting fresh", self.path, exc)

    def get(self, key: str) -> KeyState:
        return self.keys.setdefault(key, KeyState())

    def save(self) -> None:
        if not self.path:
            return
        atomic_write(self.path, json.dumps({"keys": {k: v.model_dump() for k, v in self.keys.items()}}, indent=2))

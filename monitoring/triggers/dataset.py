"""The dataset action: recent scrubbed traffic, feedback joined, as chat JSONL for fine-tuning."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from loragate.monitoring.triggers.action import ActionResult, TriggerContext

if TYPE_CHECKING:
    import pandas as pd


def to_chat_records(requests: "pd.DataFrame", feedback: "pd.DataFrame | None" = None, *,
                    min_score: float | None = None, scrub_text=None) -> list[dict]:
    """Request-log rows (already scrubbed by the writer) -> ``{"messages": [...]}`` records.

    Feedback is joined on request_id (the latest per request); a correction replaces the
    logged answer and is scrubbed here, since it never went through the writer. Rows with
    a score below ``min_score`` and no correction are left out, as are failed requests and
    rows without text.
    """
    import pandas as pd

    if scrub_text is None:
        from loragate.common.scrub import scrub as scrub_text
    frame = requests
    if "status" in frame:
        frame = frame[pd.to_numeric(frame["status"], errors="coerce") == 200]
    if feedback is not None and len(feedback):
        latest = feedback.sort_values("timestamp").drop_duplicates("request_id", keep="last")
        frame = frame.merge(latest[["request_id", "score", "correction"]], on="request_id", how="left")
    records = []
    for row in frame.itertuples(index=False):
        prompt = getattr(row, "prompt_text", None)
        correction = getattr(row, "correction", None)
        correction = correction if isinstance(correction, str) and correction.strip() else None
        score = getattr(row, "score", None)
        if correction is None and min_score is not None and _number(score) is not None and score < min_score:
            continue
        answer = scrub_text(correction) if correction else getattr(row, "response_text", None)
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(answer, str) or not answer.strip():
            continue
        records.append({"messages": _prompt_messages(prompt) + [{"role": "assistant", "content": answer}]})
    return records


_ROLE_LINE = re.compile(r"^(system|user|assistant|tool|developer): ?(.*)$")


def _prompt_messages(prompt: str) -> list[dict]:
    """The logged prompt back into chat turns.

    The writer logs chat prompts as one ``role: content`` line per message (a line without
    a role prefix continues the previous message); anything else is one user turn.
    """
    messages: list[dict] = []
    for line in prompt.split("\n"):
        match = _ROLE_LINE.match(line)
        if match:
            messages.append({"role": match[1], "content": match[2]})
        elif messages:
            messages[-1]["content"] += "\n" + line
        else:
            return [{"role": "user", "content": prompt}]
    messages = [m for m in messages if m["role"] in ("system", "user", "assistant")]
    return messages or [{"role": "user", "content": prompt}]


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def write_jsonl(records: list[dict], location: str) -> str:
    """Write to a local path or an ``s3://``-style URL (pyarrow filesystems)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if "://" in location and not location.startswith("file://"):
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(location)
        with filesystem.open_output_stream(path) as out:
            out.write(data)
    else:
        path = Path(location.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return location


class DatasetExportAction:
    """Recent scrubbed traffic with feedback joined, as chat JSONL ready for fine-tuning."""

    name = "dataset"

    def __init__(self, location: str, *, min_score: float | None = None, max_rows: int = 50_000) -> None:
        self.location, self.min_score, self.max_rows = location.rstrip("/"), min_score, max_rows

    async def run(self, ctx: TriggerContext) -> ActionResult:
        if ctx.requests is None or not len(ctx.requests):
            return ActionResult(self.name, False, "no requests in the window")
        requests = ctx.requests.tail(self.max_rows)
        records = await asyncio.to_thread(to_chat_records, requests, ctx.feedback, min_score=self.min_score)
        name = f"{ctx.route}-{ctx.variant or 'all'}-{ctx.run_id}.jsonl"
        location = await asyncio.to_thread(write_jsonl, records, f"{self.location}/{name}")
        ctx.dataset_location = location
        return ActionResult(self.name, True, f"{len(records)} records -> {location}")

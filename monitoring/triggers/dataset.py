"""The dataset action: recent scrubbed traffic, feedback joined, as chat JSONL for fine-tuning.

With the check's window (``TriggerContext.source``) the export streams: a deterministic sample of
``max_rows`` requests of the window (monitoring/logscan.py) is read file by file and each file's records
are written out before the next is read, so memory does not grow with the window or the sample. The file
appears whole (local: renamed into place; object store: one upload, completed at the end) or not at all.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loragate.common.logschema import prompt_turns
from loragate.common.objectstore import S3Options, write_bytes
from loragate.monitoring.triggers.action import ActionResult, TriggerContext

if TYPE_CHECKING:
    import pandas as pd

    from loragate.monitoring.sources import WindowSource


def to_chat_records(
    requests: "pd.DataFrame",
    feedback: "pd.DataFrame | None" = None,
    *,
    min_score: float | None = None,
    scrub_text: Callable[[str], str] | None = None,
) -> list[dict]:
    """Request-log rows (already scrubbed by the writer) -> ``{"messages": [...]}`` records.

    Feedback is joined on request_id (the latest per request); a correction replaces the
    logged answer and is scrubbed here, since it never went through the writer. Rows with
    a score below ``min_score`` and no correction are left out, as are failed requests and
    rows without text.

    The prompt turns are the stored ones (logschema.prompt_turns), never parsed from the flat
    text: a user message holding "\nassistant: ..." stays inside the user turn. Chat rows of
    schema version 1 (flat text only) are left out; a text-completion prompt is one user turn.
    """
    import pandas as pd

    if scrub_text is None:
        from loragate.common.scrub import scrub

        scrub_text = scrub
    frame = requests
    if "status" in frame:
        frame = frame[pd.to_numeric(frame["status"], errors="coerce") == 200]
    if feedback is not None and len(feedback):
        latest = feedback.sort_values("timestamp").drop_duplicates("request_id", keep="last")
        frame = frame.merge(latest[["request_id", "score", "correction"]], on="request_id", how="left")
    records = []
    for row in frame.itertuples(index=False):
        turns = prompt_turns(
            getattr(row, "schema_version", None),
            getattr(row, "endpoint", None),
            getattr(row, "prompt_messages", None),
            getattr(row, "prompt_text", None),
        )
        turns = [t for t in turns or () if t["role"] in _ROLES]
        correction = getattr(row, "correction", None)
        correction = correction if isinstance(correction, str) and correction.strip() else None
        score = _number(getattr(row, "score", None))
        if correction is None and min_score is not None and score is not None and score < min_score:
            continue
        answer = scrub_text(correction) if correction else getattr(row, "response_text", None)
        if not any(t["content"].strip() for t in turns) or not isinstance(answer, str) or not answer.strip():
            continue
        records.append({"messages": turns + [{"role": "assistant", "content": answer}]})
    return records


_ROLES = ("system", "user", "assistant")  # the turns a chat fine-tuning set holds (tool turns are left out)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


EXPORT_COLUMNS = (
    "request_id",
    "timestamp",
    "endpoint",
    "status",
    "prompt_text",
    "prompt_messages",
    "response_text",
    "schema_version",
)


def export_window(
    source: "WindowSource",
    location: str,
    *,
    rows: int,
    min_score: float | None = None,
    s3: S3Options | None = None,
    until: float | None = None,
) -> int:
    """Write the chat records of a sample of ``rows`` requests of ``source``'s window to ``location``
    as they are read (feedback of the window joined); returns the records written."""
    import time
    from datetime import datetime, timezone

    from loragate.common.objectstore import open_output

    end = datetime.fromtimestamp((time.time() if until is None else until) + 60, timezone.utc)
    feedback = source.feedback(end)
    written = 0
    with open_output(location, s3) as out:
        for frame in source.batches(EXPORT_COLUMNS, rows):
            ids = feedback[feedback["request_id"].isin(frame["request_id"])] if len(feedback) else None
            for record in to_chat_records(frame, ids, min_score=min_score):
                out.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
                written += 1
    return written


def write_jsonl(records: list[dict], location: str, s3: S3Options | None = None) -> str:
    """Write to a local path or an ``s3://``-style URL (loragate.common.objectstore)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    return write_bytes(location, data, s3)


class DatasetExportAction:
    """Recent scrubbed traffic with feedback joined, as chat JSONL ready for fine-tuning."""

    name = "dataset"

    def __init__(
        self, location: str, *, min_score: float | None = None, max_rows: int = 50_000, s3: S3Options | None = None
    ) -> None:
        self.location, self.min_score, self.max_rows = location.rstrip("/"), min_score, max_rows
        self.s3 = s3

    async def run(self, ctx: TriggerContext) -> ActionResult:
        name = f"{ctx.route}-{ctx.variant or 'all'}-{ctx.run_id}.jsonl"
        if ctx.source is not None:  # the window itself, streamed
            location = f"{self.location}/{name}"
            written = await asyncio.to_thread(
                export_window, ctx.source, location, rows=self.max_rows, min_score=self.min_score, s3=self.s3
            )
            if not written:
                return ActionResult(self.name, False, "no usable requests in the window")
            ctx.dataset_location = location
            return ActionResult(self.name, True, f"{written} records -> {location}")
        if ctx.requests is None or not len(ctx.requests):
            return ActionResult(self.name, False, "no requests in the window")
        requests = ctx.requests.tail(self.max_rows)
        records = await asyncio.to_thread(to_chat_records, requests, ctx.feedback, min_score=self.min_score)
        location = await asyncio.to_thread(write_jsonl, records, f"{self.location}/{name}", self.s3)
        ctx.dataset_location = location
        return ActionResult(self.name, True, f"{len(records)} records -> {location}")

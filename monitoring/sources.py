"""Where the monitor's data comes from: request-log windows, reference datasets, Prometheus.

The request log is Parquet partitioned by day, written by the gateway:
``<root>/requests/date=YYYY-MM-DD/*.parquet`` and ``<root>/feedback/date=YYYY-MM-DD/*.parquet``.
``root`` is a local directory or any URL pyarrow's filesystems understand (``s3://bucket/prefix``).
Windows are read in bounded memory (monitoring/logscan.py): the monitor's checks take a deterministic
sample of fixed size per variant (``RequestLog.sample``) and know the window's true row count.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loragate.common import logschema
from loragate.common.objectstore import S3Options, filesystem, is_local, open_input
from loragate.monitoring.logfiles import LogFiles
from loragate.monitoring.logkeys import Filter
from loragate.monitoring.logscan import WindowScan
from loragate.monitoring.prometheus import Prometheus, selector

if TYPE_CHECKING:  # pandas and pyarrow are imported where they are used: the CLI stays light
    import pandas as pd

# The request log's columns, as the shared schema defines them (every schema version reads).
REQUEST_COLUMNS = logschema.REQUEST_COLUMNS
FEEDBACK_COLUMNS = logschema.FEEDBACK_COLUMNS


def utc(value: datetime | float | int | str) -> datetime:
    """A timezone-aware UTC datetime from a datetime, unix seconds or an ISO string."""
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    @classmethod
    def last(cls, seconds: float, *, end: datetime | float | None = None, offset_s: float = 0) -> "Window":
        """The ``seconds`` before ``end`` (default now), moved back by ``offset_s``."""
        stop = utc(end) if end is not None else datetime.now(timezone.utc)
        stop -= timedelta(seconds=offset_s)
        return cls(stop - timedelta(seconds=seconds), stop)

    @classmethod
    def between(cls, start: datetime | float | int | str, end: datetime | float | int | str) -> "Window":
        return cls(utc(start), utc(end))

    def days(self) -> list[date]:
        day, last = self.start.date(), self.end.date()
        out = []
        while day <= last:
            out.append(day)
            day += timedelta(days=1)
        return out


@dataclass
class WindowSample:
    """A window's rows, sampled: ``frame`` holds at most the cap per variant; ``window_rows`` is how many
    the window has (per variant, before sampling), ``sampled_rows`` how many the frame holds."""

    frame: "pd.DataFrame"
    window_rows: dict[str, int]
    sampled_rows: dict[str, int]
    thresholds: dict[str, int]  # per variant: the largest sample key taken (capped variants only)

    @property
    def total_rows(self) -> int:
        return sum(self.window_rows.values())


def default_parallel(root: str) -> int:
    """Files a scan reads at once: on local disk one a core (reading a file is CPU work, and threads past the
    cores only fight for the GIL: 2 threads read a 10M-request window's 1,440 files in 8 s on 2 cores, 8 threads
    in 14 s; bench/monitor_volume.py); on an object store 8 (a file is a few requests: latency to overlap)."""
    import os

    return max(1, os.cpu_count() or 1) if is_local(root) else 8


class RequestLog:
    """Reads windows of the gateway's request log (and feedback): projected, pruned and, with a cap, sampled.

    Files of every schema version read, in the current schema (logschema.conform); ``s3`` says where an
    ``s3://`` root lives (default: the environment, see common.objectstore). ``parallel`` bounds the files
    listed and opened at once (default: :func:`default_parallel`); ``late_s``: how long after a request
    arrived its row may still be flushed (the gateway's total timeout plus its flush interval): files
    written later than that after a window are not opened. Compacted files (monitoring/compaction.py) are
    read instead of the files they replace.
    """

    def __init__(
        self, root: str | Path, s3: S3Options | None = None, *, parallel: int | None = None, late_s: float = 900.0
    ) -> None:
        self._fs, self._root = filesystem(str(root), s3)
        parallel = parallel or default_parallel(str(root))
        self.files = LogFiles(self._fs, self._root, parallel=parallel)
        self.parallel, self.late_s = parallel, late_s

    def scan(
        self,
        window: Window,
        route: str | None = None,
        variant: str | None = None,
        *,
        columns: tuple[str, ...] = REQUEST_COLUMNS,
        role: str | None = logschema.PRIMARY,
        per_variant: int | None = None,
        by_variant: bool = True,
        table: str = logschema.REQUESTS,
        ids: frozenset[str] | None = None,
    ) -> WindowScan:
        """An iterable of Arrow tables, one per file read (monitoring/logscan.py); its ``stats`` after.
        ``ids``: only these request ids."""
        where = Filter(window.start, window.end, route, variant, role, ids)
        return WindowScan(
            self.files,
            table,
            where,
            columns,
            per_variant=per_variant,
            by_variant=by_variant,
            parallel=self.parallel,
            late_s=self.late_s,
        )

    def sample(
        self,
        window: Window,
        route: str | None = None,
        variant: str | None = None,
        *,
        columns: tuple[str, ...] = REQUEST_COLUMNS,
        role: str | None = logschema.PRIMARY,
        per_variant: int | None = 10_000,
        by_variant: bool = True,
    ) -> WindowSample:
        """At most ``per_variant`` rows of each variant (the same ones on every run: samplekey.key_array),
        in time order, with the window's true row counts. ``by_variant=False``: at most ``per_variant``
        rows in all, every variant in its share of the window (a route's traffic as a whole)."""
        scan = self.scan(
            window,
            route,
            variant,
            columns=columns,
            role=role,
            per_variant=per_variant,
            by_variant=by_variant,
        )
        frame = _frame(list(scan), columns)
        return WindowSample(frame, scan.stats.window_rows, scan.stats.sampled_rows, dict(scan.thresholds))

    def requests(
        self,
        window: Window,
        route: str | None = None,
        variant: str | None = None,
        *,
        columns: tuple[str, ...] = REQUEST_COLUMNS,
        role: str | None = logschema.PRIMARY,
        ids: frozenset[str] | None = None,
    ) -> "pd.DataFrame":
        """Every row of the window (or of the request ids ``ids``); the monitor's checks use ``sample``.
        ``role`` primary: the answers clients got; ``role=None``: shadow answers too (monitoring/shadow.py)."""
        return _frame(list(self.scan(window, route, variant, columns=columns, role=role, ids=ids)), columns)

    def feedback(self, window: Window, route: str | None = None, variant: str | None = None) -> "pd.DataFrame":
        scan = self.scan(window, route, variant, columns=FEEDBACK_COLUMNS, role=None, table=logschema.FEEDBACK)
        return _frame(list(scan), FEEDBACK_COLUMNS)


@dataclass(frozen=True)
class WindowSource:
    """One check's window of the log, for actions that read it themselves, as it streams (the dataset export)."""

    log: RequestLog
    window: Window
    route: str | None
    variant: str | None

    def batches(self, columns: tuple[str, ...], rows: int) -> Iterator["pd.DataFrame"]:
        """A deterministic sample of ``rows`` requests of the window, one frame per file read."""
        for table in self.log.scan(
            self.window, self.route, self.variant, columns=columns, per_variant=rows, by_variant=False
        ):
            yield table.to_pandas()

    def feedback(self, until: datetime) -> "pd.DataFrame":
        return self.log.feedback(Window.between(self.window.start, until))


def _frame(tables: list, columns: tuple[str, ...]) -> "pd.DataFrame":
    import pandas as pd
    import pyarrow as pa

    if not tables:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    frame = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    order = ["timestamp", "request_id"] if "request_id" in frame.columns else ["timestamp"]  # ties: by id, not by
    return frame.sort_values(order, kind="stable").loc[:, list(columns)].reset_index(drop=True)  # file layout


def load_reference(path: str | Path, s3: S3Options | None = None) -> "pd.DataFrame":
    """A saved reference dataset: Parquet, CSV or JSON Lines, local or at a URL (``s3://``: see ``s3``).

    Either request-log columns, or a training set: ``prompt``/``response`` (also
    ``prompt_text``/``response_text``, ``completion``, ``input``/``output``), or chat
    records ``{"messages": [...]}``: the last assistant turn is the response, the turns
    before it the prompt, written as the request log writes chat prompts.
    """
    import pandas as pd

    text = str(path)
    suffix = text.rsplit(".", 1)[-1].lower()
    readers = {"parquet": pd.read_parquet, "csv": pd.read_csv, "jsonl": functools.partial(pd.read_json, lines=True)}
    reader = readers.get({"json": "jsonl", "ndjson": "jsonl"}.get(suffix, suffix))
    if reader is None:
        raise ValueError(f"unknown reference format {path!r}: use .parquet, .csv or .jsonl")
    if is_local(text):
        frame = reader(text.removeprefix("file://"))
    else:  # through the same object-store settings as the request log
        with open_input(text, s3) as file:
            frame = reader(file)
    if "messages" in frame and "prompt_text" not in frame:
        pairs = [_chat_to_pair(messages) for messages in frame["messages"]]
        frame["prompt_text"] = [p for p, _ in pairs]
        frame["response_text"] = [r for _, r in pairs]
    for target, names in (
        ("prompt_text", ("prompt", "input", "question")),
        ("response_text", ("response", "completion", "output", "answer")),
    ):
        if target not in frame:
            for name in names:
                if name in frame:
                    frame[target] = frame[name]
                    break
    return frame


def _chat_to_pair(messages: Any) -> tuple[str | None, str | None]:
    """Chat record -> (prompt as the request log writes it: ``role: content`` lines, last answer)."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    if messages is None or (isinstance(messages, float) and math.isnan(messages)):
        return None, None
    messages = list(messages)
    answer = None
    if messages and messages[-1].get("role") == "assistant":
        answer = messages.pop().get("content")
    prompt = logschema.flat_prompt(messages) or None
    return prompt, answer


# --- Prometheus ---------------------------------------------------------------------------------


def variant_queries(route: str, variant: str | None, rate_window: str = "1m") -> dict[str, str]:
    """PromQL per series: latency quantiles, cost per request, error and fallback rates."""
    sel = selector({"route": route, "variant": variant})
    requests = f"sum(rate(loragate_requests_total{sel}[{rate_window}]))"
    queries = {
        f"latency_p{int(q * 100)}_s": f"histogram_quantile({q}, sum by (le) "
        f"(rate(loragate_request_duration_seconds_bucket{sel}[{rate_window}])))"
        for q in (0.5, 0.95, 0.99)
    }
    errors = selector({"route": route, "variant": variant}, 'status_class=~"5xx"')
    queries.update(
        {
            "requests_per_s": requests,
            "cost_per_request_usd": f"sum(rate(loragate_cost_usd_total{sel}[{rate_window}])) / {requests}",
            "error_rate": f"(sum(rate(loragate_requests_total{errors}[{rate_window}])) or vector(0)) / {requests}",
            "fallback_rate": f"(sum(rate(loragate_fallbacks_total{sel}[{rate_window}])) or vector(0)) / {requests}",
        }
    )
    return queries


async def variant_series(
    prometheus: Prometheus,
    route: str,
    variant: str | None,
    window: Window,
    *,
    step_s: float = 60.0,
    rate_window: str = "1m",
) -> "pd.DataFrame":
    """One row per step: latency p50/p95/p99, requests/s, cost per request, error and fallback rates.

    Steps where a series has no value (no traffic, NaN from 0/0) are left empty.
    """
    import pandas as pd

    queries = variant_queries(route, variant, rate_window)
    start, end = window.start.timestamp(), window.end.timestamp()
    async with prometheus.session() as session:
        results = await asyncio.gather(
            *(prometheus.query_range(q, start, end, step_s, session=session) for q in queries.values())
        )
    columns: dict[str, dict[float, float]] = {}
    for name, result in zip(queries, results):
        points: dict[float, float] = {}
        for _, values in result[:1]:  # each query aggregates to one series
            points = {t: v for t, v in values if math.isfinite(v)}
        columns[name] = points
    stamps = sorted({t for points in columns.values() for t in points})
    frame = pd.DataFrame(
        {name: [points.get(t) for t in stamps] for name, points in columns.items()},
        index=pd.to_datetime(stamps, unit="s", utc=True),
        dtype="float64",
    )
    frame.index.name = "timestamp"
    return frame

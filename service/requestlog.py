"""The request log: one record per answered request, written off the request path.

The gateway hands each finished request to ``record`` as a RequestRecord with the
raw request payload and the raw answer bytes; everything costly (parsing the
answer text, scrubbing, columnar encoding, upload) happens on the writer side.

``RequestLog`` is the real sink: ``record`` puts the record on a bounded queue
and returns (a full queue drops the record and counts it); one writer thread
turns records into rows and hands them to a store (service.logstore: Parquet,
local or object store) every ``flush_interval_s`` or every ``batch_size`` rows.
``close`` drains the queue and flushes, so a graceful shutdown loses nothing; a
crash loses at most what arrived since the last flush.

Feedback (POST /v1/feedback) rides the same queue and writer as a second table.
This module does not import pyarrow: only the store does, and the app builds one
only when the log is on.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from service.scrub import scrub

log = logging.getLogger("loragate.requestlog")

TextMode = Literal["full", "scrubbed", "none"]
REQUESTS = "requests"
FEEDBACK = "feedback"


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    timestamp: float  # unix seconds when the request arrived
    route: str
    variant: str
    endpoint: str  # "chat/completions" or "completions"
    status: int
    stream: bool
    fallback: str | None
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    reference_cost_usd: float
    payload: dict  # the request as the client sent it (model rewritten to the upstream's)
    body: bytes | None = None  # a whole JSON answer
    chunks: list[bytes] = field(default_factory=list)  # a streamed answer, SSE bytes as relayed


@dataclass(slots=True)
class FeedbackRecord:
    request_id: str
    timestamp: float  # unix seconds when the feedback arrived
    route: str | None  # None: the request is not among the recent ones this process served
    variant: str | None
    score: float | None
    label: str | None
    correction: str | None


class RequestSink(Protocol):
    def record(self, record: RequestRecord) -> None:
        """Must not block: called on the request path."""


class NullRequestLog:
    """Logging off."""

    def record(self, record: RequestRecord) -> None:
        return None


class Store(Protocol):
    def write(self, table: str, rows: list[dict[str, Any]]) -> int:
        """Write ``rows`` of ``table`` ("requests" or "feedback") durably; returns the files written."""


# --- the columns -------------------------------------------------------------------


def request_row(record: RequestRecord, text_mode: TextMode,
                scrubber: Callable[[str], str] = scrub) -> dict[str, Any]:
    """One row of the requests table: the answer parsed, the text kept, scrubbed or dropped.

    Prompts are scrubbed message by message: with a caching ``scrubber`` a system prompt
    or the earlier turns of a conversation, sent again with every request, cost once.
    """
    if record.chunks:
        response_text, finish_reason = _stream_answer(record.chunks)
    elif record.body is not None and record.status == 200:
        response_text, finish_reason = _body_answer(record.body)
    else:
        response_text, finish_reason = None, None
    if text_mode == "none":
        prompt_text = response_text = None
    elif text_mode == "scrubbed":
        prompt_text = prompt_of(record.payload, record.endpoint, scrubber)
        response_text = None if response_text is None else scrub(response_text)
    else:
        prompt_text = prompt_of(record.payload, record.endpoint)
    return {
        "request_id": record.request_id,
        "timestamp": int(record.timestamp * 1000),
        "route": record.route,
        "variant": record.variant,
        "endpoint": record.endpoint,
        "status": record.status,
        "stream": record.stream,
        "fallback": record.fallback,
        "latency_s": record.latency_s,
        "ttft_s": record.ttft_s,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_usd": record.cost_usd,
        "reference_cost_usd": record.reference_cost_usd,
        "finish_reason": finish_reason,
        "prompt_text": prompt_text,
        "response_text": response_text,
    }


def feedback_row(record: FeedbackRecord, text_mode: TextMode) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "timestamp": int(record.timestamp * 1000),
        "route": record.route,
        "variant": record.variant,
        "score": record.score,
        "label": record.label if text_mode == "full" or record.label is None else scrub(record.label),
        "correction": keep_text(record.correction, text_mode),
    }


def keep_text(text: str | None, mode: TextMode) -> str | None:
    if text is None or mode == "none":
        return None
    return text if mode == "full" else scrub(text)


def prompt_of(payload: dict, endpoint: str, clean: Callable[[str], str] = str) -> str | None:
    """Chat: one ``role: content`` line per message. Completions: the prompt (a list joined by lines).

    ``clean`` is applied to each message content / prompt string (the scrubber).
    """
    if endpoint == "chat/completions":
        messages = payload.get("messages")
        if not isinstance(messages, list):
            return None
        lines = []
        for message in messages:
            if isinstance(message, dict):
                lines.append(f"{message.get('role', '')}: {clean(_content_text(message.get('content')))}")
        return "\n".join(lines)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return clean(prompt)
    if isinstance(prompt, list) and all(isinstance(part, str) for part in prompt):
        return "\n".join(clean(part) for part in prompt)
    return None  # token ids: no text to keep


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(part["text"] for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _body_answer(body: bytes) -> tuple[str | None, str | None]:
    try:
        parsed = orjson.loads(body)
        choice = parsed["choices"][0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None, None
    if not isinstance(choice, dict):
        return None, None
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return (text if isinstance(text, str) else None), choice.get("finish_reason")


def _stream_answer(chunks: list[bytes]) -> tuple[str | None, str | None]:
    """Concatenate the deltas (chat) or texts (completions) of choice 0; its last finish_reason."""
    parts: list[str] = []
    finish_reason = None
    seen = False
    for event in b"".join(chunks).split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            choices = parsed.get("choices") if isinstance(parsed, dict) else None
            for choice in choices or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                seen = True
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str):
                    parts.append(text)
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
    return ("".join(parts) if seen else None), finish_reason


# --- recent requests, for feedback ---------------------------------------------------


class RecentRequests:
    """request id -> (route, variant) of the last ``capacity`` requests this process answered."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._served: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def add(self, request_id: str, route: str, variant: str) -> None:
        self._served[request_id] = (route, variant)
        if len(self._served) > self.capacity:
            self._served.popitem(last=False)

    def get(self, request_id: str) -> tuple[str, str] | None:
        return self._served.get(request_id)


# --- the sink ------------------------------------------------------------------------



class RequestLog:
    """Bounded queue + one writer thread + a store. ``record`` never blocks."""

    def __init__(
        self,
        store: Store,
        metrics,
        *,
        text_mode: TextMode = "scrubbed",
        flush_interval_s: float = 10.0,
        batch_size: int = 1000,
        queue_size: int = 10_000,
        recent_requests: int = 100_000,
        max_write_attempts: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.text_mode = text_mode
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_write_attempts = max_write_attempts
        self.recent = RecentRequests(recent_requests)
        self._scrub_cached = functools.lru_cache(maxsize=4096)(scrub)
        # A deque, not a queue.Queue: append/popleft need no lock, and the writer polls it
        # every tick instead of being woken (a GIL hand-off) for every record.
        self._queue: deque[tuple[str, RequestRecord | FeedbackRecord]] = deque()
        self._queue_size = queue_size
        self._tick_s = min(0.05, flush_interval_s)
        self._stop = threading.Event()
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._closed = False
        counter = metrics.requestlog_records
        self._counted = {
            (kind, result): counter.labels(kind, result)
            for kind in (REQUESTS, FEEDBACK) for result in ("written", "dropped", "failed")
        }
        self._depth = metrics.requestlog_queue_depth
        self._pending: dict[str, list[dict[str, Any]]] = {REQUESTS: [], FEEDBACK: []}
        self._retry: list[tuple[str, list[dict[str, Any]], int]] = []  # (table, rows, attempts so far)

    # --- the request path ---

    def record(self, record: RequestRecord) -> None:
        self.recent.add(record.request_id, record.route, record.variant)
        self._put(REQUESTS, record)

    def record_feedback(self, record: FeedbackRecord) -> bool:
        """False when the record was dropped (queue full or log closed)."""
        return self._put(FEEDBACK, record)

    def _put(self, table: str, record: RequestRecord | FeedbackRecord) -> bool:
        if self._closed or len(self._queue) >= self._queue_size:
            self._counted[table, "dropped"].inc()
            return False
        self._queue.append((table, record))
        return True

    # --- lifecycle ---

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loragate-requestlog", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop taking records, write everything queued, return when written (or after ``timeout_s``)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:  # never started: write what was queued from here
            self._drain_into_pending()
            self._flush(final=True)
            return
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("request log writer did not finish within %.0fs; records may be lost", timeout_s)

    # --- the writer thread ---

    def _run(self) -> None:
        next_flush = self._clock() + self.flush_interval_s
        while True:
            stopping = self._stop.wait(self._tick_s)
            while True:  # whole batches as soon as they are there
                waiting = sum(len(rows) for rows in self._pending.values())
                self._drain_into_pending(limit=max(0, self.batch_size - waiting))
                if sum(len(rows) for rows in self._pending.values()) < self.batch_size:
                    break
                self._flush(final=False)
                next_flush = self._clock() + self.flush_interval_s
            self._depth.set(len(self._queue))
            if stopping:
                self._drain_into_pending()
                self._flush(final=True)
                self._depth.set(0)
                return
            if self._clock() >= next_flush:
                self._flush(final=False)
                next_flush = self._clock() + self.flush_interval_s

    def _drain_into_pending(self, limit: int | None = None) -> None:
        """Move up to ``limit`` queued records (all of them by default) into the pending rows."""
        taken = 0
        while limit is None or taken < limit:
            try:
                table, item = self._queue.popleft()
            except IndexError:
                return
            self._take(table, item)
            taken += 1

    def _take(self, table: str, item: RequestRecord | FeedbackRecord) -> None:
        try:
            if table == REQUESTS:
                row = request_row(item, self.text_mode, self._scrub)
            else:
                row = feedback_row(item, self.text_mode)
        except Exception:  # a record we cannot read must not stop the writer
            log.exception("request log: cannot convert a %s record", table)
            self._counted[table, "failed"].inc()
            return
        self._pending[table].append(row)

    def _scrub(self, text: str) -> str:
        return self._scrub_cached(text) if len(text) <= 8192 else scrub(text)  # the cache holds at most ~32 MB

    def _flush(self, *, final: bool) -> None:
        """Write the pending rows; a failed batch is retried at the next flush (on the final one, at once)."""
        batches = self._retry + [(table, rows, 0) for table, rows in self._pending.items() if rows]
        self._retry = []
        self._pending = {REQUESTS: [], FEEDBACK: []}
        for table, rows, attempts in batches:
            while True:
                try:
                    self.store.write(table, rows)
                except Exception as exc:
                    attempts += 1
                    if attempts >= self.max_write_attempts:
                        log.error("request log: %d %s rows lost after %d attempts: %s",
                                  len(rows), table, attempts, exc)
                        self._counted[table, "failed"].inc(len(rows))
                        break
                    log.warning("request log: writing %d %s rows failed (attempt %d), will retry: %s",
                                len(rows), table, attempts, exc)
                    if not final:
                        self._retry.append((table, rows, attempts))
                        break
                    time.sleep(0.5)
                else:
                    self._counted[table, "written"].inc(len(rows))
                    break

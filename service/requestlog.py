"""The request log: one record per answered request, written off the request path.

The gateway hands each finished request to ``record`` as a RequestRecord (a tuple of plain
values with the request and the answer as the bytes that went over the wire); everything
costly (parsing, scrubbing, columnar encoding, upload) happens on the writer side.

``RequestLog`` is the real sink: ``record`` puts the record on a bounded queue
and returns (a full queue drops the record and counts it); one writer thread
batches the records every ``flush_interval_s`` or every ``batch_size`` records,
and each batch is turned into one Arrow table column by column (service.logbatch; the
reference, record by record, is service.logrows; the shared schema is loragate.common.logschema)
and handed to a store (service.logstore: Parquet, local or object store). Where that costly
part runs is a setting: in one long-lived conversion process (``convert="process"``, the
gateway's default: it keeps the parsing, scrubbing and encoding off the gateway's GIL; every
text of a batch is scrubbed in one call, service.logscrub) or in the writer thread itself
(``"thread"``). ``close`` drains the queue, writes and
ends the conversion process, so a graceful shutdown loses nothing; a crash loses
at most what arrived since the last flush.

Feedback (POST /v1/feedback) rides the same queue and writer as a second table.
This module does not import pyarrow: only the store does, and the app builds one
only when the log is on (in process mode, only in the conversion process).
"""

from __future__ import annotations

import functools
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from loragate.common.logschema import FEEDBACK, PRIMARY, REQUESTS
from loragate.common.scrub import scrub
from loragate.service.logrows import FeedbackRecord, RequestRecord, TextMode, feedback_row, request_row

if TYPE_CHECKING:  # not at run time: the conversion process imports this module too
    from loragate.service.metrics import Metrics

log = logging.getLogger("loragate.requestlog")

# The records are defined beside their conversion (service.logrows); the gateway imports them from here.
__all__ = ["FeedbackRecord", "NullRequestLog", "RecentRequests", "RequestLog", "RequestRecord", "RequestSink",
           "Store", "parquet_store"]


class RequestSink(Protocol):
    def record(self, record: RequestRecord) -> None:
        """Must not block: called on the request path."""


class NullRequestLog:
    """Logging off."""

    def record(self, record: RequestRecord) -> None:
        return None


@runtime_checkable
class Store(Protocol):
    def write(self, table: str, rows: Any) -> int:
        """Write ``rows`` of ``table`` ("requests" or "feedback") durably: a pa.Table in the table's schema
        (the requests, service.logbatch) or a list of row dicts; returns the files written."""


# --- recent requests, for feedback ---------------------------------------------------


class RecentRequests:
    """request id -> (route, variant) of the last ``capacity`` requests this process answered."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._served: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}

    def add(self, request_id: str, route: str, variant: str) -> None:
        pair = self._pairs.get((route, variant))  # one tuple per pair, not one per request for the GC to visit
        if pair is None:
            if len(self._pairs) > 4096:
                self._pairs.clear()
            pair = self._pairs[route, variant] = (route, variant)
        self._served[request_id] = pair
        if len(self._served) > self.capacity:
            self._served.popitem(last=False)

    def get(self, request_id: str) -> tuple[str, str] | None:
        return self._served.get(request_id)


# --- turning a batch of records into rows and writing them ------------------------------


class Converter:
    """Records -> a table for the store, with one scrub cache; used by the writer thread or the conversion process.

    A requests batch is built column by column (service.logbatch); a batch that path cannot take
    (a record that does not parse, say) is converted record by record instead, each unreadable
    record logged and skipped. Imports pyarrow when first used: only where the store lives.
    """

    def __init__(self, text_mode: TextMode) -> None:
        self.text_mode = text_mode
        self._scrub_cached = functools.lru_cache(maxsize=4096)(scrub)
        self._scrubbed: OrderedDict[str, str] = OrderedDict()  # the batch path's cache (system prompts)

    def write(self, store: Store, table: str, records: list) -> tuple[int, int]:
        """(rows written, records unreadable); a store error propagates (the caller retries)."""
        data, unreadable = self.convert(table, records)
        written = len(data)
        if written:
            store.write(table, data)
        return written, unreadable

    def convert(self, table: str, records: list) -> tuple[Any, int]:
        """(a pa.Table or a list of row dicts, records unreadable)."""
        if table == REQUESTS and records:
            from loragate.service.logbatch import requests_table  # pyarrow: where the store is

            try:
                return requests_table(records, self.text_mode, self._clean_all), 0
            except Exception as exc:  # one odd record: the batch goes record by record, skipping the unreadable
                log.debug("request log: a batch converted record by record (%s: %s)", type(exc).__name__, exc)
        rows, unreadable = [], 0
        for record in records:
            try:
                if table == REQUESTS:
                    rows.append(request_row(record, self.text_mode, self._scrub))
                else:
                    rows.append(feedback_row(record, self.text_mode))
            except Exception:  # a record we cannot read must not cost the batch
                log.exception("request log: cannot convert a %s record", table)
                unreadable += 1
        return rows, unreadable

    def _clean_all(self, texts: list[str]) -> dict[str, str]:
        """Distinct texts -> scrubbed, the ones not cached scrubbed in one call (service.logscrub)."""
        from loragate.service.logscrub import scrub_many  # pyarrow: where the store is

        cache = self._scrubbed
        clean = {text: cache[text] for text in texts if text in cache}
        todo = [text for text in texts if text not in clean]
        if todo:
            for text, scrubbed in zip(todo, scrub_many(todo)):
                clean[text] = scrubbed
                if len(text) <= 8192:  # the cache holds at most ~32 MB
                    cache[text] = scrubbed
            while len(cache) > 4096:
                cache.popitem(last=False)
        return clean

    def _scrub(self, text: str) -> str:
        return self._scrub_cached(text) if len(text) <= 8192 else scrub(text)  # the cache holds at most ~32 MB


# Records wait for their batch as plain tuples (see RequestLog._put); in process mode a batch crosses to
# the conversion process as one pickle of them (no per-record pickling on the request path).
_RECORD_TYPES = {REQUESTS: RequestRecord, FEEDBACK: FeedbackRecord}


def _pack(records: list[tuple]) -> bytes:
    return pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)


def parquet_store(url: str, **options: Any) -> Store:
    """A ParquetStore, importing pyarrow only where it is called (the conversion process)."""
    from loragate.service.logstore import ParquetStore

    return ParquetStore(url, **options)


class _Child:
    """State of the conversion process (one per pool, built by ``_child_init``)."""

    store: Store
    converter: Converter


_child = _Child()  # lives in the conversion process only; the gateway's process never sets it


def _child_init(store_factory: Callable[[], Store], text_mode: TextMode, parent_pid: int) -> None:
    # The gateway decides when this process ends: a SIGTERM sent to the whole process group
    # (a terminal, systemd, `kill -- -pgid`) must not kill it before the gateway's last flush.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="loragate-parent-watch",
                     daemon=True).start()
    _child.converter = Converter(text_mode)
    _child.store = store_factory()
    gc.freeze()  # what start-up loaded is never garbage: later collections skip it


def _exit_with_parent(parent_pid: int) -> None:
    """A gateway killed hard (SIGKILL, OOM) cannot shut the pool down: do not outlive it."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _child_ping() -> int:
    return os.getpid()


def _child_write(table: str, packed: bytes) -> tuple[int, int, str | None]:
    """(rows written, records unreadable, store error or None): runs in the conversion process."""
    kind = _RECORD_TYPES[table]
    # A batch makes ~100 objects a record (parsed requests and answers) that reference counting frees: the
    # cyclic GC walking them meanwhile was a quarter of a streamed record's cost (measured). Off for the batch.
    gc.disable()
    try:
        records = [kind(*fields) for fields in pickle.loads(packed)]
        written, unreadable = _child.converter.write(_child.store, table, records)
    except Exception as exc:  # sent back as text: any exception type, picklable or not
        return 0, 0, f"{type(exc).__name__}: {exc}"
    finally:
        gc.enable()
    return written, unreadable, None


class _StoreError(Exception):
    pass


def _log_start_failure(future: Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("request log: the conversion process did not start: %s", future.exception())


# --- the sink ------------------------------------------------------------------------


class RequestLog:
    """Bounded queue + one writer thread (+ one conversion process) + a store. ``record`` never blocks.

    ``convert`` says where records become rows and are written:

    - ``"thread"``: in the writer thread; ``store`` is a Store (or a callable that builds one).
    - ``"process"``: in one long-lived child process (spawned, not forked: the gateway runs
      threads and uvloop), so the parsing, scrubbing and Parquet encoding do not hold the
      gateway's GIL; the writer thread only batches records and ships them. ``store`` is a
      picklable zero-argument callable that builds the Store, once, in the child (so the
      child's file sequence is its own). ``close`` writes everything and ends the child; a
      child that dies is replaced and its batch retried.
    """

    def __init__(
        self,
        store: Store | Callable[[], Store],
        metrics: Metrics,
        *,
        convert: Literal["thread", "process"] = "thread",
        text_mode: TextMode = "scrubbed",
        flush_interval_s: float = 10.0,
        batch_size: int = 5000,
        queue_size: int = 20_000,
        recent_requests: int = 100_000,
        max_write_attempts: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.convert = convert
        self.store: Store | None = None  # thread mode
        self._store_factory: Callable[[], Store] | None = None  # process mode
        if convert == "process":
            if not callable(store):
                raise TypeError("convert='process' takes a callable that builds the Store in the child")
            self._store_factory = store
        elif isinstance(store, Store) or not callable(store):
            self.store = store
        else:
            self.store = store()
        self.text_mode = text_mode
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_write_attempts = max_write_attempts
        self.recent = RecentRequests(recent_requests)
        self._converter = Converter(text_mode)
        self._pool: ProcessPoolExecutor | None = None
        # A deque, not a queue.Queue: append/popleft need no lock, and the writer polls it
        # every tick instead of being woken (a GIL hand-off) for every record.
        self._queues: dict[str, deque[tuple]] = {REQUESTS: deque(), FEEDBACK: deque()}  # the records' fields
        self._queue_size = queue_size
        # Each tick wakes the writer (~0.15 ms CPU on a busy host, measured): 4 a second keep an idle gateway
        # cheap, and at the ~5k records a second one worker can answer a tick still gathers < queue_size.
        self._tick_s = min(0.25, flush_interval_s)
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
        # Records, not yet rows.
        self._pending: dict[str, list] = {REQUESTS: [], FEEDBACK: []}
        self._retry: list[tuple[str, list, int]] = []  # (table, records, attempts so far)

    # --- the request path ---

    def record(self, record: RequestRecord) -> None:
        if record.role == PRIMARY:  # feedback is about the answer the client got, never a shadow's
            self.recent.add(record.request_id, record.route, record.variant)
        self._put(REQUESTS, record)

    def record_feedback(self, record: FeedbackRecord) -> bool:
        """False when the record was dropped (queue full or log closed)."""
        return self._put(FEEDBACK, record)

    def _put(self, table: str, record: RequestRecord | FeedbackRecord) -> bool:
        if self._closed or self._queued() >= self._queue_size:
            self._counted[table, "dropped"].inc()
            return False
        # As a plain tuple of plain values: the cyclic GC untracks it at its first collection, so the records
        # waiting for their batch never make a collection dearer (a NamedTuple stays tracked: ~+5 us a
        # request in py-spy, at the line that allocated it).
        self._queues[table].append(tuple(record))
        return True

    def _queued(self) -> int:
        return len(self._queues[REQUESTS]) + len(self._queues[FEEDBACK])

    # --- lifecycle ---

    def start(self) -> None:
        if self._thread is None:
            if self.convert == "process":
                # The child starts now, not with the first batch; a store it cannot build is logged now.
                self._ensure_pool().submit(_child_ping).add_done_callback(_log_start_failure)
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
            self._shutdown_pool()
            return
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("request log writer did not finish within %.0fs; records may be lost", timeout_s)

    def child_pid(self) -> int | None:
        """The conversion process's pid (process mode, once started), for tools and tests."""
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    # --- the writer thread ---

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._shutdown_pool()

    def _loop(self) -> None:
        next_flush = self._clock() + self.flush_interval_s
        while True:
            stopping = self._stop.wait(self._tick_s)
            while True:  # whole batches as soon as they are there
                waiting = sum(len(records) for records in self._pending.values())
                self._drain_into_pending(limit=max(0, self.batch_size - waiting))
                if sum(len(records) for records in self._pending.values()) < self.batch_size:
                    break
                self._flush(final=False)
                next_flush = self._clock() + self.flush_interval_s
            self._depth.set(self._queued())
            if stopping:
                self._drain_into_pending()
                self._flush(final=True)
                self._depth.set(0)
                return
            if self._clock() >= next_flush:
                self._flush(final=False)
                next_flush = self._clock() + self.flush_interval_s

    def _drain_into_pending(self, limit: int | None = None) -> None:
        """Move up to ``limit`` queued records (all of them by default) into the pending batches."""
        for table, queue in self._queues.items():
            count = len(queue) if limit is None else min(len(queue), limit)
            take = queue.popleft  # only this thread takes; the event loop only appends
            self._pending[table].extend(take() for _ in range(count))
            if limit is not None:
                limit -= count

    def _flush(self, *, final: bool) -> None:
        """Write the pending records; a failed batch is retried at the next flush (on the final one, at once)."""
        batches = self._retry + [(table, records, 0) for table, records in self._pending.items() if records]
        self._retry = []
        self._pending = {REQUESTS: [], FEEDBACK: []}
        for table, records, attempts in batches:
            while True:
                try:
                    written, unreadable = self._write(table, records)
                except Exception as exc:
                    attempts += 1
                    if attempts >= self.max_write_attempts:
                        log.error("request log: %d %s records lost after %d attempts: %s",
                                  len(records), table, attempts, exc)
                        self._counted[table, "failed"].inc(len(records))
                        break
                    log.warning("request log: writing %d %s records failed (attempt %d), will retry: %s",
                                len(records), table, attempts, exc)
                    if not final:
                        self._retry.append((table, records, attempts))
                        break
                    time.sleep(0.5)
                else:
                    self._counted[table, "written"].inc(written)
                    if unreadable:
                        self._counted[table, "failed"].inc(unreadable)
                    break

    def _write(self, table: str, records: list) -> tuple[int, int]:
        if self.store is not None:  # thread mode
            kind = _RECORD_TYPES[table]
            return self._converter.write(self.store, table, [kind(*fields) for fields in records])
        pool = self._ensure_pool()
        try:
            written, unreadable, error = pool.submit(_child_write, table, _pack(records)).result()
        except BrokenProcessPool as exc:  # the child died (killed, out of memory): a new one, and retry
            log.error("request log: the conversion process died; starting a new one")
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            raise _StoreError("conversion process died") from exc
        if error is not None:
            raise _StoreError(error)
        return written, unreadable

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            assert self._store_factory is not None  # process mode
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_init, initargs=(self._store_factory, self.text_mode, os.getpid()))
        return self._pool

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # the last batch was written: the child exits now
            self._pool = None

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
(``"thread"``); service.logconvert holds both the conversion and the process's entry points. ``close`` drains the queue, writes and
ends the conversion process, so a graceful shutdown loses nothing; a crash loses
at most what arrived since the last flush.

Feedback (POST /v1/feedback) rides the same queue and writer as a second table.
This module does not import pyarrow: only the store does, and the app builds one
only when the log is on (in process mode, only in the conversion process).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal, Protocol

from loragate.common.logschema import FEEDBACK, PRIMARY, REQUESTS
from loragate.service import logspool
from loragate.service.logconvert import Converter, Store, child_init, child_ping, child_write
from loragate.service.logqueue import record_queue
from loragate.service.logrows import FeedbackRecord, RequestRecord, TextMode
from loragate.service.logspool import Spooled, SpoolUnreadable

if TYPE_CHECKING:  # for the annotation only
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


# --- recent requests, for feedback ---------------------------------------------------


class RecentRequests:
    """request id -> (route, variant) of at least the last ``capacity`` requests this process answered.

    Two plain dicts, the current one and the one before: when the current one holds ``capacity``
    ids it becomes the one before and the oldest ``capacity`` are dropped at once (so at most
    2 x ``capacity`` are held). An OrderedDict evicting one id per request cost twice as much.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._current: dict[str, tuple[str, str]] = {}
        self._before: dict[str, tuple[str, str]] = {}
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}

    def add(self, request_id: str, route: str, variant: str) -> None:
        pair = self._pairs.get((route, variant))  # one tuple per pair, not one per request for the GC to visit
        if pair is None:
            if len(self._pairs) > 4096:
                self._pairs.clear()
            pair = self._pairs[route, variant] = (route, variant)
        current = self._current
        current[request_id] = pair
        if len(current) >= self.capacity:
            self._before, self._current = current, {}

    def get(self, request_id: str) -> tuple[str, str] | None:
        served = self._current.get(request_id)
        return served if served is not None else self._before.get(request_id)

    def __len__(self) -> int:
        return len(self._current) + len(self._before)


def parquet_store(url: str, **options: Any) -> Store:
    """A ParquetStore, importing pyarrow only where it is called (the conversion process)."""
    from loragate.service.logstore import ParquetStore

    return ParquetStore(url, **options)


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
        spool: Callable[[bytes], AbstractContextManager[Spooled | None]] | None = None,
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
        self._spool = spool or logspool.Spool()  # how a batch reaches the conversion process (service.logspool)
        self._spooling = True  # until the conversion process says it cannot map a spooled batch
        # Records marshalled as they come (service.logqueue), taken a batch at a time; the writer polls them
        # every tick instead of being woken (a GIL hand-off) for every record.
        self._queues = {REQUESTS: record_queue(), FEEDBACK: record_queue()}
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
        self._retry: list[tuple[str, int, bytes, int]] = []  # (table, records, the batch, attempts so far)

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
        try:
            self._queues[table].append(record)
        except ValueError:  # a value marshal cannot write (a bug where the record is built): the record only
            log.exception("request log: cannot queue a %s record", table)
            self._counted[table, "failed"].inc()
            return False
        return True

    def _queued(self) -> int:
        return len(self._queues[REQUESTS]) + len(self._queues[FEEDBACK])

    # --- lifecycle ---

    def start(self) -> None:
        if self._thread is None:
            if self.convert == "process":
                # The child starts now, not with the first batch; a store it cannot build is logged now.
                self._ensure_pool().submit(child_ping).add_done_callback(_log_start_failure)
            self._thread = threading.Thread(target=self._run, name="loragate-requestlog", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop taking records, write everything queued, return when written (or after ``timeout_s``)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:  # never started: write what was queued from here
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
            if any(len(queue) >= self.batch_size for queue in self._queues.values()):
                self._flush(final=False, whole_batches=True)  # as soon as they are there
                next_flush = self._clock() + self.flush_interval_s
            self._depth.set(self._queued())
            if stopping:
                self._flush(final=True)
                self._depth.set(0)
                return
            if self._clock() >= next_flush:
                self._flush(final=False)
                next_flush = self._clock() + self.flush_interval_s

    def _flush(self, *, final: bool, whole_batches: bool = False) -> None:
        """Write the batches that failed before, then the records queued when the flush began, ``batch_size``
        at a time (only whole batches when ``whole_batches``). Records that come meanwhile wait for the next
        flush: taking them too, a batch of the few that came while the last was written, had the conversion
        process pay a batch's fixed cost for every few records at low load. A batch that fails is retried at
        the next flush (the final one: at once) and stops this one: the rest waits in the queue, whose bound
        then drops what comes.
        """
        retry, self._retry = self._retry, []
        for table, count, batch, attempts in retry:
            self._write_batch(table, count, batch, attempts, final=final)
        if self._retry and not final:
            return
        for table, queue in self._queues.items():
            left = len(queue)
            while left >= (self.batch_size if whole_batches else 1):
                count = min(left, self.batch_size)
                if not self._write_batch(table, count, queue.take(count), 0, final=final):
                    return
                left -= count

    def _write_batch(self, table: str, count: int, batch: bytes, attempts: int, *, final: bool) -> bool:
        """Write one batch, retrying it (or counting it lost); False when it waits for the next flush."""
        while True:
            try:
                written, unreadable = self._write(table, batch)
            except Exception as exc:
                attempts += 1
                if attempts >= self.max_write_attempts:
                    log.error("request log: %d %s records lost after %d attempts: %s", count, table, attempts, exc)
                    self._counted[table, "failed"].inc(count)
                    return True
                log.warning("request log: writing %d %s records failed (attempt %d), will retry: %s",
                            count, table, attempts, exc)
                if not final:
                    self._retry.append((table, count, batch, attempts))
                    return False
                time.sleep(0.5)
            else:
                self._counted[table, "written"].inc(written)
                if unreadable:
                    self._counted[table, "failed"].inc(unreadable)
                return True

    def _write(self, table: str, batch: bytes) -> tuple[int, int]:
        if self.store is not None:  # thread mode
            return self._converter.write_batch(self.store, table, batch)
        pool = self._ensure_pool()
        try:
            written, unreadable, error = self._convert_in_child(pool, table, batch)
        except BrokenProcessPool as exc:  # the child died (killed, out of memory): a new one, and retry
            log.error("request log: the conversion process died; starting a new one")
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            raise _StoreError("conversion process died") from exc
        if error is not None:
            raise _StoreError(error)
        return written, unreadable

    def _convert_in_child(self, pool: ProcessPoolExecutor, table: str, packed: bytes) -> tuple[int, int, str | None]:
        """child_write, the batch spooled (service.logspool) where it can be, else through the pool's pipe."""
        if self._spooling:
            with self._spool(packed) as spooled:
                if spooled is not None:
                    try:
                        return pool.submit(child_write, table, spooled).result()
                    except SpoolUnreadable as exc:
                        log.warning("request log: the conversion process cannot map spooled batches (%s); "
                                    "sending them through its pipe from now on", exc)
                        self._spooling = False
        return pool.submit(child_write, table, packed).result()

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            assert self._store_factory is not None  # process mode
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=child_init, initargs=(self._store_factory, self.text_mode, os.getpid()))
        return self._pool

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # the last batch was written: the child exits now
            self._pool = None
        if isinstance(self._spool, logspool.Spool):
            self._spool.close()

"""The request log's sink: a bounded queue, one writer thread, and the conversion process it feeds.

The gateway hands each finished request to ``record`` as a RequestRecord (plain values, with the
request and the answer as the bytes that went over the wire); ``record`` queues it and returns
(a full queue drops the record and counts it). Everything costly (parsing, scrubbing, columnar
encoding, upload) happens on the writer side: the writer thread takes the records every
``flush_interval_s`` or every ``batch_size`` records and has each batch converted and stored, in
the conversion process (``convert="process"``, the gateway's default, service.requestlog.process)
or in the writer thread itself (``"thread"``).

Nothing one batch does can stop the log: a batch the conversion process has not written within its
bound (``stall_factor`` times the time batches of its size have taken, at least ``stall_floor_s``)
has that process killed and replaced, and is written again record by record; a record that stalls
that too is written with its text withheld (never unscrubbed), counted as ``text_withheld`` and
logged with its request id. ``close`` writes what is queued and ends the process within its bound,
whatever the process does. Feedback (POST /v1/feedback) rides the same queue and writer as a second
table. This module does not import pyarrow (only the conversion side does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal, Protocol

from loragate.common.logschema import FEEDBACK, PRIMARY, REQUESTS
from loragate.service.requestlog.convert import Converter, ScrubTexts, Store
from loragate.service.requestlog.process import STORING, ChildError, ConversionProcess, Died, Stalled
from loragate.service.requestlog.queue import batch_count, record_queue
from loragate.service.requestlog.records import FeedbackRecord, RequestRecord, TextMode
from loragate.service.requestlog.spool import Spool, Spooled, SpoolUnreadable

if TYPE_CHECKING:  # for the annotation only
    from loragate.service.metrics import Metrics

log = logging.getLogger("loragate.requestlog")


class RequestSink(Protocol):
    def record(self, record: RequestRecord) -> bool | None:
        """Must not block: called on the request path. False: the record was dropped (queue full, log closed)."""


class RecentIds(Protocol):
    """Request id -> (route, variant) of the requests this process answered (service.api.feedback)."""

    def add(self, request_id: str, route: str, variant: str) -> None: ...

    def get(self, request_id: str) -> tuple[str, str] | None: ...


class NullRequestLog:
    """Logging off."""

    def record(self, record: RequestRecord) -> None:
        return None


def parquet_store(url: str, **options: Any) -> Store:
    """A ParquetStore, importing pyarrow only where it is called (the conversion process)."""
    from loragate.service.requestlog.store import ParquetStore

    return ParquetStore(url, **options)


class _StoreError(Exception):
    """A batch not written this time (the store refused it, the process died): retried."""


class _OutOfTime(Exception):
    """``close``'s bound is spent: what is left is counted lost."""


# A batch's first bound, before any batch has been timed: seconds a byte of the marshalled batch (~20x what
# a typical batch takes here, ~10 ns/B measured), and how far the rate moves with each batch timed.
_INITIAL_S_PER_BYTE = 200e-9
_RATE_WEIGHT = 0.2
_MAX_WITHHELD = 8  # records a stalled batch may have withheld one by one; past that, the rest of it goes textless
_START_TIMEOUT_S = 120.0  # a conversion process that cannot import pyarrow and build its store in this: an error


class RequestLog:
    """Bounded queue + one writer thread (+ one conversion process) + a store. ``record`` never blocks.

    ``convert`` says where records become rows and are written:

    - ``"thread"``: in the writer thread; ``store`` is a Store (or a callable that builds one).
    - ``"process"``: in one long-lived child process (service.requestlog.process), so the parsing,
      scrubbing and Parquet encoding do not hold the gateway's GIL; ``store`` is a picklable
      zero-argument callable that builds the Store, once, in the child (so the child's file sequence is
      its own), and ``scrub_texts`` (picklable; the scrubber by default) scrubs there. A child that dies
      is replaced and its batch retried; one that stalls is replaced and its batch written guarded.

    ``recent`` (service.api.feedback.RecentRequests) remembers the route and variant of each primary answer.
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
        recent: RecentIds | None = None,
        max_write_attempts: int = 3,
        clock: Callable[[], float] = time.monotonic,
        spool: Callable[[bytes], AbstractContextManager[Spooled | None]] | None = None,
        scrub_texts: ScrubTexts | None = None,
        stall_factor: float = 5.0,
        stall_floor_s: float = 2.0,
        close_timeout_s: float = 10.0,
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
        self.recent = recent
        self.stall_factor, self.stall_floor_s, self.close_timeout_s = stall_factor, stall_floor_s, close_timeout_s
        self._scrub_texts = scrub_texts
        self._converter = Converter(text_mode, scrub_texts)
        self._process: ConversionProcess | None = None
        self._s_per_byte = _INITIAL_S_PER_BYTE  # how long a batch takes, learnt from those written
        self._spool = spool or Spool()  # how a batch reaches the conversion process (service.requestlog.spool)
        self._spooling = True  # until the conversion process says it cannot map a spooled batch
        # Records marshalled as they come (service.requestlog.queue), taken a batch at a time; the writer polls
        # them every tick instead of being woken (a GIL hand-off) for every record.
        self._queues = {REQUESTS: record_queue(), FEEDBACK: record_queue()}
        self._queue_size = queue_size
        # Each tick wakes the writer (~0.15 ms CPU on a busy host, measured): 4 a second keep an idle gateway
        # cheap, and at the ~5k records a second one worker can answer a tick still gathers < queue_size.
        self._tick_s = min(0.25, flush_interval_s)
        self._stop = threading.Event()
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._closed = False
        self._deadline: float | None = None  # time.monotonic() by which close must be done
        counter = metrics.requestlog_records
        self._counted = {
            (kind, result): counter.labels(kind, result)
            for kind in (REQUESTS, FEEDBACK)
            for result in ("written", "text_withheld", "dropped", "failed")
        }
        self._depth = metrics.requestlog_queue_depth
        self._retry: list[tuple[str, int, bytes, int]] = []  # (table, records, the batch, attempts so far)

    # --- the request path ---

    def record(self, record: RequestRecord) -> bool:
        """False when the record was dropped (queue full or log closed)."""
        if self.recent is not None and record.role == PRIMARY:  # feedback is about the answer the client got
            self.recent.add(record.request_id, record.route, record.variant)
        return self._put(REQUESTS, record)

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
            self._thread = threading.Thread(target=self._run, name="loragate-requestlog", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float | None = None) -> None:
        """Stop taking records, write everything queued, end the conversion process: all within ``timeout_s``
        (default ``close_timeout_s``); what is not written by then is counted failed and logged."""
        if self._closed:
            return
        self._closed = True
        timeout_s = self.close_timeout_s if timeout_s is None else timeout_s
        self._deadline = time.monotonic() + timeout_s
        if self._thread is None:  # never started: write what was queued from here
            try:
                self._flush(final=True)
            finally:
                self._end_process()
            return
        self._stop.set()
        self._thread.join(timeout_s + 1.0)  # the writer keeps to the deadline; the second is for its last steps
        if self._thread.is_alive():
            log.error("request log writer did not finish within %.0fs; records may be lost", timeout_s)

    def child_pid(self) -> int | None:
        """The conversion process's pid (process mode, once started), for tools and tests."""
        return None if self._process is None else self._process.pid

    # --- the writer thread ---

    def _run(self) -> None:
        next_flush = self._clock() + self.flush_interval_s  # the process's start does not delay the first flush
        try:
            if self.convert == "process":
                # Started here, not with the first batch (a store it cannot build is logged now), and from this
                # thread: the child's PR_SET_PDEATHSIG fires when the thread that started it ends.
                try:
                    self._ensure_process()
                except Exception as exc:
                    log.error("request log: the conversion process did not start: %s", exc)
            self._loop(next_flush)
        finally:
            self._end_process()

    def _loop(self, next_flush: float) -> None:
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
                written, withheld, unreadable = self._write(table, batch)
            except _OutOfTime:
                log.error(
                    "request log: %d %s records lost: the shutdown's bound (%.0fs) was spent",
                    count,
                    table,
                    self.close_timeout_s,
                )
                self._counted[table, "failed"].inc(count)
                return True
            except Exception as exc:
                attempts += 1
                if attempts >= self.max_write_attempts:
                    log.error("request log: %d %s records lost after %d attempts: %s", count, table, attempts, exc)
                    self._counted[table, "failed"].inc(count)
                    return True
                log.warning(
                    "request log: writing %d %s records failed (attempt %d), will retry: %s",
                    count,
                    table,
                    attempts,
                    exc,
                )
                if not final:
                    self._retry.append((table, count, batch, attempts))
                    return False
                time.sleep(max(0.0, min(0.5, self._time_left())))
            else:
                self._counted[table, "written"].inc(written)
                if withheld:
                    self._counted[table, "text_withheld"].inc(withheld)
                if unreadable:
                    self._counted[table, "failed"].inc(unreadable)
                return True

    def _write(self, table: str, batch: bytes) -> tuple[int, int, int]:
        """(records written with their text, written with it withheld, unreadable)."""
        if self.store is not None:  # thread mode
            written, unreadable = self._converter.write_batch(self.store, table, batch)
            return written, 0, unreadable
        bound = self._bound(len(batch))
        self._cut(bound)  # no new process past close's deadline
        process = self._ensure_process()
        started = time.monotonic()
        try:
            written, unreadable = self._call_spooled(process, bound, table, batch)
        except Stalled as stalled:
            self._replace_process()
            self._out_of_time_if_cut()
            log.error(
                "request log: a batch of %d bytes was not written within %.1fs (%s); the conversion process "
                "was replaced and the batch is written record by record",
                len(batch),
                bound,
                stalled,
            )
            return self._write_guarded(table, batch, bound)
        self._learn(len(batch), time.monotonic() - started)
        return written, 0, unreadable

    def _write_guarded(self, table: str, batch: bytes, bound: float) -> tuple[int, int, int]:
        """A batch that stalled the conversion process, record by record; each record that stalls it again (no
        progress for ``bound``) is withheld its text, the process replaced and the batch tried again. A spare
        process warms up meanwhile, so that a second stall does not wait for a new one to start."""
        withheld: set[int] = set()
        spare: ConversionProcess | None = self._spawn()
        try:
            while True:
                bound_now = self._cut(bound)
                process = self._ensure_process()
                try:
                    written, unreadable, ids = process.call(
                        bound_now, "write_guarded", table, batch, sorted(withheld), idle=True
                    )
                except Stalled as stalled:
                    self._replace_process()
                    self._out_of_time_if_cut()
                    if stalled.at is None or stalled.at == STORING or stalled.at in withheld:
                        # Not any record's text: the store, the start, or a record that stalls without its text.
                        raise _StoreError(f"the conversion process stalled (at {stalled.at}) on a batch") from None
                    if len(withheld) >= _MAX_WITHHELD:
                        withheld.update(range(stalled.at, batch_count(batch)))
                    else:
                        withheld.add(stalled.at)
                    if spare is not None:
                        self._process, spare = self._ready(spare), self._spawn()
                    continue
                except (Died, ChildError) as exc:
                    raise _StoreError(str(exc)) from exc
                for request_id in ids:
                    log.error(
                        "request log: request %s written with its text withheld: converting it stalled the "
                        "conversion process (> %.1fs)",
                        request_id,
                        bound,
                    )
                return written - len(ids), len(ids), unreadable
        finally:
            if spare is not None:
                spare.kill()

    def _call_spooled(self, process: ConversionProcess, bound: float, table: str, batch: bytes) -> tuple[int, int]:
        """The child's ``write``, the batch spooled (service.requestlog.spool) where it can be, else piped."""
        try:
            if self._spooling:
                with self._spool(batch) as spooled:
                    if spooled is not None:
                        try:
                            return process.call(self._cut(bound), "write", table, spooled)
                        except SpoolUnreadable as exc:
                            log.warning(
                                "request log: the conversion process cannot map spooled batches (%s); "
                                "sending them through its pipe from now on",
                                exc,
                            )
                            self._spooling = False
            return process.call(self._cut(bound), "write", table, batch)
        except Died as exc:  # killed, out of memory: a new one, and retry
            log.error("request log: the conversion process died; starting a new one")
            self._replace_process()
            raise _StoreError(str(exc)) from exc
        except ChildError as exc:
            raise _StoreError(str(exc)) from exc

    # --- the bound of a batch, and the conversion process ---

    def _bound(self, size: int) -> float:
        return max(self.stall_floor_s, self.stall_factor * self._s_per_byte * size)

    def _learn(self, size: int, seconds: float) -> None:
        if size > 0:
            self._s_per_byte += _RATE_WEIGHT * (seconds / size - self._s_per_byte)

    def _time_left(self) -> float:
        return float("inf") if self._deadline is None else self._deadline - time.monotonic()

    def _cut(self, bound: float) -> float:
        """``bound``, or less where close's deadline comes first; _OutOfTime when it has come."""
        left = self._time_left()
        if left <= 0:
            self._end_process()
            raise _OutOfTime
        return min(bound, left)

    def _out_of_time_if_cut(self) -> None:
        """After a stall: _OutOfTime if it was close's deadline, not the batch's bound, that ran out."""
        if self._time_left() <= 0:
            raise _OutOfTime

    def _ensure_process(self) -> ConversionProcess:
        if self._process is None:
            self._process = self._ready(self._spawn())
        return self._process

    def _spawn(self) -> ConversionProcess:
        """A new conversion process, starting (not waited for: see _ready)."""
        assert self._store_factory is not None  # process mode
        return ConversionProcess(
            self._store_factory,
            self.text_mode,
            self._scrub_texts,
            cutoff=lambda: float("inf") if self._deadline is None else self._deadline,
        )

    def _ready(self, process: ConversionProcess) -> ConversionProcess:
        """``process`` once it has started (imported pyarrow, built its store, warmed up); killed if it cannot."""
        try:
            process.call(min(_START_TIMEOUT_S, max(self._time_left(), 0.0)), "ping")
        except BaseException:
            process.kill()
            raise
        return process

    def _replace_process(self) -> None:
        """Kills the conversion process; the next batch starts another."""
        if self._process is not None:
            self._process.kill()
            self._process = None

    def _end_process(self) -> None:
        if self._process is not None:
            self._process.close(max(min(self._time_left(), 10.0), 0.0))
            self._process = None
        if isinstance(self._spool, Spool):
            self._spool.close()

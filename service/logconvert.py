"""Records -> what the request log's store writes, and the conversion process that does it.

``Converter`` turns a batch of records into a table (service.logbatch, column by column) or,
for a batch that path cannot take, rows record by record (service.logrows); it runs in the
request log's writer thread or, by default, in one long-lived conversion process whose entry
points are the ``child_*`` functions below (service.requestlog starts and feeds it).
"""

from __future__ import annotations

import functools
import gc
import logging
import marshal
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from loragate.common.logschema import REQUESTS
from loragate.common.scrub import scrub
from loragate.service.logrows import FeedbackRecord, RequestRecord, TextMode, as_record, feedback_row, request_row
from loragate.service.logspool import Spooled, SpoolUnreadable, mapped

log = logging.getLogger("loragate.requestlog")


@runtime_checkable
class Store(Protocol):
    def write(self, table: str, rows: Any) -> int:
        """Write ``rows`` of ``table`` ("requests" or "feedback") durably: a pa.Table in the table's schema
        (the requests, service.logbatch) or a list of row dicts; returns the files written."""


class Converter:
    """Records -> a table for the store, with one scrub cache; used by the writer thread or the conversion process.

    A requests batch is built column by column (service.logbatch); a batch that path cannot take
    (a record that does not parse, say) is converted record by record instead, each unreadable
    record logged and skipped. Imports pyarrow when first used: only where the store lives.
    """

    def __init__(self, text_mode: TextMode) -> None:
        self.text_mode = text_mode
        self._scrub_cached = functools.lru_cache(maxsize=4096)(scrub)

    def write(self, store: Store, table: str, records: list[tuple]) -> tuple[int, int]:
        """(rows written, records unreadable); a store error propagates (the caller retries)."""
        return _stored(store, table, *self.convert(table, records))

    def write_batch(self, store: Store, table: str, batch: bytes | mmap.mmap) -> tuple[int, int]:
        """``write`` for a batch as it crossed (the marshalled list of its records, service/logqueue.py)."""
        return _stored(store, table, *self.convert_batch(table, batch))

    def convert_batch(self, table: str, batch: bytes | mmap.mmap) -> tuple[Any, int]:
        """``convert`` for a batch as it crossed: a requests batch is read straight into columns where the C
        reader can, else unmarshalled."""
        if table == REQUESTS:
            from loragate.service.logbatch import batch_table  # pyarrow: where the store is

            try:
                data = batch_table(batch, self.text_mode, self._clean_all)
                if data is not None:
                    return data, 0
            except Exception as exc:  # the columnar path again, and then record by record, from the records
                log.debug("request log: a batch read from its records (%s: %s)", type(exc).__name__, exc)
        return self.convert(table, marshal.loads(batch))

    def convert(self, table: str, records: list[tuple]) -> tuple[Any, int]:
        """(a pa.Table or a list of row dicts, records unreadable).

        ``records`` hold each record's fields in its NamedTuple's order: the NamedTuples themselves, or
        the plain tuples a batch unmarshals to (made NamedTuples only where a record is read on its own).
        """
        if table == REQUESTS and records:
            from loragate.service.logbatch import requests_table  # pyarrow: where the store is

            try:
                return requests_table(records, self.text_mode, self._clean_all), 0
            except Exception as exc:  # one odd record: the batch goes record by record, skipping the unreadable
                log.debug("request log: a batch converted record by record (%s: %s)", type(exc).__name__, exc)
        rows, unreadable = [], 0
        for fields in records:
            try:
                if table == REQUESTS:
                    rows.append(request_row(as_record(RequestRecord, fields), self.text_mode, self._scrub))
                else:
                    rows.append(feedback_row(as_record(FeedbackRecord, fields), self.text_mode))
            except Exception:  # a record we cannot read must not cost the batch
                log.exception("request log: cannot convert a %s record", table)
                unreadable += 1
        return rows, unreadable

    def _clean_all(self, texts: list[str]) -> dict[str, str]:
        """Distinct texts -> scrubbed, all in one call (service.logscrub).

        No cache across batches: a batch holds each distinct text once already, and a text that recurs
        in every batch (a system prompt) costs one scrub a batch. A cache paid for every unique text
        (most of them) and kept nothing: a 5000-record batch turned its 4096 entries over whole.
        """
        from loragate.service.logscrub import scrub_many  # pyarrow: where the store is

        return dict(zip(texts, scrub_many(texts)))

    def _scrub(self, text: str) -> str:
        return self._scrub_cached(text) if len(text) <= 8192 else scrub(text)  # the cache holds at most ~32 MB


def _stored(store: Store, table: str, data: Any, unreadable: int) -> tuple[int, int]:
    """Writes the converted rows (if any): (rows written, records unreadable)."""
    if len(data):
        store.write(table, data)
    return len(data), unreadable


class _Child:
    """State of the conversion process (one per pool, built by ``child_init``)."""

    store: Store
    converter: Converter


_child = _Child()  # lives in the conversion process only; the gateway's process never sets it


def child_init(store_factory: Callable[[], Store], text_mode: TextMode, parent_pid: int) -> None:
    # The gateway decides when this process ends: a SIGTERM sent to the whole process group
    # (a terminal, systemd, `kill -- -pgid`) must not kill it before the gateway's last flush.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="loragate-parent-watch",
                     daemon=True).start()
    import pyarrow as pa

    # The C library's allocator, not Arrow's default (mimalloc): mimalloc gave the pages of every batch back to
    # the kernel and faulted them in again for the next: 12-19 us of system time a row, 2-6 with glibc (JSON, c=32).
    pa.set_memory_pool(pa.system_memory_pool())
    _child.converter = Converter(text_mode)
    _child.store = store_factory()
    gc.freeze()  # what start-up loaded is never garbage: later collections skip it


def _exit_with_parent(parent_pid: int) -> None:
    """A gateway killed hard (SIGKILL, OOM) cannot shut the pool down: do not outlive it."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def child_ping() -> int:
    return os.getpid()


# A batch is one marshal of its records' fields (service.logqueue marshals each record as it is queued),
# which crosses to the conversion process as it is. Records hold plain values only (str, bytes, numbers,
# None), which marshal writes about twice as fast as pickle (no memo), and both processes run the same Python.
# A requests batch is read from those bytes straight into columns by the queue's C reader (Converter.write_batch);
# a batch it cannot read is unmarshalled, and its tuples converted as they are (no NamedTuple a record).
def child_write(table: str, packed: bytes | Spooled) -> tuple[int, int, str | None]:
    """(rows written, records unreadable, store error or None): runs in the conversion process.

    ``packed`` is the marshalled batch, or where it is spooled (service.logspool); a spooled batch this
    process cannot map raises SpoolUnreadable, for the gateway to send the bytes instead.
    """
    # A batch makes ~100 objects a record (parsed requests and answers) that reference counting frees: the
    # cyclic GC walking them meanwhile was a quarter of a streamed record's cost (measured). Off for the batch.
    gc.disable()
    try:
        if isinstance(packed, Spooled):
            with mapped(packed) as view:
                written, unreadable = _child.converter.write_batch(_child.store, table, view)
        else:
            written, unreadable = _child.converter.write_batch(_child.store, table, packed)
    except SpoolUnreadable:
        raise
    except Exception as exc:  # sent back as text: any exception type, picklable or not
        return 0, 0, f"{type(exc).__name__}: {exc}"
    finally:
        gc.enable()
    return written, unreadable, None

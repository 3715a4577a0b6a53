"""The request log's queue: records waiting for their batch, kept as the bytes the batch will cross in.

A batch reaches the conversion process as one marshal of its records (service.requestlog.convert). The C
queue (service/requestlog/_logqueue.c) marshals each record when it is queued, into one growing buffer, and
``take`` hands a batch over as those bytes: the request's objects (its payload and answer bytes)
are freed with the request instead of living until their batch is written, and the writer thread
has nothing left to pack. Holding the records as tuples until the flush and marshalling them there
cost the gateway ~4% CPU per request at c=32 (measured against the log dropping them unheld).

``PyRecordQueue`` is the same queue in Python (records held as tuples, marshalled by ``take``),
for an install without a C compiler; both give the same bytes (tests/unit/test_logqueue.py).
"""

from __future__ import annotations

import marshal
import mmap
from collections import deque
from typing import Protocol

MARSHAL_VERSION = 2  # no back-references: each record's bytes stand alone, so a batch is their concatenation


class RecordQueue(Protocol):
    def append(self, record: tuple, /) -> None:
        """Queue ``record`` (plain values only). A value marshal cannot write raises ValueError, queuing nothing
        (the C queue, at once; the Python one when ``take`` marshals the batch)."""

    def take(self, limit: int, /) -> bytes:
        """The first min(limit, len) records, removed: marshal.dumps(list of them, 2)."""

    def __len__(self) -> int: ...


class PyRecordQueue:
    def __init__(self) -> None:
        self._records: deque[tuple] = deque()  # append/popleft need no lock: one thread each

    def append(self, record: tuple, /) -> None:
        self._records.append(tuple(record))

    def take(self, limit: int, /) -> bytes:
        take = self._records.popleft
        return marshal.dumps([take() for _ in range(min(limit, len(self._records)))], MARSHAL_VERSION)

    def __len__(self) -> int:
        return len(self._records)


try:  # built by setup.py where a C compiler is
    from loragate.service.requestlog._logqueue import RecordQueue as NativeRecordQueue
except ImportError:  # pragma: no cover - the tests require it built
    NativeRecordQueue = None  # type: ignore[assignment,misc]


def batch_count(batch: bytes | memoryview | mmap.mmap) -> int:
    """The records in a batch ``take`` gave (a marshalled list: "[" and a little-endian 32-bit count); ValueError
    for bytes that cannot be one. Each record takes at least 5 bytes (a tuple's "(" and its count), so a count
    past that is corrupt: refused before marshal reserves room for it."""
    if len(batch) < 5 or batch[0] != ord("["):
        raise ValueError("not a request-log batch")
    count = int.from_bytes(batch[1:5], "little")
    if count > (len(batch) - 5) // 5:
        raise ValueError(f"a corrupt request-log batch: {count} records in {len(batch)} bytes")
    return count


def record_queue() -> RecordQueue:
    return NativeRecordQueue() if NativeRecordQueue is not None else PyRecordQueue()

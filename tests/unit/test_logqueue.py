"""The request log's queue (service/requestlog/queue.py, _logqueue.c): records kept marshalled until their batch.

Both queues must give, for any records of plain values, exactly the bytes ``marshal.dumps(records, 2)``
gives (the conversion process reads a batch with marshal.loads), in the order they came, ``limit``
at a time.
"""

from __future__ import annotations

import marshal
import math
import random

import pytest

from loragate.service.requestlog import queue as logqueue
from loragate.service.requestlog._logqueue import RecordQueue as NativeRecordQueue  # must be built (setup.py)
from loragate.service.requestlog.queue import PyRecordQueue
from loragate.service.metrics import Metrics
from loragate.service.requestlog import RequestLog

QUEUES = (NativeRecordQueue, PyRecordQueue)


def plain_value(draw: random.Random) -> object:
    """A value of a kind a record holds, with the edges of each kind's marshal format."""
    kind = draw.randrange(9)
    if kind == 0:
        return draw.choice([None, True, False])
    if kind == 1:  # around the 32-bit boundary, where marshal's int format changes
        return draw.choice(
            [0, 1, -1, 2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**63, -(2**70), draw.randrange(-(10**6), 10**6)]
        )
    if kind == 2:
        return draw.choice([0.0, -0.0, 1.5, 1e-300, math.inf, -math.inf, math.nan, draw.random() * 1e9])
    if kind == 3:
        return bytes(draw.randrange(256) for _ in range(draw.randrange(0, 300)))
    if kind == 4:  # ASCII, the C queue's own path
        return "".join(chr(draw.randrange(0, 128)) for _ in range(draw.randrange(0, 120)))
    if kind == 5:  # non-ASCII, astral, and lone surrogates (marshal writes them with surrogatepass)
        return "".join(
            draw.choice(["é", "日本", "\U0001f600", "\udc80", "a", "\x00"]) for _ in range(draw.randrange(1, 30))
        )
    if kind == 6:
        return (draw.randrange(10), "nested", None)
    if kind == 7:
        return ""
    return draw.choice([b"", b"data: [DONE]\n\n"])


def records(seed: int, count: int) -> list[tuple]:
    draw = random.Random(seed)
    return [tuple(plain_value(draw) for _ in range(draw.randrange(0, 20))) for _ in range(count)]


def same(a: object, b: object) -> bool:
    """Equal, NaN equal to NaN (marshal keeps NaN; == does not hold for it)."""
    return marshal.dumps(a, 2) == marshal.dumps(b, 2)


@pytest.mark.parametrize("make", QUEUES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_batch_is_the_marshal_of_its_records_in_order(make, seed):
    queued = records(seed, 400)
    queue = make()
    for record in queued:
        queue.append(record)
    assert len(queue) == 400
    first = queue.take(150)
    assert first == marshal.dumps(queued[:150], 2)
    assert len(queue) == 250
    rest = queue.take(10_000)
    assert rest == marshal.dumps(queued[150:], 2)
    assert same(marshal.loads(first) + marshal.loads(rest), queued)
    assert len(queue) == 0 and queue.take(5) == marshal.dumps([], 2)


@pytest.mark.parametrize("make", QUEUES)
def test_records_queued_between_takes_keep_their_order(make):
    queue, expected, taken = make(), [], []
    for index in range(3000):
        record = (f"id-{index}", index, float(index), b"x" * (index % 50))
        queue.append(record)
        expected.append(record)
        if index % 700 == 699:
            taken += marshal.loads(queue.take(500))
    taken += marshal.loads(queue.take(len(queue)))
    assert taken == expected


def test_a_record_is_a_tuple_and_a_tuple_subclass_is_kept_as_a_tuple():
    queue = NativeRecordQueue()
    with pytest.raises(TypeError, match="tuple"):
        queue.append(["a", 1])  # type: ignore[arg-type]
    from loragate.service.requestlog import RequestRecord

    record = RequestRecord(
        "r1", 1.0, "route", "v1", "chat/completions", 200, False, None, 0.1, None, 1, 2, 0.0, 0.0, b"{}", b"{}"
    )
    queue.append(record)
    assert queue.take(1) == marshal.dumps([tuple(record)], 2)


def test_a_value_marshal_cannot_write_leaves_nothing_queued():
    queue = NativeRecordQueue()
    queue.append(("before", 1))
    size = queue.nbytes
    with pytest.raises(ValueError):
        queue.append(("half", 2, b"written", object()))  # the first three fields were written: undone
    assert len(queue) == 1 and queue.nbytes == size
    queue.append(("after", 3))
    assert marshal.loads(queue.take(10)) == [("before", 1), ("after", 3)]
    with pytest.raises(ValueError):
        queue.take(-1)


def test_the_gateway_uses_the_c_queue():
    assert isinstance(logqueue.record_queue(), NativeRecordQueue)


def test_a_record_that_cannot_be_queued_is_counted_failed_and_the_request_path_goes_on(tmp_path):
    from loragate.service.requestlog.store import ParquetStore, read_table
    from tests.unit.test_requestlog import chat_record, counted

    metrics = Metrics()
    sink = RequestLog(ParquetStore(str(tmp_path)), metrics, convert="thread")
    sink.record(chat_record("r1"))
    sink.record(chat_record("r2")._replace(fallback=object()))  # a bug where the record is built
    sink.record(chat_record("r3"))
    sink.close()
    assert counted(metrics, "failed") == 1 and counted(metrics, "written") == 2
    assert sorted(read_table(str(tmp_path), "requests").column("request_id").to_pylist()) == ["r1", "r3"]


def test_a_corrupt_batch_count_is_refused_before_anything_is_reserved():
    from loragate.service.requestlog.convert import Converter

    queue = NativeRecordQueue()
    for index in range(3):
        queue.append(("r", index, b""))
    batch = queue.take(3)
    assert logqueue.batch_count(batch) == 3 and logqueue.batch_count(marshal.dumps([], 2)) == 0
    corrupt = b"[" + (2**31 - 1).to_bytes(4, "little") + batch[5:]  # marshal would reserve 16 GiB of slots
    for broken in (corrupt, b"", b"[\x01", b"(" + batch[1:]):
        with pytest.raises(ValueError):
            logqueue.batch_count(broken)
    with pytest.raises(ValueError):
        Converter("none").write_batch(object(), "feedback", corrupt)

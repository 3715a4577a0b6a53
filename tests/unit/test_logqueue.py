"""The request log's queue (service/logqueue.py, service/_logqueue.c): records kept marshalled until their batch.

Both queues must give, for any records of plain values, exactly the bytes ``marshal.dumps(records, 2)``
gives (the conversion process reads a batch with marshal.loads), in the order they came, ``limit``
at a time. ``read_columns`` reads such a batch back one column a field, or gives up (None).
"""

from __future__ import annotations

import marshal
import math
import random
import struct

import pytest

from loragate.service import logqueue
from loragate.service._logqueue import RecordQueue as NativeRecordQueue  # must be built (setup.py)
from loragate.service._logqueue import read_columns
from loragate.service.logqueue import PyRecordQueue
from loragate.service.metrics import Metrics
from loragate.service.requestlog import RequestLog

QUEUES = (NativeRecordQueue, PyRecordQueue)


def plain_value(draw: random.Random) -> object:
    """A value of a kind a record holds, with the edges of each kind's marshal format."""
    kind = draw.randrange(9)
    if kind == 0:
        return draw.choice([None, True, False])
    if kind == 1:  # around the 32-bit boundary, where marshal's int format changes
        return draw.choice([0, 1, -1, 2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**63, -(2**70), draw.randrange(-10**6, 10**6)])
    if kind == 2:
        return draw.choice([0.0, -0.0, 1.5, 1e-300, math.inf, -math.inf, math.nan, draw.random() * 1e9])
    if kind == 3:
        return bytes(draw.randrange(256) for _ in range(draw.randrange(0, 300)))
    if kind == 4:  # ASCII, the C queue's own path
        return "".join(chr(draw.randrange(0, 128)) for _ in range(draw.randrange(0, 120)))
    if kind == 5:  # non-ASCII, astral, and lone surrogates (marshal writes them with surrogatepass)
        return "".join(draw.choice(["é", "日本", "\U0001F600", "\udc80", "a", "\x00"]) for _ in range(draw.randrange(1, 30)))
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

    record = RequestRecord("r1", 1.0, "route", "v1", "chat/completions", 200, False, None, 0.1, None, 1, 2, 0.0,
                           0.0, b"{}", b"{}")
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
    from loragate.service.logstore import ParquetStore, read_table
    from tests.unit.test_requestlog import chat_record, counted

    metrics = Metrics()
    sink = RequestLog(ParquetStore(str(tmp_path)), metrics, convert="thread")
    sink.record(chat_record("r1"))
    sink.record(chat_record("r2")._replace(fallback=object()))  # a bug where the record is built
    sink.record(chat_record("r3"))
    sink.close()
    assert counted(metrics, "failed") == 1 and counted(metrics, "written") == 2
    assert sorted(read_table(str(tmp_path), "requests").column("request_id").to_pylist()) == ["r1", "r3"]


# --- a batch read back as columns (read_columns) ----------------------------------------------------------

SPEC = "AFISibyA?F?I?S?y?"
KINDS = [letter for letter in SPEC if letter != "?"]
NULLABLE = [SPEC[i + 1:i + 2] == "?" for i, letter in enumerate(SPEC) if letter != "?"]


def column_value(draw: random.Random, kind: str, nullable: bool) -> object:
    if nullable and draw.random() < 0.2:
        return None
    if kind in "AS":  # ASCII, non-ASCII and astral; S also repeats (the reader shares a value equal to the one before)
        return draw.choice(["", "support", "v1", "日本", "\U0001F600x", "é" * draw.randrange(5),
                            "".join(chr(draw.randrange(32, 127)) for _ in range(draw.randrange(40)))])
    if kind == "F":  # a float, or an int of 32 bits (taken as its float)
        return draw.choice([0.0, -0.0, 1.5, math.inf, -math.inf, 1e-300, draw.random() * 1e9, 0, -(2**31), 2**31 - 1])
    if kind in "Ii":
        return draw.choice([0, 1, -1, 2**31 - 1, -(2**31), draw.randrange(-10**6, 10**6)])
    if kind == "b":
        return draw.random() < 0.5
    return bytes(draw.randrange(256) for _ in range(draw.randrange(0, 50)))


def decoded(column: object, kind: str, count: int) -> list:
    """A column read_columns gave, as the list of values it stands for (its buffers read with struct)."""
    if kind not in "AFI":
        return column  # type: ignore[return-value]
    validity, *buffers, nulls = column  # type: ignore[misc]
    valid = [validity is None or bool(validity[i // 8] >> (i % 8) & 1) for i in range(count)]
    assert nulls == valid.count(False)
    if kind == "A":
        offsets, chars = struct.unpack(f"<{count + 1}i", buffers[0]), buffers[1]
        values: list = [chars[offsets[i]:offsets[i + 1]].decode() for i in range(count)]
    else:
        values = list(struct.unpack(f"<{count}{'d' if kind == 'F' else 'q'}", buffers[0]))
    return [value if ok else None for value, ok in zip(values, valid)]


@pytest.mark.parametrize("make", QUEUES)
@pytest.mark.parametrize("seed", [4, 5])
def test_a_batch_read_as_columns_holds_every_field_of_every_record(make, seed):
    draw = random.Random(seed)
    rows = [tuple(column_value(draw, kind, nullable) for kind, nullable in zip(KINDS, NULLABLE)) for _ in range(300)]
    queue = make()
    for row in rows:
        queue.append(row)
    columns = read_columns(queue.take(len(rows)), SPEC)
    assert columns is not None and len(columns) == len(KINDS)
    for index, (kind, column) in enumerate(zip(KINDS, columns)):
        expected = [row[index] if kind not in "FI" or row[index] is None else
                    (float(row[index]) if kind == "F" else row[index]) for row in rows]
        assert same(decoded(column, kind, len(rows)), expected), (index, kind)
    shared = columns[KINDS.index("S")]
    assert any(a is b for a, b in zip(shared, shared[1:]) if a is not None)  # repeats are one object
    empty = read_columns(make().take(10), SPEC)
    assert empty is not None and [decoded(column, kind, 0) for kind, column in zip(KINDS, empty)] == [[]] * len(KINDS)


@pytest.mark.parametrize("odd", [
    ("x", "1.0", 1, "s", 1, True, b"", None, None, None, None, None),  # a str where a float goes
    (None, 1.0, 1, "s", 1, True, b"", None, None, None, None, None),  # None where none may be
    ("x", 1.0, 2**31, "s", 1, True, b"", None, None, None, None, None),  # an int over 32 bits
    ("x", 1.0, 1, "s", 1, 1, b"", None, None, None, None, None),  # an int where a bool goes
    ("\udc80", 1.0, 1, "s", 1, True, b"", None, None, None, None, None),  # not UTF-8 (Arrow's strings must be)
    ("x", 1.0, 1, "s", 1, True, b""),  # a record of another length
    ("x", 1.0, 1, "s", 1, True, "not bytes", None, None, None, None, None),
    ("x", 1.5, 1, "s", 1, True, b"", None, None, 2.5, None, None),  # a float in an int column
])
def test_read_columns_gives_up_on_what_it_does_not_read(odd):
    good = ("x", 1.0, 1, "s\udc80", 1, False, b"y", None, None, None, None, None)  # S keeps a lone surrogate
    queue = NativeRecordQueue()
    queue.append(good)
    assert read_columns(queue.take(1), SPEC)[KINDS.index("S")] == ["s\udc80"]
    queue.append(good)
    queue.append(odd)
    assert read_columns(queue.take(2), SPEC) is None


def test_read_columns_gives_up_on_bytes_that_are_not_a_whole_batch():
    queue = NativeRecordQueue()
    for _ in range(3):
        queue.append(("x", 1.0, 1, "s", 1, True, b"y", None, None, None, None, None))
    batch = queue.take(3)
    assert read_columns(batch, SPEC) is not None
    for broken in (batch[:-1], batch + b"N", b"", b"(" + batch[1:], batch[:5], b"[\xff\xff\xff\x7f"):
        assert read_columns(broken, SPEC) is None, broken
    with pytest.raises(ValueError, match="bad spec"):
        read_columns(batch, "AQ")

"""The request log's sample key, and the file layout that lets a sampled read skip most of a file.

Each row's **sample key** is a 64-bit hash of its request id (:func:`key_array`). The monitor samples a
window by taking the rows of smallest key (monitoring/logscan.py), so the writers (the gateway,
service/requestlog/store.py; compaction, monitoring/compaction.py) put a file's rows in (bucketed) key order,
in row groups of :data:`ROW_GROUP_ROWS` rows (a gateway file's first: :data:`FIRST_GROUP_ROWS`), and
record each row group's smallest and largest key in the file's footer (:data:`RANGES_KEY`). A sampled read
then decodes request ids, and text, only of the row groups whose smallest key is under the sample's
threshold: on a 10-second file of a busy hour, its first. Parquet's own statistics cannot carry this (the
key is not a column) and pyarrow cannot skip pages by the page index (apache/arrow#45284), so the key
ranges are per row group, in the footer's key-value metadata.

Imported by the gateway and the monitor: pyarrow only (the gateway never imports numpy).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

ROW_GROUP_ROWS = 1024
"""Rows in a Parquet row group of the request log (gateway files and compacted files). The unit a sampled
read skips or reads whole: smaller skips more text (a busy hour's 10-second file of ~7,000 rows has ~7
sampled rows, all in its first row group) at ~1-2% more bytes on disk than one row group a file
(bench/results/monitor_volume_rowgroups.json)."""

FIRST_GROUP_ROWS = 256
"""Rows in the first row group of a gateway file (its smallest keys), before groups of :data:`ROW_GROUP_ROWS`.
A sample of a busy window takes a few rows a file, all among its smallest keys: from 3,600 files an hour
(10 replicas) each file's first group is read whole, so its size is the text read per file."""


def group_sizes(rows: int) -> list[int]:
    """A gateway file's row group sizes: :data:`FIRST_GROUP_ROWS`, then :data:`ROW_GROUP_ROWS` each."""
    if rows <= FIRST_GROUP_ROWS:
        return [rows] if rows else []
    rest = rows - FIRST_GROUP_ROWS
    return [FIRST_GROUP_ROWS] + [min(ROW_GROUP_ROWS, rest - start) for start in range(0, rest, ROW_GROUP_ROWS)]


RANGES_KEY = b"loragate.sample_key_ranges"
"""Footer key: JSON list, per row group, of ``[smallest, largest]`` sample key of its rows."""

_MULTIPLIER = 0x100000001B3  # odd: the polynomial hash below is a bijection of each byte position
_MAX_POSITION = 256  # bytes of an id past this one share a power (ids are short; the hash stays defined)
_POWERS = [pow(_MULTIPLIER, i + 1, 1 << 64) for i in range(_MAX_POSITION)]


def key_array(ids: "pa.Array | pa.ChunkedArray") -> "pa.UInt64Array":
    """A 64-bit hash of each string (stable across versions and machines; vectorised, no Python loop).

    A polynomial hash of the bytes modulo 2**64 (odd multiplier), plus the length, through the
    splitmix64 finaliser so that every output bit depends on every input bit. Nulls hash as "".
    Arrow compute only (wrapping integer arithmetic), so the gateway, which never imports numpy, writes
    the same keys the monitor reads (monitoring/logscan.sample_keys: the numpy view).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    u64 = pa.uint64()
    ids = pc.fill_null(ids.cast(pa.large_string()), "")
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    n = len(ids)
    offsets = pa.Array.from_buffers(pa.int64(), n + 1, [None, ids.buffers()[1]], offset=ids.offset)
    first = offsets[0].as_py() if n else 0
    offsets = pc.subtract(offsets, pa.scalar(first, pa.int64()))
    starts, ends = offsets.slice(0, n), offsets.slice(1, n)
    lengths = pc.subtract(ends, starts)
    out = lengths.cast(u64)
    total = ends[n - 1].as_py() if n else 0
    if total:
        data = pa.Array.from_buffers(pa.uint8(), total, [None, ids.buffers()[2]], offset=first)
        nonempty = pc.greater(lengths, 0)
        string_start = pc.run_end_decode(
            pa.RunEndEncodedArray.from_arrays(ends.filter(nonempty), starts.filter(nonempty))
        )  # each byte: the offset of its string
        position = pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), total)), string_start)
        power = pc.take(pa.array(_POWERS, u64), pc.min_element_wise(pc.subtract(position, 1), _MAX_POSITION - 1))
        terms = pc.multiply(pc.add(data.cast(u64), pa.scalar(1, u64)), power)  # wraps modulo 2**64
        running = pa.concat_arrays([pa.array([0], u64), pc.cumulative_sum(terms)])
        out = pc.add(out, pc.subtract(pc.take(running, ends), pc.take(running, starts)))
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
        out = pc.bit_wise_xor(out, pc.shift_right(out, pa.scalar(shift, u64)))
        if multiplier is not None:
            out = pc.multiply(out, pa.scalar(multiplier, u64))
    return out


def key_order(table: "pa.Table") -> "tuple[pa.Table, pa.UInt64Array]":
    """``table``'s rows in sample-key order (rows of one key, a request and its shadow answers, keep their
    order: the sort is stable), and their keys in that order."""
    import pyarrow.compute as pc

    keys = key_array(table["request_id"])
    order = pc.sort_indices(keys)
    return table.take(order), keys.take(order)


def ranges(keys: "Any", group_sizes: "list[int]") -> bytes:
    """The footer value for row groups of ``group_sizes`` consecutive rows of ``keys`` (in file order; an
    Arrow or numpy array of uint64)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = pa.array(keys, pa.uint64())
    out, start = [], 0
    for size in group_sizes:
        found = pc.min_max(keys.slice(start, size))
        out.append([found["min"].as_py() or 0, found["max"].as_py() or 0])
        start += size
    return json.dumps(out, separators=(",", ":")).encode()


def read_ranges(metadata: Any) -> "list[tuple[int, int]] | None":
    """Each row group's key range from a file's ``pq.FileMetaData``; None when the writer recorded none
    (files of older writers) or the list does not match the row groups."""
    raw = (metadata.metadata or {}).get(RANGES_KEY)
    if raw is None:
        return None
    try:
        found = [(int(low), int(high)) for low, high in json.loads(raw)]
    except (ValueError, TypeError):
        return None
    return found if len(found) == metadata.num_row_groups else None

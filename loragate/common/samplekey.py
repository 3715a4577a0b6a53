"""The request log's sample key, and the file layout that lets a sampled read skip most of a file.

Each row's **sample key** is a 64-bit hash of its request id (:func:`sample_keys`). The monitor samples a
window by taking the rows of smallest key (monitoring/logscan.py), so the writers (the gateway,
service/requestlog/store.py; compaction, monitoring/compaction.py) put a file's rows in (bucketed) key order,
in row groups of :data:`ROW_GROUP_ROWS` rows, and record each row group's smallest and largest key in the
file's footer (:data:`RANGES_KEY`). A sampled read then decodes request ids, and text, only of the row
groups whose smallest key is under the sample's threshold: on a 10-second file of a busy hour, its first.
Parquet's own statistics cannot carry this (the key is not a column) and pyarrow cannot skip pages by the
page index (apache/arrow#45284), so the key ranges are per row group, in the footer's key-value metadata.

Imported by the gateway and the monitor: numpy and pyarrow only.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

ROW_GROUP_ROWS = 1024
"""Rows in a Parquet row group of the request log (gateway files and compacted files). The unit a sampled
read skips or reads whole: smaller skips more text (a busy hour's 10-second file of ~7,000 rows has ~7
sampled rows, all in its first row group) at ~1-2% more bytes on disk than one row group a file
(bench/results/monitor_volume_rowgroups.json)."""

RANGES_KEY = b"loragate.sample_key_ranges"
"""Footer key: JSON list, per row group, of ``[smallest, largest]`` sample key of its rows."""

_MULTIPLIER = 0x100000001B3  # odd: the polynomial hash below is a bijection of each byte position
_MAX_POSITION = 256  # bytes of an id past this one share a power (ids are short; the hash stays defined)


def sample_keys(ids: "pa.Array | pa.ChunkedArray") -> "np.ndarray":
    """A 64-bit hash of each string (stable across versions and machines; vectorised, no Python loop).

    A polynomial hash of the bytes modulo 2**64 (odd multiplier), plus the length, through the
    splitmix64 finaliser so that every output bit depends on every input bit. Nulls hash as "".
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pc.fill_null(ids.cast(pa.large_string()), "")
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    n = len(ids)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64, count=n + 1, offset=ids.offset * 8)
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]] if n else np.zeros(0, np.uint8)
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    out = lengths.astype(np.uint64)
    if len(data):
        powers = np.cumprod(np.full(_MAX_POSITION, _MULTIPLIER, dtype=np.uint64))
        position = np.arange(len(data), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        terms = (data.astype(np.uint64) + np.uint64(1)) * powers[np.minimum(position, _MAX_POSITION - 1)]
        nonempty = lengths > 0
        out[nonempty] += np.add.reduceat(terms, offsets[:-1][nonempty])
    out ^= out >> np.uint64(30)
    out *= np.uint64(0xBF58476D1CE4E5B9)
    out ^= out >> np.uint64(27)
    out *= np.uint64(0x94D049BB133111EB)
    out ^= out >> np.uint64(31)
    return out


def key_order(table: "pa.Table") -> "tuple[pa.Table, np.ndarray]":
    """``table``'s rows in sample-key order (rows of one key, a request and its shadow answers, keep their
    order), and their keys in that order."""
    import numpy as np
    import pyarrow as pa

    keys = sample_keys(table["request_id"])
    order = np.argsort(keys, kind="stable")
    return table.take(pa.array(order)), keys[order]


def ranges(keys: "np.ndarray", group_sizes: "list[int]") -> bytes:
    """The footer value for row groups of ``group_sizes`` consecutive rows of ``keys`` (in file order)."""
    import numpy as np

    out, start = [], 0
    for size in group_sizes:
        part = keys[start:start + size]
        out.append([int(np.min(part)), int(np.max(part))] if size else [0, 0])
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

"""Parquet files of the request log, on a local disk or an object store (pyarrow.fs).

Layout, one Hive-style partition per UTC day::

    <root>/requests/date=YYYY-MM-DD/<writer-id>-<YYYYmmddTHHMMSSfff>Z-<seq>.parquet
    <root>/feedback/date=YYYY-MM-DD/...

A file's rows are in sample-key order, in row groups (``samplekey.group_sizes``) whose key
ranges are in its footer (loragate.common.samplekey): the monitor's sampled read skips the rest.

Every file is written whole and appears atomically: on a local disk under a
dot-name (readers such as pyarrow.dataset skip those) and then renamed; on an
object store as one PUT of the final key. The writer id (host and pid by
default) and the per-writer sequence keep names unique, so any number of gateway
replicas and workers write into one root without coordinating.

The columns are the shared schema's (loragate.common.logschema); the filesystem comes from
loragate.common.objectstore. Imported only when the request log is on: pyarrow is an optional
dependency.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import uuid
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from loragate.common import logschema, samplekey
from loragate.common.atomicio import atomic_write
from loragate.common.objectstore import S3Options, filesystem


def default_writer_id() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


_DAY_MS = 86_400_000


class ParquetStore:
    def __init__(
        self,
        url: str,
        *,
        writer_id: str | None = None,
        s3_endpoint: str | None = None,
        s3_region: str | None = None,
        compression: str = "zstd",
    ) -> None:
        self.filesystem, self.root = filesystem(url, S3Options.resolve(s3_endpoint, s3_region))
        self.local = isinstance(self.filesystem, pafs.LocalFileSystem)
        self.writer_id = re.sub(r"[^A-Za-z0-9.-]", "-", writer_id) if writer_id else default_writer_id()
        self.compression = compression
        self._seq = itertools.count()
        if self.local:
            self.filesystem.create_dir(self.root, recursive=True)

    def write(self, table: str, rows: pa.Table | list[dict[str, Any]]) -> int:
        """Write ``rows`` (a table in the schema, or row dicts): one file per UTC day present; returns the files."""
        data = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=logschema.arrow_schema(table))
        if data.num_rows == 0:
            return 0
        days = pc.divide(pc.cast(data["timestamp"], pa.int64()), pa.scalar(_DAY_MS, pa.int64()))  # >= 0: floor
        numbers = sorted(pc.unique(days).to_pylist())
        for number in numbers:
            day_rows = data if len(numbers) == 1 else data.filter(pc.equal(days, pa.scalar(number, pa.int64())))
            day = datetime.fromtimestamp(number * 86_400, timezone.utc).strftime("%Y-%m-%d")
            self._put(f"{self.root}/{table}/date={day}", encode(day_rows, self.compression))
        return len(numbers)

    def _put(self, directory: str, data: pa.Buffer) -> None:
        now = datetime.now(timezone.utc)
        name = f"{self.writer_id}-{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{next(self._seq):06d}.parquet"
        if self.local:
            atomic_write(f"{directory}/{name}", memoryview(data))  # readers skip dot-names: never a torn file
        else:
            with self.filesystem.open_output_stream(f"{directory}/{name}") as out:
                out.write(data)


def encode(rows: pa.Table, compression: str = "zstd") -> pa.Buffer:
    """One log file's bytes: the rows in sample-key order, in row groups of ``samplekey.group_sizes`` (a small
    first one, then ``samplekey.ROW_GROUP_ROWS`` each) with each one's key range in the footer
    (loragate.common.samplekey: a sampled read skips the others), dictionary and statistics for every column but
    the id and free-text ones."""
    ordered, keys = samplekey.key_order(rows)
    groups = samplekey.group_sizes(ordered.num_rows)
    ordered = ordered.replace_schema_metadata(
        {**(ordered.schema.metadata or {}), samplekey.RANGES_KEY: samplekey.ranges(keys, groups)}
    )
    repeating = [name for name in ordered.column_names if name not in logschema.DISTINCT_COLUMNS]
    buffer = pa.BufferOutputStream()
    with pq.ParquetWriter(
        buffer, ordered.schema, compression=compression, use_dictionary=repeating, write_statistics=repeating
    ) as writer:
        start = 0
        for size in groups:  # one call a row group: each call starts a new one
            writer.write_table(ordered.slice(start, size), row_group_size=size)
            start += size
    return buffer.getvalue()


def read_table(url: str, table: str, *, s3_endpoint: str | None = None, s3_region: str | None = None) -> pa.Table:
    """Every row of ``table`` under ``url`` in the current schema (tests, tools); the ``date`` partition
    column included. Files of older schema versions read too (see logschema.conform)."""
    import pyarrow.dataset as ds

    fs, root = filesystem(url, S3Options.resolve(s3_endpoint, s3_region))
    dataset = ds.dataset(
        f"{root}/{table}",
        filesystem=fs,
        format="parquet",
        partitioning="hive",
        schema=logschema.arrow_schema(table).append(pa.field("date", pa.string())),
    )
    return logschema.conform(dataset.to_table(), table)

"""Parquet files of the request log, on a local disk or an object store (pyarrow.fs).

Layout, one Hive-style partition per UTC day::

    <root>/requests/date=YYYY-MM-DD/<writer-id>-<YYYYmmddTHHMMSSfff>Z-<seq>.parquet
    <root>/feedback/date=YYYY-MM-DD/...

Every file is written whole and appears atomically: on a local disk under a
dot-name (readers such as pyarrow.dataset skip those) and then renamed; on an
object store as one PUT of the final key. The writer id (host and pid by
default) and the per-writer sequence keep names unique, so any number of gateway
replicas and workers write into one root without coordinating.

Imported only when the request log is on: pyarrow is an optional dependency.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TIMESTAMP = pa.timestamp("ms", tz="UTC")

SCHEMAS: dict[str, pa.Schema] = {
    "requests": pa.schema([
        ("request_id", pa.string()),
        ("timestamp", TIMESTAMP),
        ("route", pa.string()),
        ("variant", pa.string()),
        ("endpoint", pa.string()),
        ("status", pa.int32()),
        ("stream", pa.bool_()),
        ("fallback", pa.string()),
        ("latency_s", pa.float64()),
        ("ttft_s", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("reference_cost_usd", pa.float64()),
        ("finish_reason", pa.string()),
        ("prompt_text", pa.string()),
        ("response_text", pa.string()),
    ]),
    "feedback": pa.schema([
        ("request_id", pa.string()),
        ("timestamp", TIMESTAMP),
        ("route", pa.string()),
        ("variant", pa.string()),
        ("score", pa.float64()),
        ("label", pa.string()),
        ("correction", pa.string()),
    ]),
}


def default_writer_id() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


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
        self.filesystem, self.root = _filesystem(url, s3_endpoint, s3_region)
        self.local = isinstance(self.filesystem, pafs.LocalFileSystem)
        self.writer_id = re.sub(r"[^A-Za-z0-9.-]", "-", writer_id) if writer_id else default_writer_id()
        self.compression = compression
        self._seq = itertools.count()
        if self.local:
            self.filesystem.create_dir(self.root, recursive=True)

    def write(self, table: str, rows: list[dict[str, Any]]) -> int:
        """One file per UTC day present in ``rows``; returns the number of files written."""
        schema = SCHEMAS[table]
        by_day: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            day = datetime.fromtimestamp(row["timestamp"] / 1000, timezone.utc).strftime("%Y-%m-%d")
            by_day.setdefault(day, []).append(row)
        for day, day_rows in sorted(by_day.items()):
            buffer = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(day_rows, schema=schema), buffer, compression=self.compression)
            self._put(f"{self.root}/{table}/date={day}", buffer.getvalue())
        return len(by_day)

    def _put(self, directory: str, data: pa.Buffer) -> None:
        now = datetime.now(timezone.utc)
        name = f"{self.writer_id}-{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{next(self._seq):06d}.parquet"
        if self.local:
            self.filesystem.create_dir(directory, recursive=True)
            temporary = f"{directory}/.{name}.tmp"
            with self.filesystem.open_output_stream(temporary) as out:
                out.write(data)
            os.replace(temporary, f"{directory}/{name}")
        else:
            with self.filesystem.open_output_stream(f"{directory}/{name}") as out:
                out.write(data)


def _filesystem(url: str, s3_endpoint: str | None, s3_region: str | None) -> tuple[pafs.FileSystem, str]:
    """A local path or file:// URL, or s3://bucket/prefix (credentials from the usual AWS environment)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)).rstrip("/")
    if parsed.scheme == "s3":
        options: dict[str, Any] = {}
        if s3_endpoint:
            endpoint = urlparse(s3_endpoint)
            options["endpoint_override"] = endpoint.netloc or endpoint.path
            options["scheme"] = endpoint.scheme or "https"
        if s3_region:
            options["region"] = s3_region
        return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")
    filesystem, path = pafs.FileSystem.from_uri(url)  # gs://, hdfs:// ...: whatever pyarrow knows
    return filesystem, path.rstrip("/")


def read_table(url: str, table: str, *, s3_endpoint: str | None = None, s3_region: str | None = None) -> pa.Table:
    """Every row of ``table`` under ``url`` (tests, tools); the ``date`` partition column included."""
    filesystem, root = _filesystem(url, s3_endpoint, s3_region)
    import pyarrow.dataset as ds

    dataset = ds.dataset(f"{root}/{table}", filesystem=filesystem, format="parquet", partitioning="hive",
                         schema=SCHEMAS[table].append(pa.field("date", pa.string())))
    return dataset.to_table()

"""Compaction of the request log: each closed hour's small files merged into a few large ones.

The gateway writes one file per writer and flush (10 s by default): an hour is ~360 files per replica.
Each writer's files of a closed hour of one ``date=`` directory (files whose flush stamp is in the hour,
the hour ended more than ``grace_s`` ago) are rewritten as one
``compacted-<YYYYmmddTHH>-<writer>-<digest>.parquet`` file, whose footer names every file it replaces
(``logfiles.COVERS_KEY``, transitively): ten replicas, ten files an hour.

Why readers never see a row twice or miss one (monitoring/logfiles.py reads the other half):

1. A compacted file is written whole before anything is deleted: locally under a dot-name then renamed;
   on an object store straight to its key, where the footer (holding the list of replaced files) is
   written last, so a torn upload has no footer, is not read, and replaces nothing.
2. It is checked (its footer read back, its row count equal to its inputs') before its inputs are deleted.
3. Readers skip every file a present compacted file names, and a reader that finds a file gone plans again.

Why several compactors (monitors) can run at once: a compacted file's name is a digest of the names it
replaces, and its content a function of those files: two compactors that listed the same files write the
same name with the same rows. One that finds an input deleted under it gives up on the hour (the other
finished it). Two that listed different files of one writer's hour (a file arriving late, between their
listings: a writer's clock behind, a slow upload) write two files, one listing a superset of the other's
inputs (files only appear, or vanish once a compacted file names them): readers take the larger and skip
the smaller (logfiles.LogFiles.covered), and the next round deletes it. A late file arriving after
the hour was compacted is read as it is until the next run merges it with the compacted file into a
new one (which names the old one and all it replaced). Grouping by writer (not cutting the hour's
sorted listing at a row count) is what keeps two listings' outputs nested rather than overlapping.

Layout inside a compacted file: rows are grouped into row groups by the top bits of their sample key
(loragate.common.samplekey), in row groups of ``samplekey.ROW_GROUP_ROWS`` rows whose key ranges are in
the footer, so a sampled read (the rows of smallest key) decodes ids and text of the first bucket's row
groups only: its cost stops growing with the hour's rows. Row groups also keep time statistics.
Memory is bounded by ``buffer_bytes`` (rows waiting for their bucket's row group), not by the hour.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from loragate.common import logschema, samplekey
from loragate.monitoring.logfiles import COMPACTED_PREFIX, COVERS_KEY, LogFile, LogFiles
from loragate.monitoring.logkeys import sample_keys

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

log = logging.getLogger("loragate.compaction")


class CompactionConfig(BaseModel):
    """The monitor's ``compaction`` section: compact the request log's closed hours on a schedule."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(600, gt=0)
    grace_s: float = Field(900, ge=0, description="an hour is closed this long after it ended (flush, uploads)")
    days: int = Field(2, ge=1, description="days looked at, today included")


@dataclass
class HourResult:
    directory: str
    hour: str  # YYYYmmddTHH
    inputs: int = 0
    rows: int = 0
    outputs: list[str] = field(default_factory=list)
    deleted: int = 0
    status: str = "compacted"  # compacted | cleaned (only leftovers deleted) | skipped | would_compact (dry run)


class Compactor:
    """Compacts the closed hours of a request-log root (``fs``, ``root`` as common.objectstore.filesystem gives)."""

    def __init__(
        self,
        fs: "pafs.FileSystem",
        root: str,
        *,
        grace_s: float = 900.0,
        row_group_rows: int = samplekey.ROW_GROUP_ROWS,
        buckets: int = 64,
        buffer_bytes: int = 128 << 20,
        parallel: int = 8,
        compression: str = "zstd",
    ) -> None:
        if buckets < 1 or buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        self.fs, self.root = fs, root
        self.files = LogFiles(fs, root, parallel=parallel)
        self.grace_s, self.row_group_rows = grace_s, row_group_rows
        self.buckets, self.buffer_bytes, self.compression = buckets, buffer_bytes, compression

    def run(
        self,
        tables: tuple[str, ...] = logschema.TABLES,
        *,
        days: int = 2,
        now: float | None = None,
        dry_run: bool = False,
    ) -> list[HourResult]:
        """Compact every closed hour of the last ``days`` days (today included) of each table."""
        now = time.time() if now is None else now
        today = datetime.fromtimestamp(now, timezone.utc).date()
        results = []
        for table in tables:
            directories = [self.files.directory(table, (today - timedelta(days=d)).isoformat()) for d in range(days)]
            listing = self.files.listing(directories)
            by_hour: dict[tuple[str, datetime], list[LogFile]] = defaultdict(list)
            for f in listing:
                if f.hour is not None:
                    by_hour[(f.path.rsplit("/", 1)[0], f.hour)].append(f)
            closed = datetime.fromtimestamp(now - self.grace_s, timezone.utc) - timedelta(hours=1)
            for (directory, hour), files in sorted(by_hour.items()):
                if hour <= closed:
                    results.append(self.compact_hour(directory, hour, files, dry_run=dry_run))
        return results

    def compact_hour(
        self, directory: str, hour: datetime, files: list[LogFile], *, dry_run: bool = False
    ) -> HourResult:
        result = HourResult(directory, f"{hour:%Y%m%dT%H}")
        live = self.files.live(files)
        names = self.files.covered(files)
        covered = [f for f in files if (directory, f.name) in names]  # replaced already: left over by a crash
        footers = self._footers(live)
        chunks = self._chunks([f for f in live if f.path in footers], footers)
        work = [c for c in chunks if len(c) > 1 or not c[0].compacted]
        result.inputs = sum(len(c) for c in work)
        if not work:
            result.status = "cleaned" if covered else "skipped"
            if not dry_run:
                result.deleted = self._delete(covered)
            return result
        if dry_run:
            result.status = "would_compact"
            return result
        written: list[tuple[list[LogFile], str]] = []
        for chunk in work:
            try:
                name, rows = self._write(directory, hour, chunk, footers)
            except FileNotFoundError:  # another compactor finished this hour and deleted its inputs
                result.status = "skipped"
                return result
            result.rows += rows
            written.append((chunk, name))
            result.outputs.append(name)
        replaced = [f for chunk, _ in written for f in chunk]
        result.deleted = self._delete(replaced + covered)
        log.info(
            "compacted %s hour %s: %d files, %d rows -> %s",
            directory,
            result.hour,
            result.inputs,
            result.rows,
            ", ".join(result.outputs),
        )
        return result

    def _footers(self, live: list[LogFile]) -> dict[str, tuple[int, "pa.Schema"]]:
        """Each live file's row count and Arrow schema (footers read in parallel: one request each on S3)."""
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.parquet as pq

        def one(f: LogFile) -> tuple[int, "pa.Schema"] | None:
            try:
                with self.fs.open_input_file(f.path) as source:
                    reader = pq.ParquetFile(source)
                    return reader.metadata.num_rows, reader.schema_arrow
            except ValueError:  # pyarrow.ArrowInvalid: not Parquet (torn): left as it is, not compacted
                log.warning("request-log file %s is not readable Parquet: left out of the compaction", f.path)
                return None

        with ThreadPoolExecutor(max(1, self.files.parallel)) as pool:
            found = dict(zip((f.path for f in live), pool.map(one, live)))
        return {path: footer for path, footer in found.items() if footer is not None}

    def _chunks(self, live: list[LogFile], footers: dict) -> list[list[LogFile]]:
        """The live files by writer, in name order (one compacted file per writer and hour)."""
        by_writer: dict[str, list[LogFile]] = defaultdict(list)
        for f in sorted(live, key=lambda f: f.name):
            by_writer[f.writer or ""].append(f)
        return [by_writer[w] for w in sorted(by_writer)]

    def _covers(self, chunk: list[LogFile]) -> list[str]:
        """The names the compacted file replaces: its inputs and, for compacted inputs, what they replaced."""
        from loragate.monitoring.logfiles import covers

        names = {f.name for f in chunk}
        for f in chunk:
            if f.compacted:
                names.update(covers(self.fs, f.path))
        return sorted(names)

    def _write(self, directory: str, hour: datetime, chunk: list[LogFile], footers: dict) -> tuple[str, int]:
        import pyarrow.parquet as pq

        names = self._covers(chunk)
        digest = hashlib.sha256("\n".join(sorted(f.name for f in chunk)).encode()).hexdigest()[:20]
        name = f"{COMPACTED_PREFIX}{hour:%Y%m%dT%H}-{chunk[0].writer}-{digest}.parquet"
        schema = self._schema(chunk, directory.rsplit("/", 2)[-2], footers)
        schema = schema.with_metadata({COVERS_KEY: json.dumps(names).encode()})
        repeating = [n for n in schema.names if n not in logschema.DISTINCT_COLUMNS]
        path = f"{directory}/{name}"
        local = type(self.fs).__name__ == "LocalFileSystem"
        target = f"{directory}/.{name}.tmp" if local else path
        expected = 0
        with self.fs.open_output_stream(target) as out:
            writer = pq.ParquetWriter(
                out, schema, compression=self.compression, use_dictionary=repeating, write_statistics=repeating
            )
            buckets = _Buckets(self, writer, schema)
            for f in sorted(chunk, key=lambda f: f.name):
                with self.fs.open_input_file(f.path) as source:
                    reader = pq.ParquetFile(source)
                    for index in range(reader.num_row_groups):
                        data = reader.read_row_group(index, use_threads=False)
                        expected += data.num_rows
                        buckets.add(_align(logschema.conform(data, schema_table(schema)), schema))
            buckets.close()
            writer.add_key_value_metadata({samplekey.RANGES_KEY: b"[" + b",".join(buckets.ranges) + b"]"})
            writer.close()
        if local:
            self.fs.move(target, path)
        with self.fs.open_input_file(path) as source:  # read back before anything is deleted
            meta = pq.ParquetFile(source).metadata
        got = json.loads((meta.metadata or {}).get(COVERS_KEY, b"[]"))
        if meta.num_rows != expected or got != names:
            raise OSError(f"compacted file {path} does not match its inputs ({meta.num_rows} of {expected} rows)")
        return name, expected

    def _schema(self, chunk: list[LogFile], table: str, footers: dict) -> "pa.Schema":
        """The current schema of ``table``, plus any column a newer writer added (kept, after ours)."""
        schema = logschema.arrow_schema(table)
        for f in chunk:
            for extra in footers[f.path][1]:
                if extra.name not in schema.names:
                    schema = schema.append(extra.remove_metadata())
        return schema

    def _delete(self, files: list[LogFile]) -> int:
        deleted = 0
        for f in files:
            try:
                self.fs.delete_file(f.path)
                deleted += 1
            except FileNotFoundError:
                pass  # another compactor was first
            except OSError as exc:
                if "does not exist" not in str(exc).lower() and "nosuchkey" not in str(exc).lower():
                    raise
        return deleted


def schema_table(schema: "pa.Schema") -> str:
    return logschema.FEEDBACK if "score" in schema.names else logschema.REQUESTS


def _align(data: "pa.Table", schema: "pa.Schema") -> "pa.Table":
    import pyarrow as pa

    columns = [
        data[f.name].cast(f.type) if f.name in data.column_names else pa.nulls(data.num_rows, f.type) for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


class _Buckets:
    """Rows waiting for their bucket's next row group; flushed at ``row_group_rows`` or under memory pressure.

    Input arrives in small tables (a writer's file); it is staged up to ``STAGE_ROWS`` rows and then
    spread over the buckets in one sort, so each bucket gets slices of one table, not a take per file.
    """

    STAGE_ROWS = 65_536

    def __init__(self, compactor: Compactor, writer: "pq.ParquetWriter", schema: "pa.Schema") -> None:
        self.c, self.writer, self.schema = compactor, writer, schema
        self.shift = 64 - max(0, (compactor.buckets - 1).bit_length())
        self.staged: list = []
        self.staged_rows = self.staged_bytes = 0
        self.parts: dict[int, list] = defaultdict(list)
        self.rows: dict[int, int] = defaultdict(int)
        self.bytes: dict[int, int] = defaultdict(int)
        self.ranges: list[bytes] = []  # per row group written: its key range (JSON, samplekey.RANGES_KEY)

    def add(self, data: "pa.Table") -> None:
        self.staged.append(data)
        self.staged_rows += data.num_rows
        self.staged_bytes += data.nbytes
        if self.staged_rows >= self.STAGE_ROWS or self.staged_bytes >= self.c.buffer_bytes // 2:
            self._spread()

    def _spread(self) -> None:
        import numpy as np
        import pyarrow as pa

        if not self.staged:
            return
        data = pa.concat_tables(self.staged)
        self.staged, self.staged_rows, self.staged_bytes = [], 0, 0
        keys = sample_keys(data["request_id"])
        bucket = (
            (keys >> np.uint64(self.shift)).astype(np.int64)
            if self.c.buckets > 1
            else np.zeros(data.num_rows, dtype=np.int64)
        )
        order = np.argsort(bucket, kind="stable")  # stable: rows keep their time order inside a bucket
        data, keys = data.take(pa.array(order)), keys[order]
        ordered = bucket[order]
        edges = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1, len(ordered)]
        for begin, end in zip(edges[:-1], edges[1:]):
            if end <= begin:
                continue
            b = int(ordered[begin])
            rows = data.slice(int(begin), int(end - begin))
            self.parts[b].append((rows, keys[begin:end]))
            self.rows[b] += rows.num_rows
            self.bytes[b] += rows.nbytes
            if self.rows[b] >= self.c.row_group_rows:
                self._flush(b)
        while self.bytes and sum(self.bytes.values()) > self.c.buffer_bytes // 2:
            self._flush(max(self.bytes, key=lambda k: self.bytes[k]))

    def _flush(self, b: int) -> None:
        import pyarrow as pa

        import numpy as np

        parts = self.parts.pop(b, None)
        if parts:
            data = pa.concat_tables([rows for rows, _ in parts]).combine_chunks()
            keys = np.concatenate([k for _, k in parts])
            size = self.c.row_group_rows
            groups = [min(size, len(keys) - start) for start in range(0, len(keys), size)]
            self.writer.write_table(data, row_group_size=size)
            self.ranges.append(samplekey.ranges(keys, groups)[1:-1])
        self.rows.pop(b, None)
        self.bytes.pop(b, None)

    def close(self) -> None:
        self._spread()
        for b in sorted(self.parts):
            self._flush(b)

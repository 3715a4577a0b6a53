"""Read a window of the request log in bounded memory: projected, pruned, and sampled by request id.

Two passes over the window's live files (monitoring/logfiles.py), each file in a bounded thread pool:

1. **Keys.** Only ``request_id``, ``timestamp``, ``route``, ``variant`` and ``role`` are read, row group
   by row group; row groups whose statistics put them outside the window or the filter are skipped, and
   files written before the window are never opened. Each row in the window and the filter is counted
   (the window's true row count, per variant) and gets its **sample key**: a 64-bit hash of its request
   id (:func:`sample_keys`). Where the writer recorded each row group's key range in
   the footer (the gateway and compaction do), a row group whose keys are all above the thresholds is
   only counted: its ids are not decoded. The sample of a variant is its ``per_variant`` rows of smallest key (a
   bottom-k sample): uniform, the same on every rerun, nested as the cap grows, and a primary answer and
   its shadow copy (one request id) are in their variants' samples together whenever both keys are under
   both thresholds (``threshold`` lets a caller take one variant's threshold for another: monitoring/shadow.py).
   Only the candidates (row position and key, a few bytes each) are kept: O(k log(n/k)) of them.
2. **Rows.** The other columns are read only from the row groups that hold sampled rows, file by file,
   and handed on as they are read (``scan`` yields one table per file): the dataset export writes them
   out as they come; ``sample`` gathers them into one (small) frame.

A file that vanishes between the listing and the read was compacted meanwhile: the plan is made again,
and rows already handed on are not handed on again (by request id and role).

Memory: a Parquet footer is parsed whole (~1 KB of C++ heap a column chunk: ~100 MB for a compacted
writer-hour of 10M-row traffic, 4,352 row groups of 22 columns), by the listing (the compacted files' lists)
and by each pass, in pool threads. glibc keeps what those threads free in their own arenas, where the
caller's next work (the drift report, on the main thread) does not reuse it: the 10M compacted drift check
held ~0.9 GB of freed footers through its report. After the plan and after each pass the freed memory is
handed back (:func:`release_memory`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from loragate.common import logschema, samplekey
from loragate.monitoring.logfiles import LogFile, LogFiles

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

KEY_COLUMNS = ("request_id", "timestamp", "route", "variant", "role")
ALL = "*"  # the sample group of every variant together (by_variant=False)
BATCH_ROWS = 65_536  # the key pass reads the narrow columns of up to this many rows' row groups at once
FIRST_BATCH_ROWS = 8_192  # ... and of this many first (a 10-second file's row groups in one read)


@dataclass(frozen=True)
class Filter:
    window_start: datetime
    window_end: datetime
    route: str | None = None
    variant: str | None = None
    role: str | None = logschema.PRIMARY
    ids: frozenset[str] | None = None  # only these request ids (a shadow sample's primaries)


@dataclass
class ScanStats:
    """What a scan saw: the window's rows per variant (before sampling), files and row groups read."""

    window_rows: dict[str, int] = field(default_factory=dict)
    sampled_rows: dict[str, int] = field(default_factory=dict)
    files: int = 0
    files_read: int = 0  # files whose rows (not only keys) were read
    row_groups_read: int = 0  # row groups whose rows (not only keys) were read
    row_groups_counted: int = 0  # row groups whose keys were all above the thresholds: counted, ids not decoded
    replans: int = 0
    unreadable: list[str] = field(default_factory=list)  # files skipped (torn, not Parquet)


def sample_keys(ids: "pa.Array | pa.ChunkedArray") -> "np.ndarray":
    """Each request id's sample key (loragate.common.samplekey.key_array) as a numpy array (read-only)."""
    return samplekey.key_array(ids).to_numpy()


@dataclass
class _Candidates:
    """One file's rows in the window: position in the file, variant, role, request id, sample key."""

    file: LogFile
    rows: "np.ndarray"  # int64 positions in the file, ascending
    variants: "np.ndarray"  # object: str ("" for none)
    roles: "np.ndarray"
    ids: "np.ndarray"
    keys: "np.ndarray"  # uint64
    counts: dict[str, int]
    row_group_starts: list[int]
    counted_only: int = 0  # row groups counted without decoding their ids

    def keep(self, mask: "np.ndarray") -> None:
        self.rows, self.variants, self.roles = self.rows[mask], self.variants[mask], self.roles[mask]
        self.ids, self.keys = self.ids[mask], self.keys[mask]


class WindowScan:
    """One scan of one table; see the module docstring. ``per_variant=None`` reads every row in the window;
    ``by_variant=False`` takes one sample of ``per_variant`` rows for all variants together."""

    def __init__(
        self,
        files: LogFiles,
        table: str,
        where: Filter,
        columns: tuple[str, ...],
        *,
        per_variant: int | None = None,
        threshold: dict[str, int] | None = None,
        by_variant: bool = True,
        parallel: int = 4,
        late_s: float = 900.0,
    ) -> None:
        self.files, self.table, self.where, self.columns = files, table, where, columns
        self.per_variant, self.threshold_of = per_variant, threshold or {}
        self.parallel, self.late_s, self.by_variant = parallel, late_s, by_variant
        self.stats = ScanStats()
        self.thresholds: dict[str, int] = {}  # per variant: the largest sample key taken
        self._ids: "pa.Array | None" = None

    def _id_set(self) -> "pa.Array":
        import pyarrow as pa

        if self._ids is None:
            self._ids = pa.array(sorted(self.where.ids or ()), pa.string())
        return self._ids

    # -- pass 1 -----------------------------------------------------------------------------------

    def _plan(self) -> list[LogFile]:
        days = sorted({d.isoformat() for d in _days(self.where.window_start, self.where.window_end)})
        return self.files.plan(
            self.table, days, start=self.where.window_start, end=self.where.window_end, late_s=self.late_s
        )

    def _keys(self, file: LogFile) -> _Candidates | None:
        """The file's rows in the window and the filter (when sampling: only those under the thresholds
        known when the file is read; they fall as files are read, so few rows of the later files are kept).

        Every row in the window is counted from the narrow columns (time, route, variant, role), in Arrow;
        request ids are decoded and hashed only in row groups that may hold rows under the thresholds: where
        the writer recorded the row groups' key ranges (loragate.common.samplekey), those are read in key
        order and the others are only counted. Only the rows under the thresholds become Python objects
        (variant, role, id: a few a file). Row groups are read in batches of up to ``BATCH_ROWS`` rows,
        doubling from ``FIRST_BATCH_ROWS``: a 10-second file is one batch, a compacted file lowers its own
        thresholds batch by batch."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        w = self.where
        sampling = self.per_variant is not None
        with self.files.fs.open_input_file(file.path) as source:
            reader = pq.ParquetFile(source)
            meta = reader.metadata
            names = reader.schema_arrow.names
            present = [c for c in KEY_COLUMNS if c in names]
            narrow = [c for c in present if c != "request_id" or w.ids is not None]
            sizes = np.array([meta.row_group(i).num_rows for i in range(meta.num_row_groups)], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else sizes
            ranges = samplekey.read_ranges(meta) if sampling and w.ids is None else None
            low = np.array([r[0] for r in ranges] if ranges else [], dtype=np.uint64)
            order = np.argsort(low, kind="stable").tolist() if ranges else range(meta.num_row_groups)
            stats = _StatsColumns(meta, reader.schema_arrow)
            todo = deque(i for i in order if stats.may_match(meta.row_group(i), w))
            positions, variants, roles, ids, keys = [], [], [], [], []
            counts: dict[str, int] = {}
            local: dict[str, int] = {}  # this file's own thresholds (a compacted file is large)
            counted_only, budget = 0, FIRST_BATCH_ROWS
            while todo:
                batch: list[int] = []
                rows = 0
                while todo and (not batch or rows + sizes[todo[0]] <= budget):
                    batch.append(todo.popleft())
                    rows += int(sizes[batch[-1]])
                budget = min(2 * budget, BATCH_ROWS)
                data = reader.read_row_groups(batch, columns=narrow, use_threads=False)
                mask = self._mask(data, present)
                variant = data["variant"] if "variant" in present else pa.nulls(data.num_rows, pa.string())
                variant = _flat(pc.fill_null(variant.cast(pa.string()), ""))
                found = pc.value_counts(pc.filter(variant, mask)).to_pylist()
                if not found:
                    continue
                for item in found:
                    counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
                where = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
                member: np.ndarray = np.repeat(np.arange(len(batch)), sizes[batch])  # each row's group in the batch
                inner = np.arange(data.num_rows) - np.repeat(np.cumsum(sizes[batch]) - sizes[batch], sizes[batch])
                cut = _lower(self.thresholds, local)
                groups = [item["values"] for item in found] if self.by_variant else [ALL]
                top = max(cut.get(v, _NO_LIMIT) for v in groups) if sampling else _NO_LIMIT  # no key above it is taken
                if ranges:  # row groups whose smallest key is above every threshold: counted only
                    open_ = low[batch] <= top
                    counted_only += len(np.unique(member[where][~open_[member[where]]]))
                    where = where[open_[member[where]]]
                    if not len(where):
                        continue
                row_ids = self._ids_of(reader, data, batch, sizes, member, inner, where, present)
                key = sample_keys(row_ids)
                taken = np.flatnonzero(key <= top)
                where, key = where[taken], key[taken]
                if not len(where):
                    continue
                row_variant = (
                    pc.take(variant, pa.array(where)).to_numpy(zero_copy_only=False)
                    if self.by_variant
                    else np.full(len(where), ALL, dtype=object)
                )
                under = key <= _limits(row_variant, cut) if sampling else np.ones(len(where), bool)
                taken, where, key, row_variant = taken[under], where[under], key[under], row_variant[under]
                role = data["role"] if "role" in present else pa.nulls(data.num_rows, pa.string())
                positions.append(starts[batch][member[where]] + inner[where])
                variants.append(row_variant)
                roles.append(
                    pc.fill_null(pc.take(role, pa.array(where)), logschema.PRIMARY).to_numpy(zero_copy_only=False)
                )
                ids.append(pc.take(row_ids, pa.array(taken)))
                keys.append(key)
                if self.per_variant is not None and len(key):  # the file's own thresholds fall batch by batch
                    local.update(_cuts(np.concatenate(variants), np.concatenate(keys), self.per_variant))
        if not counts:
            return None

        def cat(parts: list, dtype: Any) -> "np.ndarray":
            return np.concatenate(parts) if parts else np.zeros(0, dtype)

        found = _Candidates(
            file,
            cat(positions, np.int64),
            cat(variants, object),
            cat(roles, object),
            np.zeros(0, object),
            cat(keys, np.uint64),
            counts,
            starts.tolist(),
            counted_only,
        )
        mask = (
            found.keys <= _limits(found.variants, _lower(self.thresholds, local))
            if sampling
            else np.ones(len(found.keys), bool)
        )
        found.ids = np.asarray(pa.chunked_array(ids, pa.string()).to_pylist() if ids else [], dtype=object)
        found.keep(mask)
        found.keep(np.argsort(found.rows, kind="stable"))  # file order, whatever order the groups were read in
        return found

    def _mask(self, data: "pa.Table", present: list[str]) -> "pa.BooleanArray":
        """The batch's rows in the window and the filter (Arrow; no nulls)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        w, n = self.where, data.num_rows
        stamp = pa.timestamp("ms", tz="UTC")
        stamps = data["timestamp"].cast(stamp)
        mask = pc.and_(
            pc.greater_equal(stamps, pa.scalar(w.window_start, stamp)), pc.less(stamps, pa.scalar(w.window_end, stamp))
        )
        for name, value in (("route", w.route), ("variant", w.variant), ("role", w.role)):
            if value is None:
                continue
            if name not in present:
                column = pa.nulls(n, pa.string())
                if name != "role":
                    return pa.array([False] * n)
            else:
                column = data[name]
            if name == "role":
                column = pc.fill_null(column, logschema.PRIMARY)
            mask = pc.and_(mask, pc.fill_null(pc.equal(column, value), False))
        if w.ids is not None:
            if "request_id" not in present:
                return pa.array([False] * n)
            mask = pc.and_(mask, pc.is_in(data["request_id"], value_set=self._id_set()))
        return _flat(pc.fill_null(mask, False))

    @staticmethod
    def _ids_of(
        reader: Any,
        data: "pa.Table",
        batch: list[int],
        sizes: "np.ndarray",
        member: "np.ndarray",
        inner: "np.ndarray",
        where: "np.ndarray",
        present: list[str],
    ) -> "pa.Array":
        """The request ids of rows ``where`` of the batch: from the batch when it read them, else read from
        the row groups holding those rows only."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        if "request_id" not in present:
            return pa.array([""] * len(where), pa.string())
        if "request_id" in data.column_names:
            return _flat(pc.take(pc.fill_null(data["request_id"].cast(pa.string()), ""), pa.array(where)))
        wanted = np.unique(member[where])
        offset: np.ndarray = np.zeros(len(batch), dtype=np.int64)
        offset[wanted] = np.cumsum(sizes[batch][wanted]) - sizes[batch][wanted]
        column = reader.read_row_groups([batch[m] for m in wanted], columns=["request_id"], use_threads=False)
        column = pc.fill_null(column["request_id"].cast(pa.string()), "")
        return _flat(pc.take(column, pa.array(offset[member[where]] + inner[where])))

    def _pass1(self, plan: list[LogFile], done: dict[str, _Candidates | None]) -> list[str]:
        """Scan the keys of the plan's files not yet in ``done``; returns the paths that vanished."""

        todo = [f for f in plan if f.path not in done]
        pools: dict[str, np.ndarray] = {}  # per variant: keys kept so far (trimmed to the cap)
        for found in done.values():
            if found is not None:
                self._pool(pools, found)
        vanished: list[str] = []
        with ThreadPoolExecutor(max(1, self.parallel)) as pool:
            futures = [(f, pool.submit(self._keys, f)) for f in todo]
            for f, future in futures:
                try:
                    found = future.result()
                except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
                    if isinstance(exc, OSError) and _not_found(exc):
                        vanished.append(f.path)
                    else:  # a torn upload or a file being written: the next run reads it
                        self.stats.unreadable.append(f.name)
                        done[f.path] = None
                    continue
                done[f.path] = found
                if found is not None:
                    self._pool(pools, found)
        return vanished

    def _pool(self, pools: dict, found: _Candidates) -> None:
        """Add a file's keys to the per-variant pools; lower the thresholds as the pools fill."""
        import numpy as np

        if self.per_variant is None:
            return
        k = self.per_variant
        for variant in np.unique(found.variants):
            keys = found.keys[found.variants == variant]
            merged = np.concatenate([pools.get(variant, np.zeros(0, np.uint64)), keys])
            if len(merged) > 2 * k:
                merged = np.partition(merged, k - 1)[:k]
            pools[variant] = merged
            if len(merged) >= k:
                # a new dict, not an update: the key pass's threads read it meanwhile
                self.thresholds = {**self.thresholds, variant: int(np.partition(merged, k - 1)[k - 1])}

    def _select(self, done: dict[str, _Candidates | None]) -> list[_Candidates]:
        """The final sample: each variant's ``per_variant`` smallest keys (or a given threshold)."""
        import numpy as np

        found = [c for c in done.values() if c is not None]
        window_rows: dict[str, int] = {}
        for c in found:
            for v, n in c.counts.items():
                window_rows[v] = window_rows.get(v, 0) + n
        self.stats.window_rows = dict(sorted(window_rows.items()))
        self.stats.row_groups_counted = sum(c.counted_only for c in found)
        if self.per_variant is not None:
            cut = {}
            for variant in sorted({v for c in found for v in np.unique(c.variants)}):
                keys = np.concatenate([c.keys[c.variants == variant] for c in found] or [np.zeros(0, np.uint64)])
                if len(keys) > self.per_variant:
                    cut[variant] = int(np.partition(keys, self.per_variant - 1)[self.per_variant - 1])
            for variant, limit in self.threshold_of.items():
                cut[variant] = limit
            self.thresholds = cut
            for c in found:
                c.keep(c.keys <= _limits(c.variants, cut))
        sampled: dict[str, int] = {}
        for c in found:
            for v in c.variants:
                sampled[v] = sampled.get(v, 0) + 1
        self.stats.sampled_rows = dict(sorted(sampled.items()))
        return [c for c in found if len(c.rows)]

    # -- pass 2 -----------------------------------------------------------------------------------

    def _rows(self, c: _Candidates) -> "pa.Table":
        """The scan's columns of the candidate rows, read from the row groups that hold them only."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        starts = np.asarray(c.row_group_starts, dtype=np.int64)
        groups = np.asarray(np.searchsorted(starts, c.rows, side="right")) - 1  # c.rows in file order: runs
        wanted, first = np.unique(groups, return_index=True)
        bounds = [*first.tolist(), len(groups)]
        parts = []
        with self.files.fs.open_input_file(c.file.path) as source:
            reader = pq.ParquetFile(source)
            columns = [col for col in self.columns if col in set(reader.schema_arrow.names)]
            for i, group in enumerate(wanted.tolist()):  # one row group at a time: a large file's memory is one's
                data = reader.read_row_group(group, columns=columns, use_threads=False)
                parts.append(data.take(pa.array(c.rows[bounds[i] : bounds[i + 1]] - starts[group])))
        self.stats.row_groups_read += len(wanted)
        table = logschema.conform(pa.concat_tables(parts), self.table)
        return table.select(list(self.columns))

    def __iter__(self) -> Iterator["pa.Table"]:
        done: dict[str, _Candidates | None] = {}
        handed: set[tuple[str, str]] = set()
        for _attempt in range(5):
            plan = self._plan()
            release_memory()  # the compacted files' footers, parsed for their lists
            live = {f.path for f in plan}
            for path in [p for p in done if p not in live]:
                del done[path]  # compacted meanwhile: its rows come from the compacted file
            vanished = self._pass1(plan, done)
            if vanished:
                self.stats.replans += 1
                continue
            self.stats.files = len(plan)
            chosen = self._select(done)
            release_memory()  # the key pass's footers and batches
            gone = False
            with ThreadPoolExecutor(max(1, self.parallel)) as pool:
                futures = [
                    (c, pool.submit(self._rows, c))
                    for c in chosen
                    if any((i, r) not in handed for i, r in zip(c.ids, c.roles))
                ]
                for c, future in futures:
                    try:
                        table = future.result()
                    except OSError as exc:
                        if _not_found(exc):
                            gone = True
                            del done[c.file.path]
                            continue
                        raise
                    self.stats.files_read += 1
                    fresh = [(i, r) not in handed for i, r in zip(c.ids, c.roles)]
                    if not all(fresh):
                        import pyarrow as pa

                        table = table.filter(pa.array(fresh))
                    handed.update(zip(c.ids, c.roles))
                    if table.num_rows:
                        yield table
            release_memory()  # the row pass's footers and row groups
            if not gone:
                return
            self.stats.replans += 1
        raise OSError("the request log kept changing under the reader (5 plans); try again")


_NO_LIMIT = (1 << 64) - 1


def _flat(values: Any) -> Any:
    """One Arrow array from an array or a chunked array."""
    return values.combine_chunks() if hasattr(values, "combine_chunks") else values


def release_memory() -> None:
    """Hand memory freed by the passes back to the system: Arrow's pool's unused pages, and the C heap's
    free memory in every glibc arena (``malloc_trim``; a no-op where the C library has none)."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _lower(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: min(v for v in (a.get(k), b.get(k)) if v is not None) for k in {*a, *b}}


def _cuts(variants: "np.ndarray", keys: "np.ndarray", k: int) -> dict[str, int]:
    """Per variant holding more than ``k`` keys: its k-th smallest key."""
    import numpy as np

    out = {}
    for variant in np.unique(variants):
        mine = keys[variants == variant]
        if len(mine) > k:
            out[str(variant)] = int(np.partition(mine, k - 1)[k - 1])
    return out


def _limits(variants: "np.ndarray", cut: dict[str, int]) -> "np.ndarray":
    import numpy as np

    limit: np.ndarray = np.full(len(variants), _NO_LIMIT, dtype=np.uint64)
    for variant, value in cut.items():
        limit[variants == variant] = value
    return limit


def _not_found(exc: OSError) -> bool:
    text = str(exc).lower()  # an object store's 404 (pyarrow usually raises FileNotFoundError for it)
    return isinstance(exc, FileNotFoundError) or "path does not exist" in text or "nosuchkey" in text


def _days(start: datetime, end: datetime) -> list:
    from datetime import timedelta

    day, last, out = start.date(), end.date(), []
    while day <= last:
        out.append(day)
        day += timedelta(days=1)
    return out


class _StatsColumns:
    """Where a file's row groups keep the statistics that can rule one out (time, route, variant, role):
    found once a file, not once a row group."""

    def __init__(self, meta: Any, schema: "pa.Schema") -> None:
        first = meta.row_group(0) if meta.num_row_groups else None
        paths = [first.column(i).path_in_schema for i in range(first.num_columns)] if first is not None else []
        self.index = {name: paths.index(name) for name in ("timestamp", "route", "variant", "role") if name in paths}
        unit = getattr(schema.field("timestamp").type, "unit", "ms") if "timestamp" in schema.names else "ms"
        self.scale = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]

    def may_match(self, group: Any, where: Filter) -> bool:
        """False when the row group's statistics rule it out (time, or a route/variant/role of one value)."""
        for name, index in self.index.items():
            chunk = group.column(index)
            stats = chunk.statistics
            if stats is None or not stats.has_min_max:
                continue
            if name == "timestamp":
                low, high = stats.min_raw, stats.max_raw
                if not isinstance(low, int) or not isinstance(high, int):
                    continue
                start, end = where.window_start.timestamp(), where.window_end.timestamp()
                if high < int(start * self.scale) or low >= int(end * self.scale):
                    return False
            else:
                value = getattr(where, name)
                if (
                    value is not None
                    and stats.min == stats.max
                    and group.num_rows == (chunk.num_values or 0)
                    and stats.null_count == 0
                    and stats.min != value
                ):
                    return False
        return True

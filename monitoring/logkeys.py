"""The key pass over one file of the request log: which of its rows are in the window, how many a variant,
and which are sample candidates (monitoring/logscan.py runs it on each file of a window, in a pool).

Only the narrow columns (time, route, variant, role) of every row group are read, and counted in Arrow; a
row group the statistics put outside the window or the filter is skipped. Each row's **sample key** is a
64-bit hash of its request id (:func:`sample_keys`); the sample of a variant is its ``per_variant`` rows of
smallest key. Where the writer recorded each row group's key range in the footer (the gateway and
compaction do: loragate.common.samplekey), the row groups are read in key order and one whose smallest key
is above the thresholds known so far is only counted: its ids are not decoded. Only the rows under the
thresholds become Python objects (a few a file): the candidates, position and key, a few bytes each.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from loragate.common import logschema, samplekey
from loragate.monitoring.logfiles import LogFile

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import pyarrow.fs as pafs

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


def sample_keys(ids: "pa.Array | pa.ChunkedArray") -> "np.ndarray":
    """Each request id's sample key (loragate.common.samplekey.key_array) as a numpy array (read-only)."""
    return samplekey.key_array(ids).to_numpy()


@dataclass
class Candidates:
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


class KeyPass:
    """The key pass of one scan, file by file (thread-safe: a call keeps its state to itself).
    ``thresholds()``: the window's thresholds so far, per variant (they fall as the scan's files finish)."""

    def __init__(
        self,
        fs: "pafs.FileSystem",
        where: Filter,
        *,
        per_variant: int | None,
        by_variant: bool,
        thresholds: Callable[[], dict[str, int]],
    ) -> None:
        self.fs, self.where, self.per_variant, self.by_variant = fs, where, per_variant, by_variant
        self.thresholds = thresholds
        self._ids: "pa.Array | None" = None

    def _id_set(self) -> "pa.Array":
        import pyarrow as pa

        if self._ids is None:
            self._ids = pa.array(sorted(self.where.ids or ()), pa.string())
        return self._ids

    def __call__(self, file: LogFile) -> Candidates | None:
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
        with self.fs.open_input_file(file.path) as source:
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
                cut = _lowest(self.thresholds(), local)
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
                under = key <= limits(row_variant, cut) if sampling else np.ones(len(where), bool)
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

        found = Candidates(
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
            found.keys <= limits(found.variants, _lowest(self.thresholds(), local))
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
            if name == "role":  # rows of files older than the column are primary answers
                column = pc.fill_null(data["role"] if name in present else pa.nulls(n, pa.string()), logschema.PRIMARY)
            elif name in present:
                column = data[name]
            else:
                return pa.array([False] * n)
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


_NO_LIMIT = (1 << 64) - 1


def _flat(values: Any) -> Any:
    """One Arrow array from an array or a chunked array."""
    return values.combine_chunks() if hasattr(values, "combine_chunks") else values


def _lowest(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
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


def limits(variants: "np.ndarray", cut: dict[str, int]) -> "np.ndarray":
    import numpy as np

    limit: np.ndarray = np.full(len(variants), _NO_LIMIT, dtype=np.uint64)
    for variant, value in cut.items():
        limit[variants == variant] = value
    return limit


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

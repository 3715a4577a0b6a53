"""Read a window of the request log in bounded memory: projected, pruned, and sampled by request id.

Two passes over the window's live files (monitoring/logfiles.py), each file in a bounded thread pool:

1. **Keys** (monitoring/logkeys.py, file by file). Only ``request_id``, ``timestamp``, ``route``,
   ``variant`` and ``role`` are read; files written before the window are never opened. Each row in the
   window and the filter is counted (the window's true row count, per variant) and gets its **sample
   key**, a 64-bit hash of its request id. The sample of a variant is its ``per_variant`` rows of smallest
   key (a bottom-k sample): uniform, the same on every rerun, nested as the cap grows, and a primary answer
   and its shadow copy (one request id) are in their variants' samples together whenever both keys are
   under both thresholds (the shadow report reads the primaries of its sample by id instead:
   monitoring/shadow.py). The thresholds fall as files finish (:meth:`WindowScan._pool`), so the later
   files keep few candidates: O(k log(n/k)) of them, row position and key, a few bytes each.
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

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from loragate.common import logschema
from loragate.monitoring.logfiles import LogFile, LogFiles
from loragate.monitoring.logkeys import Candidates, Filter, KeyPass, limits

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


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
        by_variant: bool = True,
        parallel: int = 4,
        late_s: float = 900.0,
    ) -> None:
        self.files, self.table, self.where, self.columns = files, table, where, columns
        self.per_variant = per_variant
        self.parallel, self.late_s, self.by_variant = parallel, late_s, by_variant
        self.stats = ScanStats()
        self.thresholds: dict[str, int] = {}  # per variant: the largest sample key taken
        self._keys = KeyPass(
            files.fs, where, per_variant=per_variant, by_variant=by_variant, thresholds=lambda: self.thresholds
        )

    # -- pass 1 -----------------------------------------------------------------------------------

    def _plan(self) -> list[LogFile]:
        days = sorted({d.isoformat() for d in _days(self.where.window_start, self.where.window_end)})
        return self.files.plan(
            self.table, days, start=self.where.window_start, end=self.where.window_end, late_s=self.late_s
        )

    def _pass1(self, plan: list[LogFile], done: dict[str, Candidates | None]) -> list[str]:
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

    def _pool(self, pools: dict, found: Candidates) -> None:
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

    def _select(self, done: dict[str, Candidates | None]) -> list[Candidates]:
        """The final sample: each variant's ``per_variant`` smallest keys."""
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
            self.thresholds = cut
            for c in found:
                c.keep(c.keys <= limits(c.variants, cut))
        sampled: dict[str, int] = {}
        for c in found:
            for v in c.variants:
                sampled[v] = sampled.get(v, 0) + 1
        self.stats.sampled_rows = dict(sorted(sampled.items()))
        return [c for c in found if len(c.rows)]

    # -- pass 2 -----------------------------------------------------------------------------------

    def _rows(self, c: Candidates) -> "pa.Table":
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
        done: dict[str, Candidates | None] = {}
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


def release_memory() -> None:
    """Hand memory freed by the passes back to the system: Arrow's pool's unused pages, and the C heap's
    free memory in every glibc arena (``malloc_trim``; a no-op where the C library has none)."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


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

"""Which files of the request log hold a window, and which of them to read (compaction-aware).

The gateway writes ``<root>/<table>/date=YYYY-MM-DD/<writer>-<YYYYmmddTHHMMSSfff>Z-<seq>.parquet``
(service/logstore.py), the name stamped with the writer's clock when it flushes: every row of the file
happened before that moment, so a file named before a window starts holds none of it. Compaction
(monitoring/compaction.py) merges one writer's files of one closed hour (by that stamp) of one directory into
``compacted-<YYYYmmddTHH>-<writer>-<digest>.parquet``, whose footer names the files it replaces
(``COVERS_KEY``, transitively). Its rows happened before the end of that hour.

Which files to read: every ``.parquet`` file not named by a compacted file that is present, and no
compacted file whose list is part of another's (two compactions of one writer's hour that saw different
listings, e.g. one before a late file arrived: the larger one is read). A compacted file appears whole
(rename, or one PUT) before any input it replaces is deleted, so a listing either shows the inputs alone,
or the compacted file and some inputs it covers (skipped), or the compacted file alone: never a row twice. A reader that
listed before the compacted file appeared may find an input gone when it opens it; it lists again
(``LogFiles.plan``) and reads the compacted file instead of every input of the new plan's coverage
(monitoring/logscan.py does this), so no row is missed either.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs as pafs

COVERS_KEY = b"loragate.compacted_from"  # footer metadata of a compacted file: JSON list of the names it replaces
COMPACTED_PREFIX = "compacted-"
# A writer's file: <writer>-20261202T140510123Z-000042.parquet;
# a compacted file: compacted-20261202T14-<writer>-<digest>.parquet
_WRITER_STAMP = re.compile(r"^(.+)-(\d{8}T\d{6})(\d{3})Z-\d+\.parquet$")
_COMPACTED = re.compile(r"^compacted-(\d{8}T\d{2})-(.+)-([0-9a-f]{20})\.parquet$")


@dataclass(frozen=True)
class LogFile:
    path: str  # full path inside the filesystem
    name: str
    size: int
    written_before: datetime | None  # every row happened before this (None: unknown name)

    @property
    def compacted(self) -> bool:
        return _COMPACTED.match(self.name) is not None

    @property
    def writer(self) -> str | None:
        """The writer the file (or the compacted file's inputs) came from; None for a name of unknown form."""
        match = _COMPACTED.match(self.name) or _WRITER_STAMP.match(self.name)
        return match[2] if match and self.compacted else match[1] if match else None

    @property
    def hour(self) -> datetime | None:
        """The hour of its flush stamp (the compaction unit); None for a file of unknown name."""
        match = _COMPACTED.match(self.name)
        if match:
            return datetime.strptime(match[1], "%Y%m%dT%H").replace(tzinfo=timezone.utc)
        if self.written_before is None:
            return None
        return self.written_before.replace(minute=0, second=0, microsecond=0)


def written_before(name: str) -> datetime | None:
    match = _COMPACTED.match(name)
    if match:
        return datetime.strptime(match[1], "%Y%m%dT%H").replace(tzinfo=timezone.utc) + timedelta(hours=1)
    match = _WRITER_STAMP.match(name)
    if match:
        stamp = datetime.strptime(match[2], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
        return stamp + timedelta(milliseconds=int(match[3]) + 1)
    return None


def covers(filesystem: "pafs.FileSystem", path: str) -> list[str]:
    """The file names a compacted file replaces (from its footer)."""
    import pyarrow.parquet as pq

    with filesystem.open_input_file(path) as file:
        metadata = pq.ParquetFile(file).metadata.metadata or {}
    return list(json.loads(metadata.get(COVERS_KEY, b"[]")))


class LogFiles:
    """Lists a table's day directories and decides which files to read (see the module docstring).

    ``parallel`` bounds the concurrent listings and footer reads (object stores: one request each).
    The names a compacted file covers are cached by its name (a compacted file's name is a digest of
    its inputs, so one name always has one content).
    """

    def __init__(self, filesystem: "pafs.FileSystem", root: str, *, parallel: int = 8) -> None:
        self.fs, self.root, self.parallel = filesystem, root, parallel
        self._covers: dict[str, list[str]] = {}

    def directory(self, table: str, day: str) -> str:
        return f"{self.root}/{table}/date={day}"

    def listing(self, directories: list[str]) -> list[LogFile]:
        """Every Parquet file of the directories (dot-names, a writer's temporary files, left out)."""
        from pyarrow import fs

        def one(directory: str) -> list[LogFile]:
            infos = self.fs.get_file_info(fs.FileSelector(directory, allow_not_found=True))
            out = []
            for info in infos:
                name = info.path.rsplit("/", 1)[-1]
                if info.type == fs.FileType.File and name.endswith(".parquet") and not name.startswith((".", "_")):
                    out.append(LogFile(info.path, name, info.size or 0, written_before(name)))
            return out

        with ThreadPoolExecutor(max(1, min(self.parallel, len(directories)))) as pool:
            return sorted((f for part in pool.map(one, directories) for f in part), key=lambda f: f.path)

    def live(self, files: list[LogFile]) -> list[LogFile]:
        """The files to read: those no present compacted file covers (directly or through another), and no
        compacted file whose footer cannot be read (a torn upload)."""
        covered = self.covered(files)
        return [
            f
            for f in files
            if (f.path.rsplit("/", 1)[0], f.name) not in covered and (not f.compacted or f.name in self._covers)
        ]

    def covered(self, files: list[LogFile]) -> set[tuple[str, str]]:
        """(directory, name) of every file a compacted file among ``files`` replaces."""
        compacted = [f for f in files if f.compacted]
        missing = [f for f in compacted if f.name not in self._covers]
        if missing:
            with ThreadPoolExecutor(max(1, min(self.parallel, len(missing)))) as pool:
                for f, names in zip(missing, pool.map(lambda f: self._read_covers(f.path), missing)):
                    if names is not None:
                        self._covers[f.name] = names
        covered: set[tuple[str, str]] = set()  # (directory, name): names are unique per directory
        groups: dict[tuple[str, str | None, datetime | None], list[LogFile]] = {}
        for f in compacted:
            directory = f.path.rsplit("/", 1)[0]
            covered.update((directory, name) for name in self._covers.get(f.name, ()))
            if f.name in self._covers:
                groups.setdefault((directory, f.writer, f.hour), []).append(f)
        for (directory, _, _), group in groups.items():  # superseded: its list is part of another's
            for f in group:
                mine = set(self._covers[f.name])
                for other in group:
                    theirs = set(self._covers[other.name])
                    if other is not f and (mine < theirs or mine == theirs and other.name < f.name):
                        covered.add((directory, f.name))
                        break
        return covered

    def _read_covers(self, path: str) -> list[str] | None:
        try:
            return covers(self.fs, path)
        except FileNotFoundError:
            return None  # replaced meanwhile by a later compaction: the next plan has that one
        except ValueError:  # pyarrow.ArrowInvalid: a torn upload (no footer): it replaces nothing
            return None
        # Any other error (the store unreachable) is raised: reading on without this file's list could
        # miss the rows it holds

    def plan(
        self,
        table: str,
        days: list[str],
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        late_s: float = 3600.0,
    ) -> list[LogFile]:
        """The live files of ``table`` on ``days`` that can hold rows in [start, end).

        A file written before ``start`` holds none; one written more than ``late_s`` after ``end`` is
        assumed to hold none either (a row is logged when its request ends, seconds after it started).
        """
        files = self.live(self.listing([self.directory(table, day) for day in days]))
        out = []
        for f in files:
            if f.written_before is not None:
                if start is not None and f.written_before <= start:
                    continue
                if end is not None and f.written_before - timedelta(hours=1 if f.compacted else 0) > end + timedelta(
                    seconds=late_s
                ):
                    continue
            out.append(f)
        return out

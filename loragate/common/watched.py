"""A file whose changes are noticed by polling (size and mtime): the routes and API-keys files."""

from __future__ import annotations

from pathlib import Path


class WatchedFile:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp = self._read_stamp()

    def changed(self) -> bool:
        """True once per change since the last call (a missing file is no change: keep what we have)."""
        stamp = self._read_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def _read_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

"""Files whose changes are noticed by polling (size and mtime): the routes and API-keys files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


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


class ReloadingFile(Generic[T]):
    """A value loaded from a file and loaded again when the file changes (the routes, the API keys).

    ``load`` raises on a bad file: at start that stops the caller; on a reload the last good value stays
    in ``current`` and the error is kept in ``last_error`` until a good load.
    """

    def __init__(self, path: Path | None, load: Callable[[], T]) -> None:
        self.path = path
        self._load = load
        self._watched = WatchedFile(path)  # stamped before the load: a change during it is seen next time
        self.current: T = load()
        self.last_error: str | None = None

    def reload_if_changed(self) -> bool:
        """True when a new value was loaded; re-raises ``load``'s error (the last good value stays)."""
        if not self._watched.changed():
            return False
        try:
            value = self._load()
        except Exception as exc:
            self.last_error = str(exc)
            raise
        self.current, self.last_error = value, None
        return True

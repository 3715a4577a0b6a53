"""Atomic file replacement: a reader sees the old file or the new one, never a half-written one, also after a crash.

The data goes to a temporary file in the target's directory (same filesystem: the rename is atomic),
which is fsynced, renamed over the target with ``os.replace``, and the directory fsynced so the
rename itself is durable. A failure leaves the target as it was and removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes | memoryview, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8; or any bytes-like), making its folder if needed.

    The new file keeps the permission bits of the one it replaces; a new file gets ``mode``
    (default 0o644 — ``mkstemp``'s 0o600 would hide it from the readers of shared files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, path.stat().st_mode & 0o777)
        except FileNotFoundError:
            os.chmod(tmp, 0o644 if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or a new file in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)

"""The request log's conversion process: one child that turns batches into Parquet, each call bounded in time.

``ConversionProcess`` (the gateway's side) starts the child (a fresh interpreter, not a fork: the gateway
runs threads and uvloop) and talks to it over two pipes, one call at a time. A call that runs past its
bound raises Stalled, with the last record the child said it was on; the caller then kills the child
(``kill``) and starts another. ``close`` is bounded too: a child that does not end in time is killed.

The child (``child_main``) ignores SIGTERM and SIGINT (a signal to the whole process group must not
cost the gateway's last flush: the gateway ends it) and dies with the gateway: the kernel sends it
SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG, Linux), which holds even while the
child is stuck in C code holding its GIL; elsewhere a watch thread polls the parent's pid.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from loragate.service.requestlog.convert import Converter, ScrubTexts, Store
from loragate.service.requestlog.records import TextMode
from loragate.service.requestlog.spool import Spooled, SpoolUnreadable, mapped

log = logging.getLogger("loragate.requestlog")

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.1  # a waiting call looks at its cutoff this often
STORING = -1  # ``at`` while the store writes the converted batch (not any one record's fault)


class Stalled(Exception):
    """A call ran past its bound; ``at`` is the record the child last said it was on (None: it said nothing)."""

    def __init__(self, bound_s: float, at: int | None) -> None:
        super().__init__(f"the conversion process did not answer within {bound_s:.1f}s")
        self.at = at


class Died(Exception):
    """The child ended (killed, out of memory) before it answered."""


class ChildError(Exception):
    """An exception in the child, sent back as text."""


class ConversionProcess:
    """The gateway's handle on one conversion child.

    ``store_factory`` builds the Store in the child (picklable); ``scrub_texts`` (picklable, default the
    scrubber) scrubs text there; no call waits past ``cutoff()``. Call from one thread; start it from a
    thread that outlives it (the log's writer thread): the child's PR_SET_PDEATHSIG fires when that thread
    ends.
    """

    def __init__(
        self,
        store_factory: Callable[[], Store],
        text_mode: TextMode,
        scrub_texts: ScrubTexts | None = None,
        cutoff: Callable[[], float] = lambda: float("inf"),
    ) -> None:
        self._cutoff = cutoff  # time.monotonic() past which no call waits any longer (a shutdown's deadline)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        code = "from loragate.service.requestlog.process import child_main; child_main()"
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", code, str(to_child_r), str(from_child_w), str(os.getpid())],
                pass_fds=(to_child_r, from_child_w),
                close_fds=True,
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._receive = Connection(from_child_r, writable=False)
        self._send.send((store_factory, text_mode, scrub_texts))

    @property
    def pid(self) -> int:
        return self._process.pid

    def call(self, bound_s: float, name: str, *args: Any, idle: bool = False) -> Any:
        """Run the child's ``name`` ("ping", "write", "write_guarded") with ``args``: its result; or Stalled after
        ``bound_s`` (``idle``: ``bound_s`` without word of the next record), the child left running (``kill``
        it); Died; ChildError; SpoolUnreadable as the child raised it."""
        try:
            self._send.send((name, args))
        except OSError as exc:
            raise Died(f"cannot send to the conversion process: {exc}") from None
        deadline = time.monotonic() + bound_s
        at: int | None = None
        while True:
            left = min(deadline, self._cutoff()) - time.monotonic()
            try:
                if left <= 0:
                    raise Stalled(bound_s, at)
                if not self._receive.poll(min(left, _POLL_S)):
                    continue
                kind, value = self._receive.recv()
            except (EOFError, OSError):
                raise Died("the conversion process ended") from None
            if kind == "at":
                at = value
                if idle:
                    deadline = time.monotonic() + bound_s
            elif kind == "ok":
                return value
            elif kind == "unreadable":
                raise SpoolUnreadable(value)
            else:
                raise ChildError(value)

    def kill(self) -> None:
        """Ends the child at once (SIGKILL) and reaps it."""
        self._process.kill()
        self._process.wait()
        self._close_pipes()

    def close(self, timeout_s: float) -> None:
        """Asks the child to end; kills it if it has not within ``timeout_s``."""
        try:
            self._send.send(None)
        except OSError:
            pass
        try:
            self._process.wait(max(timeout_s, 0.0))
        except subprocess.TimeoutExpired:
            log.error("request log: the conversion process did not end within %.1fs; killed", timeout_s)
            self._process.kill()
            self._process.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        self._send.close()
        self._receive.close()


# --- the child ----------------------------------------------------------------------------------------


class _Child:
    def __init__(self, store: Store, converter: Converter, answer: Connection) -> None:
        self.store, self.converter, self.answer = store, converter, answer

    def ping(self) -> dict[str, Any]:
        import pyarrow as pa

        return {"pid": os.getpid(), "arrow_memory_pool": pa.default_memory_pool().backend_name}

    def write(self, table: str, packed: bytes | Spooled) -> tuple[int, int]:
        """(rows written, records unreadable) of a batch, the fast way (columns)."""
        if isinstance(packed, Spooled):
            with mapped(packed) as view:
                return self.converter.write_batch(self.store, table, view)
        return self.converter.write_batch(self.store, table, packed)

    def write_guarded(self, table: str, packed: bytes, withheld: list[int]) -> tuple[int, int, list[str]]:
        """(rows written, records unreadable, request ids whose text was withheld): a batch that stalled,
        record by record, each announced before it is converted, the text of ``withheld`` dropped."""
        import marshal

        records = marshal.loads(packed)
        withheld_set = set(withheld)
        rows, unreadable = self.converter.convert_guarded(table, records, withheld_set, self._at)
        self._at(STORING)
        if rows:
            self.store.write(table, rows)
        ids = [str(records[index][0]) for index in sorted(withheld_set) if index < len(records)]
        return len(rows), unreadable, ids

    def call(self, name: str, args: tuple) -> Any:
        calls: dict[str, Callable[..., Any]] = {
            "ping": self.ping,
            "write": self.write,
            "write_guarded": self.write_guarded,
        }
        return calls[name](*args)

    def _at(self, index: int) -> None:
        self.answer.send(("at", index))


def child_main() -> None:
    """The child's whole life: set up, then answer calls until told to end (None) or the pipe closes."""
    receive_fd, answer_fd, parent_pid = (int(value) for value in sys.argv[1:4])
    _die_with_parent(parent_pid)
    # The gateway decides when this process ends: a SIGTERM sent to the whole process group
    # (a terminal, systemd, `kill -- -pgid`) must not kill it before the gateway's last flush.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    receive, answer = Connection(receive_fd, writable=False), Connection(answer_fd, readable=False)
    try:
        store_factory, text_mode, scrub_texts = receive.recv()
        import pyarrow as pa

        # The C library's allocator, not Arrow's default (mimalloc): mimalloc gave the pages of every batch back to
        # the kernel and faulted them in again for the next: 12-19 us of system time a row, 2-6 with glibc.
        pa.set_memory_pool(pa.system_memory_pool())
        converter = Converter(text_mode, scrub_texts)
        child = _Child(store_factory(), converter, answer)
        converter.warm_up()
    except EOFError:
        return
    except Exception:
        log.exception("request log: the conversion process cannot start")
        raise
    gc.freeze()  # what start-up loaded is never garbage: later collections skip it
    while True:
        try:
            message = receive.recv()
        except EOFError:
            return
        if message is None:
            return
        name, args = message
        # A batch makes ~100 objects a record that reference counting frees: the cyclic GC walking them
        # meanwhile was a quarter of a streamed record's cost (measured). Off for the batch.
        gc.disable()
        try:
            reply: tuple[str, Any] = ("ok", child.call(name, args))
        except SpoolUnreadable as exc:
            reply = ("unreadable", str(exc))
        except Exception as exc:  # sent back as text: any exception type, picklable or not
            log.debug("request log: %s failed in the conversion process:\n%s", name, traceback.format_exc())
            reply = ("error", f"{type(exc).__name__}: {exc}")
        finally:
            gc.enable()
        answer.send(reply)


def _die_with_parent(parent_pid: int) -> None:
    """A gateway killed hard (SIGKILL, OOM) cannot end this process: the kernel does (Linux), else a thread."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(0)
    if not armed:
        threading.Thread(
            target=_exit_with_parent, args=(parent_pid,), name="loragate-parent-watch", daemon=True
        ).start()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)

"""Scripted peers and watchdogs for the wire conformance suites (HTTP and RESP): loopback only.

A ``Script`` is what the server does with one request: a list of steps, each bytes to write, a float to sleep,
or one of the actions CLOSE (close after what was written), RESET (an RST: SO_LINGER 0), KEEP (wait for the next
request on the connection; the default at the end of a script). ``StallWatch`` measures the event loop's longest
busy stretch: the thread CPU time between two ticks of a 1 ms ticker, so a loaded machine (another process on the
core) does not count, only work done on this loop's thread. ``ParserWatch`` measures the longest single call of a
protocol's ``data_received`` (the parser's own stall, whatever else the test process does): the suites hold that
one to 10 ms and the loop's to a generous bound (first-time imports and the test's own servers run there too).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator

CLOSE, RESET, KEEP = "close", "reset", "keep"
Step = bytes | float | str
Script = list[Step]


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def play(writer: asyncio.StreamWriter, script: Script) -> bool:
    """Run ``script``; False when the connection is done (closed or reset)."""
    for step in script:
        if isinstance(step, bytes):
            writer.write(step)
            await writer.drain()
        elif isinstance(step, float):
            await asyncio.sleep(step)
        elif step == CLOSE:
            writer.close()
            return False
        elif step == RESET:
            reset(writer)
            return False
    return True


class HttpPeer:
    """An HTTP/1.1 server on loopback: a request whose body is ``b"check"`` gets ``CHECK_ANSWER``; any other gets
    ``script(request_number)`` (the number counts the scripted requests from 0)."""

    CHECK_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nchecked"

    def __init__(self, script: Callable[[int], Script]) -> None:
        self.script = script
        self.connections = 0
        self.scripted = 0
        self.open = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                if body == b"check":
                    writer.write(self.CHECK_ANSWER)
                    await writer.drain()
                    continue
                number, self.scripted = self.scripted, self.scripted + 1
                if not await play(writer, self.script(number)):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open -= 1
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 20)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions"
        finally:
            server.close()


class StallWatch:
    """The longest stretch of this thread's CPU time between two ticks of a 1 ms ticker, while running.

    Time in the garbage collector is left out: a full collection of the test process's heap is the test run's
    cost, not the code under test's (and its length depends on what else the process has loaded)."""

    def __init__(self) -> None:
        self.longest_s = 0.0
        self._task: asyncio.Task | None = None
        self._collecting = 0.0
        self._collected = 0.0

    def _gc(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._collecting = time.thread_time()
        else:
            self._collected += time.thread_time() - self._collecting

    async def _tick(self) -> None:
        last, collected = time.thread_time(), self._collected
        while True:
            await asyncio.sleep(0.001)
            now = time.thread_time()
            self.longest_s = max(self.longest_s, now - last - (self._collected - collected))
            last, collected = now, self._collected

    def __enter__(self) -> StallWatch:
        gc.callbacks.append(self._gc)
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        gc.callbacks.remove(self._gc)


@contextlib.contextmanager
def parser_watch(protocol: type) -> Iterator[list[float]]:
    """While inside: ``[longest]``, the thread CPU time of the longest ``protocol.data_received`` call."""
    original = protocol.data_received
    longest = [0.0]

    def timed(self: object, data: bytes) -> None:
        started = time.thread_time()
        try:
            original(self, data)
        finally:
            longest[0] = max(longest[0], time.thread_time() - started)

    protocol.data_received = timed
    try:
        yield longest
    finally:
        protocol.data_received = original

"""A minimal pipelined Redis client (RESP2) for the limiter's hot path.

Why not redis-py or `limits`: measured (bench/limiter_overhead.py --limits-python), one check
costs about 80-135 us of client CPU through redis-py's asyncio client and 85-155 us through
`limits` on top of it, against about 11 us here: several times the gateway's whole budget for
the limiter. This client keeps one connection per process, writes the commands of one
event-loop turn in one send and matches replies to commands in order (Redis answers in
order). It knows what the limiter needs: AUTH, SELECT, PING, EVALSHA/EVAL.

URLs: redis://[user:password@]host[:port][/db], rediss:// (TLS, system CAs),
unix:///path/to.sock[?db=N&password=...].
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable
from urllib.parse import parse_qs, unquote, urlsplit


class RedisReplyError(Exception):
    """An error reply (-ERR ..., -NOSCRIPT ...)."""


class RedisUnavailable(ConnectionError):
    """No connection, a lost one, or no reply in time."""


def encode(*parts: bytes) -> bytes:
    return b"".join([b"*%d\r\n" % len(parts), *(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)])


def parse(buffer: bytes | bytearray, start: int) -> tuple[object, int] | None:
    """One reply from ``buffer[start:]`` and where the next begins; None when it is incomplete."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        return None
    kind, line = buffer[start:start + 1], buffer[start + 1:end]
    if kind == b"+":
        return bytes(line), end + 2
    if kind == b":":
        return int(line), end + 2
    if kind == b"-":
        return RedisReplyError(line.decode(errors="replace")), end + 2
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, end + 2
        if len(buffer) < end + 2 + size + 2:
            return None
        return bytes(buffer[end + 2:end + 2 + size]), end + 2 + size + 2
    if kind == b"*":
        count, items, position = int(line), [], end + 2
        if count < 0:
            return None, position
        for _ in range(count):
            parsed = parse(buffer, position)
            if parsed is None:
                return None
            item, position = parsed
            items.append(item)
        return items, position
    raise RedisUnavailable(f"unexpected reply from Redis: {bytes(buffer[start:start + 20])!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[tuple[asyncio.Future, float]] = deque()
        self.buffer = bytearray()
        self.outgoing: list[bytes] = []
        self.lost: Exception | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, command: bytes) -> asyncio.Future:
        if self.lost is not None:
            raise RedisUnavailable(str(self.lost))
        future = self.loop.create_future()
        if not self.outgoing:
            self.loop.call_soon(self._flush)  # everything sent in this turn of the loop goes in one write
        self.outgoing.append(command)
        self.waiters.append((future, time.monotonic()))
        if self._timer is None:
            self._timer = self.loop.call_later(self.timeout_s, self._check_timeout)
        return future

    def _flush(self) -> None:
        if self.transport is not None and self.outgoing and self.lost is None:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def _check_timeout(self) -> None:
        self._timer = None
        if not self.waiters:
            return
        waited = time.monotonic() - self.waiters[0][1]
        if waited >= self.timeout_s:
            self._fail(RedisUnavailable(f"no reply from Redis in {self.timeout_s:g} s"))
            if self.transport is not None:
                self.transport.abort()
            return
        self._timer = self.loop.call_later(self.timeout_s - waited, self._check_timeout)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        position = 0
        try:
            while self.waiters:
                parsed = parse(buffer, position)
                if parsed is None:
                    break
                reply, position = parsed
                future = self.waiters.popleft()[0]
                if not future.done():
                    future.set_result(reply)
        except (RedisUnavailable, ValueError) as exc:
            self._fail(RedisUnavailable(str(exc)))
            if self.transport is not None:
                self.transport.abort()
            return
        del buffer[:position]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisUnavailable(f"connection to Redis lost ({exc or 'closed by the server'})"))

    def _fail(self, error: Exception) -> None:
        if self.lost is None:
            self.lost = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiters:
            future = self.waiters.popleft()[0]
            if not future.done():
                future.set_exception(error)


class RespClient:
    """Commands over one pipelined connection, made on first use and again after it is lost."""

    def __init__(self, url: str, timeout_s: float = 0.5, password: str | None = None) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.scheme = parts.scheme
        self.host, self.port = parts.hostname or "", parts.port or 6379
        self.path = parts.path if parts.scheme == "unix" else ""
        db = parts.path.lstrip("/") if parts.scheme != "unix" else (query.get("db") or ["0"])[0]
        self.db = int(db or 0)
        self.username = unquote(parts.username) if parts.username else None
        in_url = parts.password if parts.password is not None else next(iter(query.get("password", [])), None)
        # The URL's password wins; else one given apart (e.g. from a Kubernetes Secret).
        self.password = unquote(in_url) if in_url is not None else password
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        factory = lambda: _Protocol(self.timeout_s)  # noqa: E731
        try:
            if self.scheme == "unix":
                connecting = loop.create_unix_connection(factory, self.path)
            else:
                tls = ssl.create_default_context() if self.scheme == "rediss" else None
                connecting = loop.create_connection(factory, self.host, self.port, ssl=tls)
            transport, protocol = await asyncio.wait_for(connecting, self.timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise RedisUnavailable(f"cannot connect to Redis: {exc or type(exc).__name__}") from None
        setup = []
        if self.password is not None:
            credentials = [self.username.encode(), self.password.encode()] if self.username else [
                self.password.encode()]
            setup.append(protocol.send(encode(b"AUTH", *credentials)))
        if self.db:
            setup.append(protocol.send(encode(b"SELECT", str(self.db).encode())))
        for reply in await asyncio.gather(*setup, return_exceptions=True):
            if isinstance(reply, Exception):
                transport.abort()
                raise RedisUnavailable(f"Redis refused the connection setup: {reply}")
        return protocol

    async def connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._connecting is None:  # one connect, however many callers wait for it
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            connected = await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None
        self._protocol = connected
        return connected

    def request(self, command: bytes) -> Awaitable[object]:
        """Send an encoded command: its reply, an error reply as a RedisReplyError value. On an open
        connection this is the reply's future itself (no coroutine); else it connects first."""
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol.send(command)
        return self._connect_and_send(command)

    async def _connect_and_send(self, command: bytes) -> object:
        return await (await self.connection()).send(command)

    async def execute(self, command: bytes) -> object:
        """Send an encoded command; its reply (raises RedisReplyError for an error reply)."""
        reply = await self.request(command)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def call(self, *args: str | bytes | int) -> object:
        return await self.execute(encode(*(a if isinstance(a, bytes) else str(a).encode() for a in args)))

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

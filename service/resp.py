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
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit


class RedisReplyError(Exception):
    """An error reply (-ERR ..., -NOSCRIPT ...)."""


class RedisUnavailable(ConnectionError):
    """No connection, a lost one, or no reply in time."""


class RespProtocolError(RedisUnavailable):
    """Bytes that are not RESP2 replies, or a reply nobody asked for: the connection is dropped."""


MAX_DEPTH = 32  # arrays nested deeper than this are refused (the limiter's replies are one level deep)
MAX_LINE = 64 * 1024  # a simple string, error or length line longer than this is refused
MAX_BULK = 512 * 1024 * 1024  # Redis's own proto-max-bulk-len


def encode(*parts: bytes) -> bytes:
    return b"".join([b"*%d\r\n" % len(parts), *(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)])


def _integer(line: bytes | bytearray) -> int:
    """A RESP integer: an optional minus and 1 to 19 ASCII digits, nothing else (no ``1_000``, no ``+1``, no spaces)."""
    digits = line[1:] if line[:1] == b"-" else line
    if not digits.isdigit() or len(digits) > 19:
        raise RespProtocolError(f"not a RESP integer: {bytes(line[:40])!r}")
    return int(digits) if digits is line else -int(digits)


class RespReader:
    """An incremental RESP2 reply reader: ``feed`` bytes, ``gets`` a whole reply or False (not yet); bad bytes
    raise RespProtocolError. The interface of hiredis.Reader (bench/limiter_overhead.py measures both).

    Linear in the bytes: an array's finished elements are kept between feeds (never parsed again), a line's
    search for its end resumes where it stopped, and nesting is a stack bounded at MAX_DEPTH (no recursion).
    Each bulk string's terminator is checked.
    """

    __slots__ = ("buffer", "position", "searched", "stack")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.position = 0  # where the next element begins
        self.searched = 0  # the line end was searched for up to here (a long line arriving in pieces)
        self.stack: list[list] = []  # arrays being filled: [items, elements still to come]

    def feed(self, data: bytes) -> None:
        if self.position and self.position == len(self.buffer):
            self.buffer.clear()  # all read: start afresh rather than keep a consumed prefix
            self.position = self.searched = 0
        elif self.position > 65536 and self.position * 2 > len(self.buffer):
            del self.buffer[: self.position]
            self.searched = max(0, self.searched - self.position)
            self.position = 0
        self.buffer += data

    def has_data(self) -> bool:
        return self.position < len(self.buffer) or bool(self.stack)

    def gets(self) -> object:
        buffer, position, stack = self.buffer, self.position, self.stack
        while True:
            searched = self.searched
            end = buffer.find(b"\r\n", searched if searched > position else position)
            if end < 0:
                if len(buffer) - position > MAX_LINE:
                    raise RespProtocolError(f"a reply line over {MAX_LINE} bytes")
                self.searched = max(position, len(buffer) - 1)
                self.position = position
                return False
            kind = buffer[position]
            if kind == 58:  # :
                line = buffer[position + 1 : end]
                value: object = int(line) if line.isdigit() and end - position < 20 else _integer(line)
                after = end + 2
            elif kind == 36:  # $
                size = _integer(buffer[position + 1 : end])
                if size < 0:
                    if size != -1:
                        raise RespProtocolError(f"bulk string length {size}")
                    value, after = None, end + 2
                else:
                    if size > MAX_BULK:
                        raise RespProtocolError(f"bulk string length {size}")
                    after = end + 2 + size + 2
                    if len(buffer) < after:
                        self.position, self.searched = position, end  # its line is found again at once
                        return False
                    if buffer[after - 2 : after] != b"\r\n":
                        raise RespProtocolError("a bulk string does not end in CRLF where its length says")
                    value = bytes(buffer[end + 2 : after - 2])
            elif kind == 42:  # *
                line = buffer[position + 1 : end]
                count = int(line) if line.isdigit() and end - position < 20 else _integer(line)
                after = end + 2
                if count > 0:
                    if len(stack) >= MAX_DEPTH:
                        raise RespProtocolError(f"arrays nested deeper than {MAX_DEPTH}")
                    stack.append([[], count])
                    position = after
                    continue
                if count < -1:
                    raise RespProtocolError(f"array length {count}")
                value = [] if count == 0 else None
            elif kind == 43:  # +
                value, after = bytes(buffer[position + 1 : end]), end + 2
            elif kind == 45:  # -
                value, after = RedisReplyError(buffer[position + 1 : end].decode(errors="replace")), end + 2
            else:
                raise RespProtocolError(f"not a RESP2 reply: {bytes(buffer[position : position + 20])!r}")
            position = after
            while stack:  # the value is an array's element: the array may be whole now
                top = stack[-1]
                top[0].append(value)
                top[1] -= 1
                if top[1]:
                    break
                value = stack.pop()[0]
            else:
                self.position = self.searched = position
                return value


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout_s: float, reader: Reader) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[tuple[asyncio.Future, float]] = deque()
        self.reader = reader
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
        reader, waiters = self.reader, self.waiters
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if not waiters:  # nobody asked: every later reply would go to the wrong command
                    raise RespProtocolError(f"a reply nobody asked for: {str(reply)[:40]!r}")
                future = waiters.popleft()[0]
                if not future.done():  # a caller that gave up (cancelled) still had its place in the order
                    future.set_result(reply)
        except RedisUnavailable as exc:  # RespProtocolError, or hiredis's protocol error (see RespClient)
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()

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


class Reader(Protocol):
    """RespReader, or hiredis.Reader(protocolError=RespProtocolError, replyError=RedisReplyError)."""

    def feed(self, data: bytes) -> None: ...
    def gets(self) -> object: ...


class RespClient:
    """Commands over one pipelined connection, made on first use and again after it is lost (after a timeout,
    a protocol error or a reply nobody asked for the connection is dropped, never reused in a doubtful state).

    ``reader``: makes each connection's reply reader (RespReader; bench/limiter_overhead.py also tries hiredis).
    """

    def __init__(
        self, url: str, timeout_s: float = 0.5, password: str | None = None, reader: Callable[[], Reader] = RespReader
    ) -> None:
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
        self.reader = reader
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        factory = lambda: _Protocol(self.timeout_s, self.reader())  # noqa: E731
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
            credentials = (
                [self.username.encode(), self.password.encode()] if self.username else [self.password.encode()]
            )
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

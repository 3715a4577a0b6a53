"""A lean HTTP/1.1 client for the request path: POST a JSON body to a replica, read the answer whole or as it streams.

aiohttp's client was about 40% of the gateway's Python time per request (py-spy under bench/overhead.py):
request objects, header multidicts, timer contexts, payload registries. This client does only what the
request path needs: one asyncio Protocol per connection, httptools' response parser (llhttp; it decodes
chunked bodies), keep-alive connections per (host, port) with no limit on their number, and aiohttp's
``ClientTimeout`` semantics and exception types, so that the callers' error handling (proxy.open_upstream,
the gateway's attempt, the stream relay) and every FailureReason stay as they were:

  cannot connect              UpstreamConnectError (an aiohttp.ClientConnectionError with ``os_error``)
  closed before/while sending ServerDisconnectedError
  closed in the middle        ClientPayloadError ("Response payload is not completed", as aiohttp)
  not HTTP                    MalformedResponseError (an aiohttp.ClientResponseError); ClientPayloadError mid-body
  total time ran out          TimeoutError (the whole exchange, reading the body included)
  sock_read gap ran out       aiohttp.ServerTimeoutError (a TimeoutError too)

Plain http:// only: https:// endpoints, health checks and adapter loads keep the aiohttp session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

PAUSE_AT = 256 * 1024  # a stream's unread bytes past which reading from the socket pauses (backpressure)
KEEPALIVE_S = 15.0  # an idle connection older than this is closed rather than reused (as aiohttp's connector)


class UpstreamConnectError(aiohttp.ClientConnectionError):
    """No connection to the replica (refused, unreachable, no such host): aiohttp's ClientConnectorError's role."""

    def __init__(self, host: str, port: int, os_error: OSError) -> None:
        super().__init__(host, port, os_error)
        self.host, self.port, self.os_error = host, port, os_error

    def __str__(self) -> str:
        return f"cannot connect to {self.host}:{self.port} ({self.os_error})"


class MalformedResponseError(aiohttp.ClientResponseError):
    """The replica's answer is not HTTP we can parse (aiohttp raises a ClientResponseError for that too)."""

    def __init__(self, url: str, detail: str) -> None:
        info = aiohttp.RequestInfo(URL(url), "POST", CIMultiDictProxy(CIMultiDict()))
        super().__init__(info, (), status=0, message=detail)


class _Target:
    """One URL taken apart once: where to connect, and the request line and host header to send."""

    __slots__ = ("key", "host", "port", "head")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the lean client speaks plain http:// only: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.key = (self.host, self.port)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.head = f"POST {path} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n".encode()


class HttpClient:
    """Keep-alive connections per (host, port); ``post`` returns a Response once its status line and headers are in.

    ``timeout``: the default when a call passes none (the gateway always passes its own).
    """

    def __init__(self, timeout: aiohttp.ClientTimeout | None = None, keepalive_s: float = KEEPALIVE_S) -> None:
        self.timeout = timeout or aiohttp.ClientTimeout()
        self.keepalive_s = keepalive_s
        self.idle: dict[tuple[str, int], list[_Connection]] = {}
        self.closed = False
        self._targets: dict[str, _Target] = {}

    async def post(self, url: str, body: bytes, *, request_id: str, api_key: str | None = None,
                   timeout: aiohttp.ClientTimeout | None = None) -> Response:
        if self.closed:
            raise aiohttp.ClientConnectionError("the HTTP client is closed")
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 1024:  # replicas come and go (DNS discovery)
                self._targets.clear()
            target = self._targets[url] = _Target(url)
        head = b"%scontent-length: %d\r\nx-request-id: %s\r\n" % (target.head, len(body), request_id.encode())
        if api_key:
            if "\r" in api_key or "\n" in api_key:
                raise ValueError("an API key must not hold line breaks")
            head += b"authorization: Bearer %s\r\n" % api_key.encode()
        message = head + b"\r\n" + body
        timeout = timeout or self.timeout
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = None if timeout.total is None else now + timeout.total
        connection = self._idle_connection(target.key, now)
        if connection is not None:
            try:
                return await self._exchange(loop, connection, message, deadline, timeout.sock_read, url)
            except _NoAnswer:
                # The kept-alive connection was closed under us (typically the server's idle timeout racing this
                # request) before a single byte of an answer. This POST is safe to send again although POST is not
                # idempotent: nothing was answered, and a completion changes nothing on the replica beyond the
                # compute (at worst a generation nobody saw is repeated). Once only, on a fresh connection; a
                # fresh connection that drops the request is the replica's answer (ServerDisconnectedError).
                pass
        connect_s = min((s for s in (timeout.sock_connect, timeout.connect) if s is not None), default=None)
        connection = await self._connect(loop, target, connect_s, deadline)
        return await self._exchange(loop, connection, message, deadline, timeout.sock_read, url)

    async def close(self) -> None:
        """Close the idle connections; those in use close when their answers are released."""
        self.closed = True
        for connections in self.idle.values():
            for connection in connections:
                connection.close()
        self.idle.clear()

    def _idle_connection(self, key: tuple[str, int], now: float) -> _Connection | None:
        idle = self.idle.get(key)
        if not idle:
            return None
        if now - idle[0].idle_since >= self.keepalive_s:  # idle too long (oldest first): closed, not reused
            expired = 0
            while expired < len(idle) and now - idle[expired].idle_since >= self.keepalive_s:
                idle[expired].close()
                expired += 1
            del idle[:expired]
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be timed out by the server
            if not connection.closed and not connection.transport.is_closing():  # type: ignore[union-attr]
                return connection
            connection.close()
        return None

    def _put_back(self, connection: _Connection) -> None:
        if self.closed:
            connection.close()
            return
        connection.idle_since = connection.loop.time()
        idle = self.idle.get(connection.key)
        if idle is None:
            idle = self.idle[connection.key] = []
        idle.append(connection)

    async def _connect(self, loop: asyncio.AbstractEventLoop, target: _Target, connect_s: float | None,
                       deadline: float | None) -> _Connection:
        limit = deadline if connect_s is None else loop.time() + connect_s
        if deadline is not None and limit is not None:
            limit = min(limit, deadline)
        connection = _Connection(self, target.key, loop)
        try:
            async with asyncio.timeout_at(limit):
                await loop.create_connection(lambda: connection, target.host, target.port)
        except TimeoutError:
            raise  # sock_connect or total ran out (TimeoutError is an OSError: not a refusal)
        except OSError as exc:
            raise UpstreamConnectError(target.host, target.port, exc) from None
        return connection

    async def _exchange(self, loop: asyncio.AbstractEventLoop, connection: _Connection, message: bytes,
                        deadline: float | None, sock_read: float | None, url: str) -> Response:
        response = Response(connection, url)
        connection.response = response
        if deadline is not None:
            response.total_timer = loop.call_at(deadline, response.time_out)
        if sock_read is not None:
            response.arm_sock_read(sock_read)
        try:
            connection.transport.write(message)  # type: ignore[union-attr]  # set by connection_made
            while not response.headers_done:
                await response.wait()
        except BaseException:
            response.release()  # a failure or a cancellation: the connection is not reused
            raise
        return response


class _NoAnswer(Exception):
    """A reused connection closed before any byte of the answer came back."""


class _Connection(asyncio.Protocol):
    """One TCP connection: feeds what it receives to its parser, whose callbacks fill the current Response."""

    __slots__ = ("client", "key", "loop", "transport", "parser", "response", "closed", "reused", "keep_alive",
                 "idle_since")

    def __init__(self, client: HttpClient, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.reused = False
        self.keep_alive = False
        self.idle_since = 0.0

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP connection's transport

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing was asked on this connection: it cannot be trusted with the next answer
            self.close()
            return
        response.got_bytes = True
        if response.read_timer is not None:
            response.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if response.headers_done:
                response.fail(aiohttp.ClientPayloadError(f"Response payload is not valid HTTP: {exc}"))
            else:
                response.fail(MalformedResponseError(response.url, f"not a valid HTTP answer: {exc}"))
            self.response = None
            self.close()  # also after a complete answer followed by bytes nobody asked for
            return
        if response.complete:
            self.response = None
            if self.keep_alive and not self.closed:
                self.reused = True
                self.client._put_back(self)
            else:
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is None:
            return
        self.response = None
        if response.headers_done and response.until_eof:
            response.finish()  # neither a length nor chunks: the body is what came before the close
        elif not response.got_bytes and self.reused:
            response.fail(_NoAnswer())
        elif response.headers_done:
            response.fail(aiohttp.ClientPayloadError("Response payload is not completed"))
        else:
            response.fail(aiohttp.ServerDisconnectedError())

    def pause_writing(self) -> None:  # request bodies are small and written at once: nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks ---

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        if size == 14 or size == 17:  # content-length, transfer-encoding: the body does not run until the close
            if name.lower() in (b"content-length", b"transfer-encoding"):
                self.response.until_eof = False  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        if response.headers_done:  # a second answer to one request
            raise ValueError("more than one answer")
        response.status = self.parser.get_status_code()
        response.headers_done = True
        response.wake()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response.buffer.append(body)
        response.size += len(body)
        if response.waiter is not None:
            response.wake()
        if response.size > PAUSE_AT and not response.whole and not response.paused:
            response.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # here: after this callback llhttp resets its flags
        self.response.finish()  # type: ignore[union-attr]


class Response:
    """The replica's answer (service/proxy.py's UpstreamResponse): ``status``, the body whole or as it comes.

    ``content`` is the response itself (``readany``, ``iter_any``). The connection goes back to the pool as
    soon as the answer is complete; ``release`` of an unfinished answer closes it.
    """

    __slots__ = ("connection", "url", "status", "headers_done", "until_eof", "complete", "error", "got_bytes",
                 "buffer", "size", "waiter", "paused", "whole", "total_timer", "read_timer", "sock_read",
                 "last_read")

    def __init__(self, connection: _Connection, url: str) -> None:
        self.connection: _Connection | None = connection
        self.url = url
        self.status = 0
        self.headers_done = False
        self.until_eof = True  # until a content-length or transfer-encoding header says otherwise
        self.complete = False
        self.error: BaseException | None = None
        self.got_bytes = False
        self.buffer: list[bytes] = []
        self.size = 0
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.whole = False  # read() wants all of it: no backpressure
        self.total_timer: asyncio.TimerHandle | None = None
        self.read_timer: asyncio.TimerHandle | None = None
        self.sock_read = 0.0
        self.last_read = 0.0

    # --- what the gateway uses ---

    @property
    def content(self) -> Response:
        return self

    async def read(self) -> bytes:
        self.whole = True
        self._resume()
        while not self.complete:
            await self.wait()
        return self._take()

    async def readany(self) -> bytes:
        while not self.buffer:
            if self.complete:
                return b""
            await self.wait()
        return self._take()

    def iter_any(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.readany()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    def release(self) -> None:
        """Done with this answer: an unfinished one closes its connection (a finished one went back already)."""
        connection = self.connection
        if connection is None:
            return
        self.connection = None
        self._stop_timers()
        if connection.response is self:
            connection.response = None
            connection.close()
        if not self.complete and self.error is None:
            self.error = aiohttp.ClientConnectionError("the answer was released before its end")

    # --- the connection's side ---

    def wait(self) -> asyncio.Future[None]:
        if self.error is not None:
            raise self.error
        waiter = self.waiter = self.connection.loop.create_future()  # type: ignore[union-attr]
        return waiter

    def wake(self, error: BaseException | None = None) -> None:
        """The waiting reader goes on (or gets ``error``)."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    def finish(self) -> None:
        self.complete = True
        self._stop_timers()
        self.connection = None
        self.wake()

    def fail(self, error: BaseException) -> None:
        """The exchange cannot go on: the waiting reader gets ``error`` (what is buffered stays readable)."""
        if self.complete or self.error is not None:
            return
        self.error = error
        self._stop_timers()
        connection = self.connection
        if connection is not None:
            self.connection = None
            if connection.response is self:
                connection.response = None
            connection.close()
        self.wake(error)

    def time_out(self) -> None:
        self.total_timer = None
        self.fail(TimeoutError())

    def arm_sock_read(self, seconds: float) -> None:
        loop = self.connection.loop  # type: ignore[union-attr]
        self.sock_read = seconds
        self.last_read = loop.time()
        self.read_timer = loop.call_at(self.last_read + seconds, self._check_sock_read)

    def _check_sock_read(self) -> None:
        """No byte for ``sock_read`` seconds while reading: a timeout. One timer, moved on lazily."""
        connection = self.connection
        if connection is None:
            self.read_timer = None
            return
        now = connection.loop.time()
        if self.paused:  # the reader is behind, not the replica
            self.last_read = now
        due = self.last_read + self.sock_read
        if now < due:
            self.read_timer = connection.loop.call_at(due, self._check_sock_read)
            return
        self.read_timer = None
        self.fail(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))

    def _take(self) -> bytes:
        buffer = self.buffer
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        self.buffer = []
        self.size = 0
        if self.paused:
            self._resume()
        return data

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            connection = self.connection
            if connection is not None and connection.transport is not None:
                if self.read_timer is not None:
                    self.last_read = connection.loop.time()
                connection.transport.resume_reading()

    def _stop_timers(self) -> None:
        if self.total_timer is not None:
            self.total_timer.cancel()
            self.total_timer = None
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

"""A lean HTTP/1.1 client for the request path: POST a JSON body to a replica, read the answer whole or as it streams.

aiohttp's client was about 40% of the gateway's Python time per request (py-spy under bench/overhead.py):
request objects, header multidicts, timer contexts, payload registries. This client does only what the
request path needs: one asyncio Protocol per connection, httptools' response parser (llhttp; it decodes
chunked bodies), keep-alive connections per (host, port) with no limit on their number. Its timeouts and
errors are loragate's own (service/transport.py):

  cannot connect              ConnectFailed (``os_error``)
  closed before the head      Disconnected
  closed in the middle        IncompleteAnswer; also bytes that stop being HTTP mid-body
  not an answer we accept     MalformedAnswer: a bad status line, a status outside 100-599, 101, a header field
                              over FIELD_MAX bytes, a head over HEAD_MAX (so at most some 16000 fields), a
                              transfer coding other than chunked (we send no TE: the server must not use one)
  total time ran out          TransportTimeout (the whole exchange, reading the body included)
  read gap ran out            ReadTimeout (a TransportTimeout)

What the wire may do, and what the client does with it:
- 1xx informational answers (100 Continue, 103 Early Hints) before the answer are skipped; 101 is an error.
- The head is buffered until its blank line and handed to the parser whole, so a head costs time linear in its
  size whatever the pieces it comes in; a trailer section is bounded the same way (HEAD_MAX bytes without body).
- Framing is llhttp's (RFC 9112 §6.3): content-length, chunked, else until the close (never reused then).
- A connection goes back to the pool only after a whole answer with keep-alive, reading (never paused), and
  nothing after the answer; bytes nobody asked for (after an answer, or while idle) close it.

Plain http:// only: https:// endpoints, health checks and adapter loads keep the aiohttp session.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httptools

from loragate.service.transport import (
    ConnectFailed,
    Disconnected,
    IncompleteAnswer,
    MalformedAnswer,
    ReadTimeout,
    Released,
    StreamedAnswer,
    Timeout,
    TransportError,
    TransportTimeout,
)

PAUSE_AT = 256 * 1024  # a stream's unread bytes past which reading from the socket pauses (backpressure)
KEEPALIVE_S = 15.0  # an idle connection older than this is closed rather than reused (as aiohttp's connector)
FIELD_MAX = 8190  # the longest status line or header field line (aiohttp's max_line_size / max_field_size)
HEAD_MAX = 64 * 1024  # the longest head (status line and header section), also a trailer section's bound


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

    ``timeout``: the default when a call passes none (the gateway always passes its own). ``connections``: every
    open connection, in use or idle (``idle``).
    """

    def __init__(self, timeout: Timeout | None = None, keepalive_s: float = KEEPALIVE_S) -> None:
        self.timeout = timeout or Timeout()
        self.keepalive_s = keepalive_s
        self.idle: dict[tuple[str, int], list[_Connection]] = {}
        self.connections: set[_Connection] = set()
        self.closed = False
        self._targets: dict[str, _Target] = {}

    async def post(
        self,
        url: str,
        body: bytes,
        *,
        request_id: str,
        api_key: str | None = None,
        timeout: Timeout | None = None,
        traceparent: str | None = None,
    ) -> Response:
        if self.closed:
            raise TransportError("the HTTP client is closed")
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
        if traceparent:  # made by service/tracing.py from hex ids, never from client bytes
            head += b"traceparent: %s\r\n" % traceparent.encode()
        message = head + b"\r\n" + body
        timeout = timeout or self.timeout
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = None if timeout.total is None else now + timeout.total
        connection = self._idle_connection(target.key, now)
        if connection is not None:
            try:
                return await self._exchange(loop, connection, message, deadline, timeout.read)
            except _NoAnswer:
                # The kept-alive connection was closed under us (typically the server's idle timeout racing this
                # request) before a single byte of an answer. This POST is safe to send again although POST is not
                # idempotent: nothing was answered, and a completion changes nothing on the replica beyond the
                # compute (at worst a generation nobody saw is repeated). Once only, on a fresh connection; a
                # fresh connection that drops the request is the replica's answer (Disconnected).
                pass
        connection = await self._connect(loop, target, timeout.connect, deadline)
        return await self._exchange(loop, connection, message, deadline, timeout.read)

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
            if connection.reusable():
                return connection
            connection.close()
        return None

    def _put_back(self, connection: _Connection) -> None:
        """A connection whose answer just ended whole (reading again, see on_message_complete)."""
        if self.closed:
            connection.close()
            return
        connection.idle_since = connection.loop.time()
        idle = self.idle.get(connection.key)
        if idle is None:
            idle = self.idle[connection.key] = []
        idle.append(connection)

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, target: _Target, connect_s: float | None, deadline: float | None
    ) -> _Connection:
        limit = deadline if connect_s is None else loop.time() + connect_s
        if deadline is not None and limit is not None:
            limit = min(limit, deadline)
        connection = _Connection(self, target.key, loop)
        try:
            async with asyncio.timeout_at(limit):
                await loop.create_connection(lambda: connection, target.host, target.port)
        except TimeoutError:  # the connect timeout or the total ran out (TimeoutError is an OSError: not a refusal)
            connection.close()
            raise TransportTimeout(f"no connection to {target.host}:{target.port} in time") from None
        except OSError as exc:
            raise ConnectFailed(target.host, target.port, exc) from None
        return connection

    async def _exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        connection: _Connection,
        message: bytes,
        deadline: float | None,
        read_s: float | None,
    ) -> Response:
        response = connection.response = Response(connection)
        connection.in_head = True
        if deadline is not None:
            response.total_timer = loop.call_at(deadline, response.time_out)
        if read_s is not None:
            response.arm_read_timer(read_s)
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
    """One TCP connection: buffers an answer's head, then feeds its parser, whose callbacks fill the Response.

    Between two answers a connection is idle: not paused, its parser between messages, no response attached.
    """

    __slots__ = (
        "client",
        "key",
        "loop",
        "transport",
        "parser",
        "response",
        "closed",
        "reused",
        "keep_alive",
        "idle_since",
        "in_head",
        "head",
        "line_start",
        "codings",
        "unparsed",
    )

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
        self.in_head = False  # before the answer's blank line: bytes go to ``head``, not to the parser
        self.head = bytearray()
        self.line_start = 0  # where the head's last line begins
        self.codings: list[bytes] | None = None
        self.unparsed = 0  # bytes fed since the parser last gave body bytes (bounds a trailer section)

    def reusable(self) -> bool:
        transport = self.transport
        return (
            not self.closed
            and self.response is None
            and transport is not None
            and not transport.is_closing()
            and transport.is_reading()
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP connection's transport
        self.client.connections.add(self)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing was asked on this connection: it cannot be trusted with the next answer
            self.close()
            return
        response.got_bytes = True
        if response.read_timer is not None:
            response.last_read = self.loop.time()
        if self.in_head:
            # The usual head: whole in this read, no line possibly over FIELD_MAX, a final (2xx-5xx) status (the
            # parser checks it is one). Anything else goes the long way.
            end = data.find(b"\r\n\r\n", 0, FIELD_MAX)
            if end > 9 and 50 <= data[9] <= 53 and not self.head:
                self.in_head = False
            else:
                data = self._read_head(data, response)  # type: ignore[assignment]
                if data is None:
                    return
        else:
            self.unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            detail = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__ else exc
            if response.headers_done:
                response.fail(IncompleteAnswer(f"the answer's body is not valid HTTP: {detail}"))
            else:
                response.fail(MalformedAnswer(f"not a valid HTTP answer: {detail}"))
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
        elif self.unparsed > HEAD_MAX:  # neither body bytes nor an end: an endless trailer section or chunk line
            self._malformed(response, f"more than {HEAD_MAX} bytes without body bytes or an end")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.connections.discard(self)
        response = self.response
        if response is None:
            return
        self.response = None
        if response.headers_done and response.until_eof:
            response.finish()  # neither a length nor chunks: the body is what came before the close
        elif not response.got_bytes and self.reused:
            response.fail(_NoAnswer())
        elif response.headers_done:
            response.fail(IncompleteAnswer("the connection closed before the end of the answer"))
        else:
            response.fail(Disconnected("the connection closed before an answer"))

    def pause_writing(self) -> None:  # request bodies are small and written at once: nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    # --- the head ---

    def _read_head(self, data: bytes, response: Response) -> bytes | None:
        """Buffer the head until its blank line: the final head and what follows it, or None (incomplete or failed).

        Linear in the head's size: each byte is searched once for the blank line and once for a line end.
        Informational answers (1xx) are dropped here; the parser only ever sees the final answer.
        """
        buffer = self.head
        start = 0
        if buffer:
            start = max(0, len(buffer) - 3)
            buffer += data
            data = buffer  # type: ignore[assignment]
        while True:
            end = data.find(b"\r\n\r\n", start)
            if end < 0:
                if len(data) > HEAD_MAX:
                    self._malformed(response, f"the answer's head is over {HEAD_MAX} bytes")
                    return None
                newline = data.rfind(b"\n", start)
                if newline >= 0:
                    self.line_start = newline + 1
                if len(data) - self.line_start > FIELD_MAX:
                    self._malformed(response, f"a header field is over {FIELD_MAX} bytes")
                    return None
                if data.count(b"\n", start) != data.count(b"\r\n", max(0, start - 1)):
                    break  # a line ending in a bare LF: the parser (strict) says what is wrong with it
                if data is not buffer:
                    buffer += data
                return None
            size = end + 4
            if size > HEAD_MAX:
                self._malformed(response, f"the answer's head is over {HEAD_MAX} bytes")
                return None
            if size > FIELD_MAX and max(map(len, data[:end].split(b"\r\n"))) > FIELD_MAX:
                self._malformed(response, f"a header field is over {FIELD_MAX} bytes")
                return None
            status = _status(data)
            if status is not None:
                if not 100 <= status <= 599:
                    self._malformed(response, f"status {status} is not an HTTP status")
                    return None
                if status < 200:
                    if status == 101:
                        self._malformed(response, "101: the server switched protocols")
                        return None
                    rest = data[size:]  # an informational answer (no body): the real one follows
                    buffer.clear()
                    data = rest
                    start = self.line_start = 0
                    continue
            break
        self.in_head = False
        self.line_start = 0
        if data is buffer:
            data = bytes(data)
            buffer.clear()
        elif type(data) is not bytes:
            data = bytes(data)
        return data

    def _malformed(self, response: Response, detail: str) -> None:
        response.fail(MalformedAnswer(detail) if not response.headers_done else IncompleteAnswer(detail))
        self.response = None
        self.head.clear()
        self.close()
        return None

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if self.response.complete:  # type: ignore[union-attr]  # bytes after the answer: nobody asked for them
            raise ValueError("bytes after the answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        if size == 14 or size == 17:  # content-length, transfer-encoding: the body does not run until the close
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                if self.codings is None:
                    self.codings = []
                self.codings += [coding.strip().lower() for coding in value.split(b",")]
            elif lowered == b"content-length":
                self.response.until_eof = False  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if not 200 <= status <= 599:  # the head reader took 1xx out; anything else here is not an answer
            raise ValueError(f"status {status}")
        codings = self.codings
        if codings is not None:
            # RFC 9112 §6.3: chunked last decodes the body; any other last coding means "until the close". We
            # send no TE header, so no coding but chunked (or the no-op identity) may be used on our answers.
            for coding in codings:
                if coding != b"chunked" and coding != b"identity":
                    raise ValueError(f"transfer coding {coding.decode(errors='replace')!r} is not supported")
            chunked = codings[-1] == b"chunked"
            if chunked and codings.count(b"chunked") > 1:
                raise ValueError("chunked applied twice")
            if b"chunked" in codings and not chunked:
                raise ValueError("chunked is not the last transfer coding")
            response.until_eof = not chunked
        response.status = status
        response.headers_done = True
        response.wake()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        self.unparsed = 0
        response.buffer.append(body)
        response.size += len(body)
        if response.waiter is not None:
            response.wake()
        if response.size > PAUSE_AT and not response.whole and not response.paused:
            response.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # here: after this callback llhttp resets its flags
        self.unparsed = 0
        self.codings = None
        response = self.response
        assert response is not None
        if response.paused:  # the answer is whole: the reader's pace no longer holds the socket
            response.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        response.finish()


def _status(head: bytes | bytearray) -> int | None:
    """The status code of ``HTTP/1.x NNN ...``; None when the status line is not that (the parser says why)."""
    if head[:7] == b"HTTP/1." and head[8:9] == b" " and head[12:13] in (b" ", b"\r"):
        code = head[9:12]
        if code.isdigit():
            return int(code)
    return None


class Response(StreamedAnswer):
    """The replica's answer (service/proxy.py's UpstreamResponse): ``status``, the body whole or as it comes.

    ``content`` is the response itself (``readany``, ``iter_any``: service/transport.py's StreamedAnswer). The
    connection goes back to the pool as soon as the answer is complete; ``release`` of an unfinished answer closes it.
    """

    __slots__ = (
        "connection",
        "status",
        "headers_done",
        "until_eof",
        "complete",
        "error",
        "got_bytes",
        "buffer",
        "size",
        "waiter",
        "paused",
        "whole",
        "total_timer",
        "read_timer",
        "read_s",
        "last_read",
    )

    def __init__(self, connection: _Connection) -> None:
        self.connection: _Connection | None = connection
        self.status = 0
        self.headers_done = False
        self.until_eof = True  # until a content-length or transfer-encoding header says otherwise
        self.complete = False
        self.error: BaseException | None = None
        self.got_bytes = False
        self.buffer: list[bytes] = []
        self.size = 0
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False  # reading from the socket paused for this answer's reader
        self.whole = False  # read() wants all of it: no backpressure
        self.total_timer: asyncio.TimerHandle | None = None
        self.read_timer: asyncio.TimerHandle | None = None
        self.read_s = 0.0
        self.last_read = 0.0

    # --- what the gateway uses ---

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
            self.error = Released("the answer was released before its end")

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
        self.fail(TransportTimeout("the exchange's total time ran out"))

    def arm_read_timer(self, seconds: float) -> None:
        loop = self.connection.loop  # type: ignore[union-attr]
        self.read_s = seconds
        self.last_read = loop.time()
        self.read_timer = loop.call_at(self.last_read + seconds, self._check_read)

    def _check_read(self) -> None:
        """No byte for ``read_s`` seconds while reading: a timeout. One timer, moved on lazily."""
        connection = self.connection
        if connection is None:
            self.read_timer = None
            return
        now = connection.loop.time()
        if self.paused:  # the reader is behind, not the replica
            self.last_read = now
        due = self.last_read + self.read_s
        if now < due:
            self.read_timer = connection.loop.call_at(due, self._check_read)
            return
        self.read_timer = None
        self.fail(ReadTimeout(f"no byte from the upstream in {self.read_s:g} s"))

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

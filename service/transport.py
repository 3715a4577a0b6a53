"""loragate's own transport vocabulary: the timeouts of one upstream exchange and the errors it can end in.

The gateway, the stream relay, the shadow path and the control calls (ControlClient: health checks, /v1/models,
/metrics scrapes, adapter loads) speak only these. Each client maps its own errors once, at its edge
(service/httpclient.py raises these directly; the aiohttp session's are mapped in service/aiohttpedge.py),
so a client can change without touching its callers (as httpx maps httpcore's errors).

  ConnectFailed      no connection to the replica (refused, unreachable, no such host); ``os_error``
  Disconnected       the connection closed before the answer's status line and headers
  IncompleteAnswer   the connection closed, or the bytes stopped being HTTP, in the middle of the body
  MalformedAnswer    what came back is not an HTTP answer we accept (status line, headers, framing, limits)
  TransportTimeout   the exchange's total time ran out (a TimeoutError)
  ReadTimeout        no byte for ``Timeout.read`` seconds while waiting for one (a TransportTimeout)
  Released           the answer was released before its end and then read

StreamedAnswer is the body iteration both clients' answers share (``content``, ``iter_any``, async for).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Timeout:
    """``total``: the whole exchange, reading the body included; ``connect``: opening a connection;
    ``read``: the longest silence while bytes are awaited (not counted while the reader is behind). None: no limit."""

    total: float | None = None
    connect: float | None = None
    read: float | None = None


class TransportError(Exception):
    """An upstream exchange that did not end in a whole HTTP answer."""


class ConnectFailed(TransportError):
    def __init__(self, host: str, port: int, os_error: OSError) -> None:
        super().__init__(host, port, os_error)
        self.host, self.port, self.os_error = host, port, os_error

    def __str__(self) -> str:
        return f"cannot connect to {self.host}:{self.port} ({self.os_error})"


class Disconnected(TransportError):
    """Closed before a whole status line and headers came back."""


class IncompleteAnswer(TransportError):
    """Closed, or no longer HTTP, in the middle of the body (what came before stays readable)."""


class MalformedAnswer(TransportError):
    """Not an HTTP answer we accept."""


class Released(TransportError):
    """The answer was released before its end."""


class TransportTimeout(TransportError, TimeoutError):
    """The exchange's total time ran out."""


class ReadTimeout(TransportTimeout):
    """No byte for the read timeout while one was awaited."""


class StreamedAnswer:
    """An upstream answer that is its own ``content``: iterating it yields ``readany()``'s chunks until the end.

    Subclasses (service/httpclient.py's Response, service/aiohttpedge.py's AiohttpAnswer) give ``readany``: the bytes
    come in so far, b"" at the end, raising this module's errors.
    """

    __slots__ = ()

    async def readany(self) -> bytes:
        raise NotImplementedError

    @property
    def content(self) -> StreamedAnswer:
        return self

    def iter_any(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> StreamedAnswer:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.readany()
        if not chunk:
            raise StopAsyncIteration
        return chunk


# --- control calls: the gateway's own requests to its engines (everything but the answers it relays) ---


@dataclass(frozen=True, slots=True)
class Reply:
    """The whole answer to a control call: its status, and its body read to the end (never over ``max_bytes``)."""

    status: int
    body: bytes


class ControlClient(Protocol):
    """Health checks, /v1/models, /metrics scrapes, adapter loads and unloads (service/replicas.py,
    service/adapterloads.py) through one boundary, implemented once per client (service/aiohttpedge.py).

    Each call returns the whole answer, whatever its status, or raises a TransportError: ConnectFailed,
    TransportTimeout when ``timeout`` runs out (reading the body included), IncompleteAnswer, and
    MalformedAnswer for a body over ``max_bytes`` (the connection is then closed, never reused).
    ``post`` sends ``json``, the bytes of a JSON document.
    """

    async def get(self, url: str, *, timeout: Timeout, max_bytes: int) -> Reply: ...

    async def post(self, url: str, json: bytes, *, timeout: Timeout, max_bytes: int) -> Reply: ...

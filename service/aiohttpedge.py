"""aiohttp's edge: its timeouts and errors in service/transport.py's terms, in one place, and the control calls
(transport.ControlClient: health checks, /v1/models, /metrics scrapes, adapter loads) over the app's session.

The answers the gateway relays through aiohttp (https:// endpoints, or LORAGATE_UPSTREAM_CLIENT=aiohttp) are
opened here too (``aiohttp_post``, ``AiohttpAnswer``), for service/proxy.py's ``open_upstream``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from loragate.common.httpbody import BodyTooLarge, read_capped
from loragate.service.transport import (
    ConnectFailed,
    Disconnected,
    IncompleteAnswer,
    MalformedAnswer,
    Reply,
    StreamedAnswer,
    Timeout,
    TransportError,
    TransportTimeout,
)

AIOHTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError)  # what aiohttp raises for an exchange
_JSON = {"content-type": "application/json"}


def aiohttp_error(exc: BaseException) -> TransportError:
    """One of AIOHTTP_ERRORS as service/transport.py's error."""
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError, TimeoutError)):
        return TransportTimeout(str(exc) or "no answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectFailed(exc.host, exc.port or 0, exc.os_error)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return IncompleteAnswer(str(exc))
    if isinstance(exc, aiohttp.ClientConnectionError):
        return Disconnected(str(exc) or type(exc).__name__)
    if isinstance(exc, aiohttp.ClientResponseError):
        return MalformedAnswer(str(exc))
    return TransportError(f"{type(exc).__name__}: {exc}")


def client_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=timeout.total, sock_connect=timeout.connect, sock_read=timeout.read)


class AiohttpControl:
    """transport.ControlClient over an aiohttp session (the app's: its connection pool, TLS and DNS cache)."""

    __slots__ = ("session",)

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def get(self, url: str, *, timeout: Timeout, max_bytes: int) -> Reply:
        return await self._call("GET", url, None, timeout, max_bytes)

    async def post(self, url: str, json: bytes, *, timeout: Timeout, max_bytes: int) -> Reply:
        return await self._call("POST", url, json, timeout, max_bytes)

    async def _call(self, method: str, url: str, body: bytes | None, timeout: Timeout, max_bytes: int) -> Reply:
        try:
            async with self.session.request(
                method, url, data=body, headers=None if body is None else _JSON, timeout=client_timeout(timeout)
            ) as response:
                return Reply(response.status, await _read_at_most(response, max_bytes))
        except AIOHTTP_ERRORS as exc:
            raise aiohttp_error(exc) from exc


async def _read_at_most(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The body to its end; MalformedAnswer, the connection closed, as soon as it is over ``max_bytes``."""
    try:
        return await read_capped(response, max_bytes)
    except BodyTooLarge as exc:
        raise MalformedAnswer(str(exc)) from None


# --- the answers the gateway relays through aiohttp's session (service/proxy.py's open_upstream) ---


async def aiohttp_post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    request_id: str,
    timeout: Timeout | None,
    api_key: str | None,
    traceparent: str | None = None,
) -> AiohttpAnswer:
    headers = {"content-type": "application/json", "x-request-id": request_id}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    if traceparent:
        headers["traceparent"] = traceparent
    options: dict[str, Any] = (
        {}
        if timeout is None
        else {  # None: the session's
            "timeout": client_timeout(timeout)
        }
    )
    try:
        return AiohttpAnswer(await session.post(url, data=body, headers=headers, **options))
    except AIOHTTP_ERRORS as exc:
        raise aiohttp_error(exc) from exc


class AiohttpAnswer(StreamedAnswer):
    """An aiohttp.ClientResponse as an UpstreamResponse whose reads raise service/transport.py's errors."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except AIOHTTP_ERRORS as exc:
            raise aiohttp_error(exc) from exc

    async def readany(self) -> bytes:
        try:
            return await self._response.content.readany()
        except AIOHTTP_ERRORS as exc:
            raise aiohttp_error(exc) from exc

    def release(self) -> None:
        self._response.release()

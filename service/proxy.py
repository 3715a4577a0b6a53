"""Forward one request to one replica, and relay its answer: whole, or as SSE events as they come.

Token usage is always learned: a non-streaming answer carries it; for streams
the gateway asks upstream for a final usage chunk and, if the client did not
ask for one itself, drops that chunk before it reaches the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from loragate.common import sse
from loragate.service.aiohttpedge import aiohttp_post
from loragate.service.failures import FailureReason, UpstreamFailure
from loragate.service.httpclient import HttpClient
from loragate.service.transport import ConnectFailed, Disconnected, Timeout, TransportError, TransportTimeout

if TYPE_CHECKING:  # the session's type only: aiohttp itself is used in service/aiohttpedge.py
    import aiohttp


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_json(cls, usage: object) -> "Usage | None":
        if not isinstance(usage, dict):
            return None
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def answer_usage(body: bytes) -> Usage | None:
    """The usage in a JSON answer (None when it has none); ValueError when it is not a JSON object."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    return Usage.from_json(parsed.get("usage"))


class UpstreamBody(Protocol):
    def readany(self) -> Awaitable[bytes]: ...
    def iter_any(self) -> AsyncIterator[bytes]: ...


class UpstreamResponse(Protocol):
    """What the gateway uses of an upstream's answer; reading it raises service/transport.py's errors."""

    @property
    def status(self) -> int: ...
    @property
    def content(self) -> UpstreamBody: ...
    def read(self) -> Awaitable[bytes]: ...
    def release(self) -> Any: ...


class Upstream(Protocol):
    """The upstream call: POST ``body`` to ``url``, the answer once its headers are in (see open_upstream)."""

    def __call__(
        self,
        url: str,
        body: bytes,
        *,
        request_id: str,
        is_adapter: bool,
        timeout: Timeout | None = None,
        api_key: str | None = None,
        traceparent: str | None = None,
    ) -> Awaitable[UpstreamResponse]: ...


class HttpUpstream:
    """The production Upstream: open_upstream over the clients the app's lifespan binds.

    Plain http:// (the replicas) goes through the lean client when one is bound (service/httpclient.py),
    anything else (https:// hosted endpoints) through the aiohttp session.
    """

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.client: HttpClient | None = None

    def bind(self, session: aiohttp.ClientSession, client: HttpClient | None = None) -> None:
        self.session = session
        self.client = client

    def __call__(
        self,
        url: str,
        body: bytes,
        *,
        request_id: str,
        is_adapter: bool,
        timeout: Timeout | None = None,
        api_key: str | None = None,
        traceparent: str | None = None,
    ) -> Awaitable[UpstreamResponse]:
        client = self.client if self.client is not None and url.startswith("http://") else self.session
        assert client is not None, "HttpUpstream used before bind()"
        return open_upstream(
            client,
            url,
            body,
            request_id=request_id,
            is_adapter=is_adapter,
            timeout=timeout,
            api_key=api_key,
            traceparent=traceparent,
        )


async def open_upstream(
    session: aiohttp.ClientSession | HttpClient,
    url: str,
    body: bytes,
    *,
    request_id: str,
    is_adapter: bool,
    timeout: Timeout | None = None,
    api_key: str | None = None,
    traceparent: str | None = None,
) -> UpstreamResponse:
    """POST ``body`` to ``url`` through ``session`` (aiohttp's or the lean client): the response, headers read.

    Raises UpstreamFailure for answers another target might do better on:
    connection errors, timeouts, 5xx, 429, and 404 for an adapter model (the
    replica no longer holds it). Other 4xx are the client's and are returned.
    Reading the answer raises only service/transport.py's errors, whichever client it came through.
    """
    response: UpstreamResponse
    try:
        if isinstance(session, HttpClient):
            response = await session.post(
                url, body, request_id=request_id, api_key=api_key, timeout=timeout, traceparent=traceparent
            )
        else:
            response = await aiohttp_post(session, url, body, request_id, timeout, api_key, traceparent)
    except TransportTimeout:
        raise UpstreamFailure(FailureReason.TIMEOUT, f"{url}: no answer in time") from None
    except ConnectFailed as exc:
        raise UpstreamFailure(FailureReason.CONNECT_ERROR, f"{url}: cannot connect ({exc.os_error})") from None
    except Disconnected as exc:  # e.g. the server closed the connection without an answer
        raise UpstreamFailure(FailureReason.DISCONNECTED, f"{url}: {type(exc).__name__}") from None
    except TransportError as exc:
        raise UpstreamFailure(FailureReason.UPSTREAM_ERROR, f"{url}: {type(exc).__name__}: {exc}") from None
    status = response.status
    if status >= 500 or status == 429 or (status == 404 and is_adapter):
        response.release()
        reason = (
            FailureReason.UPSTREAM_5XX
            if status >= 500
            else FailureReason.UPSTREAM_429
            if status == 429
            else FailureReason.ADAPTER_MISSING
        )
        raise UpstreamFailure(reason, f"{url}: HTTP {status}")
    return response


class SseRelay:
    """Splits an SSE byte stream into whole events, notes the usage, and hides the usage-only chunk if asked.

    ``feed`` returns the bytes to forward now: every event completed by this chunk (line ends as
    LF, see loragate.common.sse), so the client sees each token as soon as upstream sends it.
    """

    __slots__ = ("_events", "hide_usage", "usage")

    def __init__(self, hide_usage: bool) -> None:
        self._events = sse.EventSplitter()
        self.hide_usage = hide_usage
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        complete = self._events.feed(chunk)
        if b'"usage"' not in complete:
            return complete
        return self._take_usage(complete)

    def drop_partial(self) -> None:
        """The upstream broke mid-event: forget the half event (a continuation starts afresh)."""
        self._events.drop_partial()

    def finish(self) -> bytes:
        """Whatever is left when upstream closes (an event without its blank line)."""
        rest = self._events.finish()
        return self._take_usage(rest) if b'"usage"' in rest else rest

    def _take_usage(self, complete: bytes) -> bytes:
        """Read the last usage in ``complete``; drop its event if it is the usage-only chunk to hide.

        Only the event holding the last ``"usage"`` is parsed: inside JSON strings the quotes
        are escaped, so the raw bytes ``"usage"`` can only be a key.
        """
        at = complete.rfind(b'"usage"')
        start = complete.rfind(b"\n\n", 0, at)
        start = 0 if start < 0 else start + 2
        end = complete.find(b"\n\n", at)
        end = len(complete) if end < 0 else end + 2
        data = sse.event_data(complete[start:end])
        if not data or not data.startswith(b"{"):
            return complete
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            return complete
        usage = Usage.from_json(parsed.get("usage")) if isinstance(parsed, dict) else None
        if usage is None:
            return complete
        self.usage = usage
        if self.hide_usage and not parsed.get("choices"):
            return complete[:start] + complete[end:]  # the usage-only chunk the client did not ask for
        return complete

"""Relaying a stream to the client, and carrying it over to another target when it breaks mid-way.

Tokens are passed on event by event. If the upstream breaks after tokens were
sent (connection lost, timeout, an error event), the stream continues on the
route's next fallback target: the request is sent again with the text so far as
the start of the answer (chat: vLLM's ``continue_final_message``; completions:
prompt + text so far), and the client keeps reading one well-formed stream that
ends in ``[DONE]``. When that cannot be done, the stream ends with an error event.
"""

from __future__ import annotations

import copy
import time
from typing import Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from loragate.common import sse
from loragate.common.sse import DONE
from loragate.service.errors import error_body
from loragate.service.failures import FailureReason
from loragate.service.exchange import RequestContext, Served
from loragate.service.proxy import SseRelay, Usage
from loragate.service.transport import TransportError


class StreamOwner(Protocol):
    """What the relay asks of whoever opened the stream (the Gateway)."""

    def abandon_stream(self, served: Served, reason: FailureReason) -> None:
        """The upstream broke: count the failure against it and let it go."""

    async def continue_stream(
        self, served: Served, forwarded: list[bytes], context: RequestContext, reason: FailureReason
    ) -> tuple[Served, int] | None:
        """A new upstream resuming from ``forwarded``, and the tokens streamed so far; None if impossible."""

    def end_stream(
        self,
        served: Served,
        context: RequestContext,
        usage: Usage | None,
        first_token_at: float | None,
        chunks: list[bytes],
        *,
        released: bool,
    ) -> None:
        """The stream is over (``served`` already let go when ``released``): release and account for it."""


class RelayedStream(Response):
    """Relays an upstream SSE stream event by event, then accounts for it (tokens, cost, TTFT, TPOT)."""

    def __init__(
        self, owner: StreamOwner, served: Served, headers: dict[str, str], context: RequestContext, hide_usage: bool
    ) -> None:
        self.owner = owner
        self.served = served
        self.context = context
        self.relay = SseRelay(hide_usage)
        self.status_code = 200
        self.background = None
        self.init_headers({**headers, "content-type": "text/event-stream", "cache-control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        owner, served, relay = self.owner, self.served, self.relay
        forwarded: list[bytes] = []
        earlier_tokens = 0  # streamed by parts that broke
        first_token_at: float | None = None
        rewrite: tuple[bytes, bytes] | None = None
        released: Served | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            while True:
                failure: FailureReason | None = None
                try:
                    chunk: bytes | None = served.first_chunk
                    chunks = served.response.content.iter_any()
                    while True:
                        out = relay.feed(chunk) if chunk else b""
                        if out:
                            cut = sse.find_error_event(out)
                            if cut >= 0:  # an error event mid-stream: keep what came before, then carry over
                                out, failure = out[:cut], FailureReason.ERROR_EVENT
                            if rewrite is not None:
                                out = out.replace(*rewrite)
                            if out:
                                if first_token_at is None:
                                    first_token_at = time.perf_counter()
                                forwarded.append(out)
                                await send({"type": "http.response.body", "body": out, "more_body": True})
                            if failure:
                                break
                        chunk = await anext(chunks, None)
                        if chunk is None:
                            tail = relay.finish()
                            if tail:
                                forwarded.append(tail)
                                await send({"type": "http.response.body", "body": tail, "more_body": True})
                            break
                except (TransportError, TimeoutError) as exc:
                    failure = FailureReason.TIMEOUT if isinstance(exc, TimeoutError) else FailureReason.DISCONNECTED
                if failure is None and not _ended(forwarded):
                    failure = FailureReason.DISCONNECTED  # closed without [DONE]: a cut, not an end
                if failure is None:
                    break
                # The upstream broke after the client got tokens: carry the stream over.
                owner.abandon_stream(served, failure)
                released = served
                relay.drop_partial()
                resumed = await owner.continue_stream(served, forwarded, self.context, failure)
                if resumed is None:
                    await send({"type": "http.response.body", "body": _error_event(failure) + DONE, "more_body": True})
                    break
                served, earlier_tokens = resumed
                rewrite = _id_rewrite(forwarded, served.first_chunk)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away; releasing the upstream response (below) aborts the generation
        finally:
            usage = relay.usage
            if usage is not None and earlier_tokens:
                # The continuation's prompt holds the earlier tokens; count them once, as output.
                usage = Usage(max(0, usage.prompt_tokens - earlier_tokens), usage.completion_tokens + earlier_tokens)
            owner.end_stream(served, self.context, usage, first_token_at, forwarded, released=released is served)


def continuation_payload(payload: dict, endpoint: str, forwarded: list[bytes]) -> tuple[dict, int] | None:
    """The request that resumes a broken stream, and how many tokens were streamed; None if impossible."""
    if payload.get("n") not in (None, 1):
        return None
    texts: list[str] = []
    for event in sse.json_objects(b"".join(forwarded)):
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            piece = (choice.get("delta") or {}).get("content") if endpoint == "chat/completions" else choice.get("text")
            if piece:
                texts.append(piece)
    so_far = "".join(texts)
    resumed = copy.deepcopy(payload)
    if endpoint == "chat/completions":
        resumed["messages"] = [*payload["messages"], {"role": "assistant", "content": so_far}]
        resumed["continue_final_message"] = True
        resumed["add_generation_prompt"] = False
    elif isinstance(payload.get("prompt"), str):
        resumed["prompt"] = payload["prompt"] + so_far
    else:
        return None
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(payload.get(key), int):
            remaining = payload[key] - len(texts)
            if remaining < 1:
                return None
            resumed[key] = remaining
    return resumed, len(texts)


def _id_rewrite(forwarded: list[bytes], first_chunk: bytes) -> tuple[bytes, bytes] | None:
    """Make the continuation's chunks carry the id the client has been seeing."""
    old, new = _first_id(b"".join(forwarded)), _first_id(first_chunk)
    if old and new and old != new:
        return (b'"id":"' + new + b'"', b'"id":"' + old + b'"')
    return None


def _first_id(data: bytes) -> bytes | None:
    start = data.find(b'"id":"')
    if start < 0:
        return None
    start += 6
    end = data.find(b'"', start)
    return data[start:end] if end > 0 else None


def _ended(forwarded: list[bytes]) -> bool:
    return bool(forwarded) and forwarded[-1].endswith(DONE)


def _error_event(reason: FailureReason) -> bytes:
    return sse.encode(
        error_body(502, f"the upstream stream broke ({reason}) and could not be continued", code="stream_interrupted")
    )

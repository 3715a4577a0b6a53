"""The request log: one record per answered request, written off the request path.

The gateway hands each finished request to ``record`` as a RequestRecord with the
raw request payload and the raw answer bytes; everything costly (parsing the
answer text, scrubbing, columnar encoding, upload) happens on the writer side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    timestamp: float  # unix seconds when the request arrived
    route: str
    variant: str
    endpoint: str  # "chat/completions" or "completions"
    status: int
    stream: bool
    fallback: str | None
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    reference_cost_usd: float
    payload: dict  # the request as the client sent it (model rewritten to the upstream's)
    body: bytes | None = None  # a whole JSON answer
    chunks: list[bytes] = field(default_factory=list)  # a streamed answer, SSE bytes as relayed


class RequestSink(Protocol):
    def record(self, record: RequestRecord) -> None:
        """Must not block: called on the request path."""


class NullRequestLog:
    """Logging off."""

    def record(self, record: RequestRecord) -> None:
        return None

"""What the gateway, the stream relay and the accounting hand each other about one request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

from loragate.common.catalog import Route, Variant
from loragate.service.auth import ANONYMOUS, Principal
from loragate.service.priority import Priority
from loragate.service.proxy import UpstreamResponse, Usage
from loragate.service.upstreams import Replica

if TYPE_CHECKING:
    from loragate.service.shadow import ShadowHandle


@dataclass(slots=True)
class Served:
    """What answered a request: the variant and replica, and why we are not on the first choice."""

    route: Route
    variant: Variant
    replica: Replica
    response: UpstreamResponse
    fallback: str | None  # a FailureReason's value, or its ``midstream`` label
    first_chunk: bytes = b""  # streams: the first bytes, read before the client saw anything
    body: bytes = b""  # non-streaming answers: read whole before the client saw anything
    usage: Usage | None = None  # ... and the usage found in it
    sent: bytes = b""  # the request as sent to this upstream (JSON), for the request log


@dataclass(slots=True)
class RequestContext:
    """What the stream relay and the accounting need to know about the request."""

    endpoint: str
    request_id: str
    arrived: float  # wall clock, for the log
    started: float  # perf counter, for durations
    payload: dict
    sent: bytes = b""  # the payload as sent upstream (the served exchange's ``Served.sent``): what the log keeps
    principal: Principal = ANONYMOUS  # charged with the tokens after the answer
    shadow: "ShadowHandle | None" = None  # its shadow copy, told when the primary is done (service/shadow.py)
    span: Any = None  # the request's trace span when tracing is on (service/tracing.py), else None
    priority: Priority = Priority.STANDARD  # its class (service/priority.py): a continuation keeps it

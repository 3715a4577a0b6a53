"""The request log's records: the ONE definition of their fields, used by the gateway that builds them and by
every reader (the queue, the row-by-row reference, the columnar conversion).

A record is a NamedTuple of plain values (str, bytes, numbers, None): the queue marshals it as it is queued
(service.requestlog.queue) and a batch crosses to the conversion process as those bytes. Readers take fields
by name (``record.payload``, or ``columns_of`` for a batch), never by position: a field added or moved here
cannot silently land in another column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, TypeVar

from loragate.common.logschema import PRIMARY

TextMode = Literal["full", "scrubbed", "none"]
Record = TypeVar("Record", bound=tuple)


class RequestRecord(NamedTuple):
    """One answered request as the gateway hands it to the log (built by keyword: service.accounting)."""

    request_id: str
    timestamp: float  # unix seconds when the request arrived
    route: str
    variant: str
    endpoint: str  # "chat/completions" or "completions"
    status: int
    stream: bool  # True: ``answer`` is the SSE stream as relayed
    fallback: str | None
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    reference_cost_usd: float
    payload: bytes  # the request as sent upstream (JSON: the client's, model rewritten to the upstream's)
    answer: bytes | None = None  # the answer's bytes: a whole JSON body, or the SSE events relayed
    role: str = PRIMARY  # or SHADOW: the shadow variant's answer to a copy (service/shadow.py)
    priority: str | None = None  # the request's class (service/priority.py); None: a shadow copy


class FeedbackRecord(NamedTuple):
    request_id: str
    timestamp: float  # unix seconds when the feedback arrived
    route: str | None  # None: the request is not among the recent ones this process served
    variant: str | None
    score: float | None
    label: str | None
    correction: str | None


def as_record(kind: type[Record], fields: tuple) -> Record:
    """The NamedTuple ``kind`` of a record's fields as a batch unmarshals them (a plain tuple in ``kind``'s
    order, written by the queue from a ``kind``), without the NamedTuple's own __new__."""
    if len(fields) != len(kind._fields):  # type: ignore[attr-defined]
        raise ValueError(f"a {kind.__name__} has {len(kind._fields)} fields, not {len(fields)}")  # type: ignore[attr-defined]
    return fields if type(fields) is kind else tuple.__new__(kind, fields)


def columns_of(kind: type[NamedTuple], records: Sequence[tuple]) -> dict[str, tuple]:
    """A batch's records (each a ``kind`` or its plain tuple) as one column a field, by name."""
    width = len(kind._fields)
    if any(len(record) != width for record in records):
        raise ValueError(f"a {kind.__name__} has {width} fields")
    columns = list(zip(*records)) if records else [() for _ in kind._fields]
    return dict(zip(kind._fields, columns))

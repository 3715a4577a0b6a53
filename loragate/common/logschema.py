"""The request log's tables, defined once: the gateway writes them, the monitor reads them.

Two tables, ``requests`` and ``feedback``, stored as Parquet. Every row carries
``schema_version``; files written before the field existed read as version 1.

Version 2 (current) stores a chat prompt as structured turns, ``prompt_messages``:
a list of ``{role, content}`` per message, content scrubbed by the writer. The flat
``prompt_text`` column (``role: content`` lines for chat, the prompt for text
completions) stays for the drift features only: nothing may parse turns back out of
it, since a message's content can itself hold a newline and ``assistant: ...``.

Rows also carry ``role``: ``primary`` (the answer the client got) or ``shadow`` (a copy of the
request answered in the dark by the route's shadow variant, service/shadow.py, under the same
``request_id`` as its primary). Files written before the column existed read as ``primary``.
A primary row carries its ``priority`` class (critical, standard, sheddable: service/priority.py);
shadow rows and files written before the column existed have none (null).

Version 1 had only ``prompt_text``. :func:`prompt_turns` therefore gives no turns
for a version-1 chat row (its turn boundaries cannot be told from the text); a
text-completion prompt, of any version, is one user turn.

pyarrow is imported only by the functions that need it: the gateway imports this
module whether or not its request log is on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

SCHEMA_VERSION = 2
LEGACY_VERSION = 1  # files without the schema_version field

REQUESTS = "requests"
FEEDBACK = "feedback"
TABLES = (REQUESTS, FEEDBACK)

CHAT_ENDPOINT = "chat/completions"
COMPLETIONS_ENDPOINT = "completions"

PRIMARY = "primary"  # requests.role: the answer the client got
SHADOW = "shadow"  # ... a shadow variant's answer to a copy of the same request (never sent to anyone)

# Column names in file order. Types: see arrow_schema.
REQUEST_COLUMNS = (
    "request_id",
    "timestamp",
    "route",
    "variant",
    "endpoint",
    "status",
    "stream",
    "fallback",
    "latency_s",
    "ttft_s",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "reference_cost_usd",
    "finish_reason",
    "prompt_text",
    "prompt_messages",
    "response_text",
    "schema_version",
    "role",
    "priority",
)
FEEDBACK_COLUMNS = ("request_id", "timestamp", "route", "variant", "score", "label", "correction", "schema_version")
COLUMNS = {REQUESTS: REQUEST_COLUMNS, FEEDBACK: FEEDBACK_COLUMNS}
# Free text and ids: (nearly) every value distinct. Parquet writers skip a dictionary and min/max statistics
# for these (both useless here, and a quarter of the write's cost).
DISTINCT_COLUMNS = frozenset({"request_id", "prompt_text", "prompt_messages", "response_text", "correction"})

Turn = dict[str, str]  # {"role": ..., "content": ...}


def arrow_schema(table: str) -> "pa.Schema":
    """The current Arrow schema of ``table`` ("requests" or "feedback")."""
    import pyarrow as pa

    stamp = pa.timestamp("ms", tz="UTC")
    turns = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    types = {
        "request_id": pa.string(),
        "timestamp": stamp,
        "route": pa.string(),
        "variant": pa.string(),
        "endpoint": pa.string(),
        "status": pa.int32(),
        "stream": pa.bool_(),
        "fallback": pa.string(),
        "latency_s": pa.float64(),
        "ttft_s": pa.float64(),
        "prompt_tokens": pa.int64(),
        "completion_tokens": pa.int64(),
        "cost_usd": pa.float64(),
        "reference_cost_usd": pa.float64(),
        "finish_reason": pa.string(),
        "prompt_text": pa.string(),
        "prompt_messages": turns,
        "response_text": pa.string(),
        "score": pa.float64(),
        "label": pa.string(),
        "correction": pa.string(),
        "schema_version": pa.int32(),
        "role": pa.string(),
        "priority": pa.string(),
    }
    return pa.schema([(name, types[name]) for name in COLUMNS[table]])


def conform(data: "pa.Table", table: str) -> "pa.Table":
    """A table read from a file of any version, in the current schema.

    Missing columns come back empty, a missing or empty ``schema_version`` as 1, ``role`` as primary; columns this
    version does not know (a newer writer's, the ``date`` partition) are kept after ours.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = arrow_schema(table)
    columns = []
    for field in schema:
        if field.name in data.column_names:
            column = data[field.name].cast(field.type)
        else:
            column = pa.nulls(data.num_rows, field.type)
        if field.name == "schema_version":
            column = pc.fill_null(column, LEGACY_VERSION)
        elif field.name == "role":
            column = pc.fill_null(column, PRIMARY)
        columns.append(column)
    extra = [name for name in data.column_names if name not in schema.names]
    return pa.Table.from_arrays(
        columns + [data[name] for name in extra],
        schema=pa.schema(list(schema) + [data.schema.field(name) for name in extra]),
    )


def flat_prompt(turns: Iterable[Mapping[str, Any]]) -> str:
    """The drift features' flat text of chat turns: one ``role: content`` line per turn. Never parse it back."""
    return "\n".join(f"{turn.get('role') or ''}: {turn.get('content') or ''}" for turn in turns)


def prompt_turns(version: Any, endpoint: Any, messages: Any, text: Any) -> list[Turn] | None:
    """The prompt of one requests row as chat turns, or None when it has none that can be trusted.

    Version 2 chat rows: the stored turns. Text completions (any version): the prompt as one
    user turn. Version 1 chat rows: None (their flat text cannot be split into turns safely).
    """
    if endpoint == COMPLETIONS_ENDPOINT:
        return [{"role": "user", "content": text}] if isinstance(text, str) else None
    if _version(version) < 2 or messages is None or isinstance(messages, (str, bytes, float, Mapping)):
        return None  # (a float: pandas' NaN for a missing value)
    turns = []
    for message in messages:
        if not isinstance(message, Mapping):
            return None
        role, content = message.get("role"), message.get("content")
        turns.append(
            {"role": role if isinstance(role, str) else "", "content": content if isinstance(content, str) else ""}
        )
    return turns


def _version(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return LEGACY_VERSION  # None / NaN: a file from before the field

"""A batch of request records -> one Arrow table of the requests log, built column by column.

The conversion process's hot loop (service/requestlog.py). The values are exactly those of
``pa.Table.from_pylist([request_row(r, mode) for r in records])`` (service/logrows.py is the
reference, record by record; tests/unit/test_log_fastpaths.py checks the two agree), without a
dict per row: the scalar fields go to Arrow as columns, each request and answer is read once
(in C, service/_lognative.c, which leaves what it cannot decide exactly to the reference's orjson
path), every text of the batch is cleaned in one call (the scrubber), and the flat prompt text is
joined by Arrow kernels. A batch as it crossed from the gateway (marshalled records) is read straight
into those columns by the queue's C reader (``batch_table``), without a tuple a record.

Anything this cannot take raises; the caller then converts the batch record by record.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from loragate.common.logschema import CHAT_ENDPOINT, REQUESTS, SCHEMA_VERSION, arrow_schema
from loragate.service.logrows import RequestRecord, TextMode, _content_text, answer_of, as_record

try:  # the C reader, built by setup.py where a C compiler is; without it every record takes the orjson path
    from loragate.service import _lognative
except ImportError:  # pragma: no cover - the tests require it built
    _lognative = None  # type: ignore[assignment]
native = _lognative
try:  # the queue's own reader of its batches (service/_logqueue.c); without it a batch is unmarshalled
    from loragate.service._logqueue import read_columns
except ImportError:  # pragma: no cover - the tests require it built
    read_columns = None  # type: ignore[assignment]

_SCHEMA = arrow_schema(REQUESTS)
_TURN = _SCHEMA.field("prompt_messages").type.value_type  # struct<role, content>

# Cleans a batch of distinct texts: text -> cleaned text (the scrubber), or None to keep them as they are.
CleanAll = Callable[[list[str]], dict[str, str]]


def requests_table(records: Sequence[tuple], text_mode: TextMode, clean_all: CleanAll | None) -> pa.Table:
    """The requests table of ``records``, each a RequestRecord's fields in its order (a RequestRecord, or the
    plain tuple a queued batch unmarshals to); ``clean_all`` is used in "scrubbed" mode only."""
    return _table(list(zip(*records)), lambda index: as_record(RequestRecord, records[index]), text_mode, clean_all)


# read_columns' letter for each RequestRecord field (service/_logqueue.c): Arrow buffers for the columns only
# Arrow reads (A str, F float, I int), lists for those the answer and turn readers take too (S str, i int,
# b bool, y bytes); "?": may be None.
BATCH_SPEC = "AFSSSibS?FF?IIFFyy?S"
_BATCH_TYPES = {"A": pa.string(), "F": pa.float64(), "I": pa.int64()}
_BATCH_KINDS = [letter for letter in BATCH_SPEC if letter != "?"]
assert len(_BATCH_KINDS) == len(RequestRecord._fields)


def batch_table(batch: bytes | mmap.mmap, text_mode: TextMode, clean_all: CleanAll | None) -> pa.Table | None:
    """The requests table of a queued batch as it crossed (service/logqueue.py: a marshalled list of records),
    read straight into columns, without a tuple a record (the C reader); None where the reader cannot (not
    built, or a value it does not read): the caller unmarshals the records for ``requests_table``."""
    if read_columns is None:
        return None
    found = read_columns(batch, BATCH_SPEC)
    if found is None:
        return None
    count = len(found[RequestRecord._fields.index("payload")])  # a list
    columns = [_arrow(_BATCH_TYPES[kind], count, *column) if kind in _BATCH_TYPES else column
               for kind, column in zip(_BATCH_KINDS, found)]

    def record_at(index: int) -> RequestRecord:
        return tuple.__new__(RequestRecord, [column[index] if isinstance(column, list) else column[index].as_py()
                                             for column in columns])

    return _table(columns, record_at, text_mode, clean_all)


def _arrow(kind: pa.DataType, count: int, validity: bytes | None, *buffers_and_nulls: bytes | int) -> pa.Array:
    """An array of read_columns' buffers: (validity, [offsets,] values, null count)."""
    *buffers, nulls = buffers_and_nulls
    arrow_buffers = [None if validity is None else pa.py_buffer(validity), *map(pa.py_buffer, buffers)]
    return pa.Array.from_buffers(kind, count, arrow_buffers, null_count=nulls)


def _table(fields: list, record_at: Callable[[int], RequestRecord], text_mode: TextMode,
           clean_all: CleanAll | None) -> pa.Table:
    """The table of one column a RequestRecord field (each a sequence, or an Arrow array of the Arrow-only ones);
    ``record_at(index)`` is the record, for the reference's reading of what the C readers leave to it."""
    (request_id, timestamp, route, variant, endpoint, status, stream, fallback, latency_s, ttft_s, prompt_tokens,
     completion_tokens, cost_usd, reference_cost_usd, payload, _answer, role) = fields
    count = len(payload)
    response, finish_reason = _answers(record_at, stream, status, _answer)
    if text_mode == "none":
        prompt_text, response_column = pa.nulls(count, pa.string()), pa.nulls(count, pa.string())
        prompt_messages = pa.nulls(count, _SCHEMA.field("prompt_messages").type)
    else:
        prompt_text, prompt_messages, response_column = _texts(
            endpoint, payload, response, clean_all if text_mode == "scrubbed" else None)
    if not isinstance(timestamp, pa.Array):
        timestamp = pa.array(timestamp, pa.float64())
    columns = {
        "request_id": request_id,
        # int(seconds * 1000): the same float product, truncated toward zero by the cast (one kernel, not a loop)
        "timestamp": pc.cast(pc.multiply(timestamp, 1000.0), pa.int64(),
                             safe=False).cast(_SCHEMA.field("timestamp").type),
        "route": route,
        "variant": variant,
        "endpoint": endpoint,
        "status": status,
        "stream": stream,
        "fallback": fallback,
        "latency_s": latency_s,
        "ttft_s": ttft_s,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": cost_usd,
        "reference_cost_usd": reference_cost_usd,
        "finish_reason": finish_reason,
        "prompt_text": prompt_text,
        "prompt_messages": prompt_messages,
        "response_text": response_column,
        "schema_version": pa.array([SCHEMA_VERSION] * count, pa.int32()),
        "role": role,
    }
    return pa.Table.from_arrays(
        [value if isinstance(value, pa.Array) else pa.array(value, field.type)
         for field, value in zip(_SCHEMA, (columns[name] for name in _SCHEMA.names))],
        schema=_SCHEMA)


def _answers(record_at: Callable[[int], RequestRecord], stream: Sequence[bool], status: Sequence[int],
             answer: Sequence[bytes | None]) -> tuple[list[str | None], list[str | None]]:
    """The (answer text, finish reason) columns: each record's as logrows.answer_of reads it."""
    def general(index: int) -> tuple[str | None, str | None]:
        return answer_of(record_at(index))

    if native is not None:  # reads what it can decide exactly, and asks general for the rest
        return native.read_answers(stream, status, answer, general)
    pairs = [general(index) for index in range(len(answer))]
    return [text for text, _ in pairs], [reason for _, reason in pairs]


def _texts(endpoint: Sequence[str], payload: Sequence[bytes], response: list[str | None],
           clean_all: CleanAll | None) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(prompt_text, prompt_messages, response_text) columns, every text cleaned in one ``clean_all`` call."""
    roles: list[str] = []
    contents: list[str] = []
    offsets = [0]  # of each record's turns in roles/contents
    no_turns: list[bool] = []  # the record has no turns (a null list): completions, or messages not a list
    prompts: dict[int, str | list[str]] = {}  # completions: record -> the prompt, or its parts

    def general(index: int) -> bool:
        """Appends request ``index``'s turns as logrows.prompt_of reads them (orjson); whether it has a list."""
        request = orjson.loads(payload[index])
        if endpoint[index] == CHAT_ENDPOINT:
            messages = request.get("messages")
            if not isinstance(messages, list):
                return False
            for message in messages:
                if isinstance(message, dict):
                    roles.append(str(message.get("role") or ""))
                    contents.append(_content_text(message.get("content")))
            return True
        given = request.get("prompt")
        if isinstance(given, str) or (isinstance(given, list) and all(isinstance(part, str) for part in given)):
            prompts[index] = given
        return False

    if native is not None:  # reads the chat requests it can decide exactly, and asks general for the rest
        native.read_turns(endpoint, payload, roles, contents, offsets, no_turns, general)
    else:
        for index in range(len(payload)):
            no_turns.append(not general(index))
            offsets.append(len(roles))

    if clean_all is not None:
        texts = dict.fromkeys(contents)
        for prompt in prompts.values():
            texts.update(dict.fromkeys([prompt] if isinstance(prompt, str) else prompt))
        texts.update(dict.fromkeys(text for text in response if text is not None))
        clean = clean_all(list(texts))
        contents = [clean[text] for text in contents]
        response = [None if text is None else clean[text] for text in response]
        prompts = {index: clean[prompt] if isinstance(prompt, str) else [clean[part] for part in prompt]
                   for index, prompt in prompts.items()}

    role_column = pa.array(roles, pa.string())
    content_column = pa.array(contents, pa.string())
    null_lists = pa.array(no_turns, pa.bool_())
    offset_column = pa.array(offsets, pa.int32())
    turns = pa.ListArray.from_arrays(offset_column, pa.StructArray.from_arrays(
        [role_column, content_column], fields=list(_TURN)), mask=null_lists)
    # flat_prompt: one "role: content" line per turn; completions: the prompt, its parts joined by lines.
    lines = pa.ListArray.from_arrays(offset_column, pc.binary_join_element_wise(role_column, content_column, ": "),
                                     mask=null_lists)
    prompt_text = pc.binary_join(lines, "\n")
    if prompts:
        completion_text: list[str | None] = [None] * len(payload)
        for index, prompt in prompts.items():
            completion_text[index] = prompt if isinstance(prompt, str) else "\n".join(prompt)
        prompt_text = pc.coalesce(prompt_text, pa.array(completion_text, pa.string()))
    return prompt_text, turns, pa.array(response, pa.string())

"""A batch of request records -> one Arrow table of the requests log, built column by column.

The conversion process's hot loop (service/requestlog/convert.py). The values are exactly those of
``pa.Table.from_pylist([request_row(r, mode) for r in records])`` (service/requestlog/rows.py is the
reference, record by record; tests/unit/test_log_fastpaths.py checks the two agree), without a
dict per row: the scalar fields go to Arrow as columns, each request and answer is read once
(in C, service/requestlog/_lognative.c, which leaves what it cannot decide exactly to the reference's orjson
path), every text of the batch is cleaned in one call (the scrubber), and the flat prompt text is
joined by Arrow kernels. The record's fields are taken by name (service.requestlog.records.columns_of).

Anything this cannot take raises; the caller then converts the batch record by record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from loragate.common.logschema import CHAT_ENDPOINT, REQUESTS, SCHEMA_VERSION, arrow_schema
from loragate.service.requestlog.records import RequestRecord, TextMode, as_record, columns_of
from loragate.service.requestlog.rows import _content_text, answer_of

try:  # the C reader, built by setup.py where a C compiler is; without it every record takes the orjson path
    from loragate.service.requestlog import _lognative
except ImportError:  # pragma: no cover - the tests require it built
    _lognative = None  # type: ignore[assignment]
native = _lognative
_SCHEMA = arrow_schema(REQUESTS)
_TURN = _SCHEMA.field("prompt_messages").type.value_type  # struct<role, content>

# Cleans a batch of distinct texts: text -> cleaned text (the scrubber), or None to keep them as they are.
CleanAll = Callable[[list[str]], dict[str, str]]


def requests_table(records: Sequence[tuple], text_mode: TextMode, clean_all: CleanAll | None) -> pa.Table:
    """The requests table of ``records``, each a RequestRecord's fields in its order (a RequestRecord, or the
    plain tuple a queued batch unmarshals to); ``clean_all`` is used in "scrubbed" mode only."""
    return _table(
        columns_of(RequestRecord, records), lambda index: as_record(RequestRecord, records[index]), text_mode, clean_all
    )


def _table(
    fields: Mapping[str, Sequence],
    record_at: Callable[[int], RequestRecord],
    text_mode: TextMode,
    clean_all: CleanAll | None,
) -> pa.Table:
    """The table of one column a RequestRecord field, by name; ``record_at(index)`` is the record, for the
    reference's reading of what the C readers leave to it."""
    payload, endpoint = fields["payload"], fields["endpoint"]
    count = len(payload)
    response, finish_reason = _answers(record_at, fields["stream"], fields["status"], fields["answer"])
    if text_mode == "none":
        prompt_text, response_column = pa.nulls(count, pa.string()), pa.nulls(count, pa.string())
        prompt_messages = pa.nulls(count, _SCHEMA.field("prompt_messages").type)
    else:
        prompt_text, prompt_messages, response_column = _texts(
            endpoint, payload, response, clean_all if text_mode == "scrubbed" else None
        )
    timestamp = pa.array(fields["timestamp"], pa.float64())
    # The record's fields the schema has under the same name go as they are (request_id, route, ... role).
    columns: dict[str, object] = {name: fields[name] for name in _SCHEMA.names if name in fields}
    columns.update(
        {
            # int(seconds * 1000): the same float product, truncated toward zero by the cast (one kernel, not a loop)
            "timestamp": pc.cast(pc.multiply(timestamp, 1000.0), pa.int64(), safe=False).cast(
                _SCHEMA.field("timestamp").type
            ),
            "finish_reason": finish_reason,
            "prompt_text": prompt_text,
            "prompt_messages": prompt_messages,
            "response_text": response_column,
            "schema_version": pa.array([SCHEMA_VERSION] * count, pa.int32()),
        }
    )
    return pa.Table.from_arrays(
        [
            value if isinstance(value, pa.Array) else pa.array(value, field.type)
            for field, value in zip(_SCHEMA, (columns[name] for name in _SCHEMA.names))
        ],
        schema=_SCHEMA,
    )


def _answers(
    record_at: Callable[[int], RequestRecord],
    stream: Sequence[bool],
    status: Sequence[int],
    answer: Sequence[bytes | None],
) -> tuple[list[str | None], list[str | None]]:
    """The (answer text, finish reason) columns: each record's as logrows.answer_of reads it."""

    def general(index: int) -> tuple[str | None, str | None]:
        return answer_of(record_at(index))

    if native is not None:  # reads what it can decide exactly, and asks general for the rest
        return native.read_answers(stream, status, answer, general)
    pairs = [general(index) for index in range(len(answer))]
    return [text for text, _ in pairs], [reason for _, reason in pairs]


def _texts(
    endpoint: Sequence[str], payload: Sequence[bytes], response: list[str | None], clean_all: CleanAll | None
) -> tuple[pa.Array, pa.Array, pa.Array]:
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
        prompts = {
            index: clean[prompt] if isinstance(prompt, str) else [clean[part] for part in prompt]
            for index, prompt in prompts.items()
        }

    role_column = pa.array(roles, pa.string())
    content_column = pa.array(contents, pa.string())
    null_lists = pa.array(no_turns, pa.bool_())
    offset_column = pa.array(offsets, pa.int32())
    turns = pa.ListArray.from_arrays(
        offset_column, pa.StructArray.from_arrays([role_column, content_column], fields=list(_TURN)), mask=null_lists
    )
    # flat_prompt: one "role: content" line per turn; completions: the prompt, its parts joined by lines.
    lines = pa.ListArray.from_arrays(
        offset_column, pc.binary_join_element_wise(role_column, content_column, ": "), mask=null_lists
    )
    prompt_text = pc.binary_join(lines, "\n")
    if prompts:
        completion_text: list[str | None] = [None] * len(payload)
        for index, prompt in prompts.items():
            completion_text[index] = prompt if isinstance(prompt, str) else "\n".join(prompt)
        prompt_text = pc.coalesce(prompt_text, pa.array(completion_text, pa.string()))
    return prompt_text, turns, pa.array(response, pa.string())

"""A batch of request records -> one Arrow table of the requests log, built column by column.

The conversion process's hot loop (service/requestlog.py). The values are exactly those of
``pa.Table.from_pylist([request_row(r, mode) for r in records])`` (service/logrows.py is the
reference, record by record; tests/unit/test_log_fastpaths.py checks the two agree), without a
dict per row: the scalar fields go to Arrow as columns, each request and answer is read once
(in C, service/_lognative.c, which leaves what it cannot decide exactly to the reference's orjson
path), every text of the batch is cleaned in one call (the scrubber), and the flat prompt text is
joined by Arrow kernels.

Anything this cannot take raises; the caller then converts the batch record by record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from loragate.common.logschema import CHAT_ENDPOINT, REQUESTS, SCHEMA_VERSION, arrow_schema
from loragate.service.logrows import RequestRecord, TextMode, _content_text, answer_of

try:  # the C reader, built by setup.py where a C compiler is; without it every record takes the orjson path
    from loragate.service import _lognative
except ImportError:  # pragma: no cover - the tests require it built
    _lognative = None  # type: ignore[assignment]
native = _lognative

_SCHEMA = arrow_schema(REQUESTS)
_TURN = _SCHEMA.field("prompt_messages").type.value_type  # struct<role, content>

# Cleans a batch of distinct texts: text -> cleaned text (the scrubber), or None to keep them as they are.
CleanAll = Callable[[list[str]], dict[str, str]]


def requests_table(records: Sequence[RequestRecord], text_mode: TextMode, clean_all: CleanAll | None) -> pa.Table:
    """The requests table of ``records`` (``clean_all`` is used in "scrubbed" mode only)."""
    count = len(records)
    (request_id, timestamp, route, variant, endpoint, status, stream, fallback, latency_s, ttft_s, prompt_tokens,
     completion_tokens, cost_usd, reference_cost_usd, payload, _answer, role) = zip(*records)
    answers = [((stream_answer(record.answer) if record.stream else
                 body_answer(record.answer) if record.status == 200 else None) if record.answer else None)
               or answer_of(record) for record in records]
    response = [text for text, _ in answers]
    if text_mode == "none":
        prompt_text, response_column = pa.nulls(count, pa.string()), pa.nulls(count, pa.string())
        prompt_messages = pa.nulls(count, _SCHEMA.field("prompt_messages").type)
    else:
        prompt_text, prompt_messages, response_column = _texts(
            endpoint, payload, response, clean_all if text_mode == "scrubbed" else None)
    columns = {
        "request_id": request_id,
        "timestamp": [int(seconds * 1000) for seconds in timestamp],
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
        "finish_reason": [reason for _, reason in answers],
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


def _texts(endpoint: Sequence[str], payload: Sequence[bytes], response: list[str | None],
           clean_all: CleanAll | None) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(prompt_text, prompt_messages, response_text) columns, every text cleaned in one ``clean_all`` call."""
    roles: list[str] = []
    contents: list[str] = []
    offsets = [0]  # of each record's turns in roles/contents
    no_turns: list[bool] = []  # the record has no turns (a null list): completions, or messages not a list
    prompts: list[str | list[str] | None] = []  # completions: the prompt, or its parts
    for kind, body in zip(endpoint, payload):
        prompt: str | list[str] | None = None
        if kind == CHAT_ENDPOINT and native is not None:
            has_turns = native.chat_turns(body, roles, contents)  # appends this request's roles and contents
            if has_turns is not None:
                no_turns.append(not has_turns)
                offsets.append(len(roles))
                prompts.append(None)
                continue
        request = orjson.loads(body)
        if kind == CHAT_ENDPOINT:
            messages = request.get("messages")
            if isinstance(messages, list):
                for message in messages:
                    if isinstance(message, dict):
                        roles.append(str(message.get("role") or ""))
                        contents.append(_content_text(message.get("content")))
            no_turns.append(not isinstance(messages, list))
        else:
            no_turns.append(True)
            given = request.get("prompt")
            if isinstance(given, str) or (isinstance(given, list) and all(isinstance(part, str) for part in given)):
                prompt = given
        offsets.append(len(roles))
        prompts.append(prompt)

    if clean_all is not None:
        texts = dict.fromkeys(contents)
        for prompt in prompts:
            if isinstance(prompt, str):
                texts[prompt] = None
            elif prompt is not None:
                texts.update(dict.fromkeys(prompt))
        texts.update(dict.fromkeys(text for text in response if text is not None))
        clean = clean_all(list(texts))
        contents = [clean[text] for text in contents]
        response = [None if text is None else clean[text] for text in response]
        prompts = [None if prompt is None else clean[prompt] if isinstance(prompt, str)
                   else [clean[part] for part in prompt] for prompt in prompts]

    role_column = pa.array(roles, pa.string())
    content_column = pa.array(contents, pa.string())
    null_lists = pa.array(no_turns, pa.bool_())
    offset_column = pa.array(offsets, pa.int32())
    turns = pa.ListArray.from_arrays(offset_column, pa.StructArray.from_arrays(
        [role_column, content_column], fields=list(_TURN)), mask=null_lists)
    # flat_prompt: one "role: content" line per turn; completions: the prompt, its parts joined by lines.
    lines = pa.ListArray.from_arrays(offset_column, pc.binary_join_element_wise(role_column, content_column, ": "),
                                     mask=null_lists)
    completion_text = [prompt if prompt is None or isinstance(prompt, str) else "\n".join(prompt)
                       for prompt in prompts]
    prompt_text = pc.coalesce(pc.binary_join(lines, "\n"), pa.array(completion_text, pa.string()))
    return prompt_text, turns, pa.array(response, pa.string())


# --- answers: (text, finish reason) of choice 0, or None where only logrows.answer_of can say ------------

def _undecided(data: bytes) -> None:
    return None


stream_answer = native.stream_answer if native is not None else _undecided
body_answer = native.body_answer if native is not None else _undecided

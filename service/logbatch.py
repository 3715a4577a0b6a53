"""A batch of request records -> one Arrow table of the requests log, built column by column.

The conversion process's hot loop (service/requestlog.py). The values are exactly those of
``pa.Table.from_pylist([request_row(r, mode) for r in records])`` (service/logrows.py is the
reference, record by record; tests/unit/test_log_fastpaths.py checks the two agree), without a
dict per row: the scalar fields go to Arrow as columns, each request and answer is parsed once
in Python (orjson), every text of the batch is cleaned in one call (the scrubber, with its
cache), and the flat prompt text is joined by Arrow kernels.

Anything this cannot take raises; the caller then converts the batch record by record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from loragate.common.logschema import CHAT_ENDPOINT, REQUESTS, SCHEMA_VERSION, arrow_schema
from loragate.service.logrows import RequestRecord, TextMode, _content_text, _simple_stream_parts, answer_of

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
        if kind == CHAT_ENDPOINT:
            typed = _chat_messages(body)
            if not isinstance(typed, _Untyped):
                for turn in typed or ():
                    roles.append(turn.role or "")
                    contents.append(turn.content or "")
                no_turns.append(typed is None)
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


# --- chat requests: the messages' roles and plain-text contents, decoded into typed structs -------

class _Message(msgspec.Struct, gc=False):
    role: str | None = None
    content: str | None = None  # content parts (a list) fall back to the general parse


class _ChatRequest(msgspec.Struct, gc=False):
    messages: list[_Message] | None = None


_CHAT_REQUEST = msgspec.json.Decoder(_ChatRequest)


class _Untyped:
    """_chat_messages: only the general parse can say."""


_UNTYPED = _Untyped()


def _chat_messages(body: bytes) -> list[_Message] | None | _Untyped:
    """A chat request's messages (None: no list of them), decoded skipping every other field; _UNTYPED when
    the types do not describe them exactly as _texts reads them (a message that is not an object, a role
    that is not a string, content parts) or the JSON is not valid UTF-8 (see stream_answer). The payload
    is the gateway's own orjson output, which the two decoders read alike."""
    if not (body.isascii() or _utf8(body)):
        return _UNTYPED
    try:
        return _CHAT_REQUEST.decode(body).messages
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _UNTYPED


# --- streamed answers: only the fields the log keeps, decoded into typed structs -------------------
# Untracked by the cyclic GC (gc=False: they hold strings, numbers and each other, never a cycle): 25% cheaper
# to decode.

class _Delta(msgspec.Struct, gc=False):
    content: str | None = None


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Event(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None


_EVENT = msgspec.json.Decoder(_Event)


def stream_answer(stream: bytes) -> tuple[str | None, str | None] | None:
    """logrows.answer_of's (text, finish reason) of a stream; None when only the general parse can say.

    Each event is decoded straight into the few typed fields the log keeps (msgspec skips the rest
    in C), about 3x cheaper than building every event as dicts. Whatever the types do not describe
    exactly as logrows reads it falls back (returns None): an event that is not one ``data: {...}``
    line, a null index or choice, a delta that is not an object, a text that is not a string, a
    finish reason that is not a string, JSON orjson would reject (invalid UTF-8 is the one case
    msgspec lets through in fields it skips that a real upstream could send, so the stream is checked
    for it first). Not checked, as no upstream writes it: a number beyond a double's range (``1e400``)
    in a field the log skips; orjson rejects its event, msgspec skips the number and keeps the text.
    """
    parts = _simple_stream_parts(stream)
    if parts is None or not (stream.isascii() or _utf8(stream)):
        return None
    pieces: list[str] = []
    finish_reason = None
    seen = False
    try:
        for part in parts:
            choices = _EVENT.decode(part).choices
            for choice in choices or ():
                if choice.index != 0:
                    continue
                seen = True
                text = choice.delta.content if choice.delta is not None else choice.text
                if text is not None:
                    pieces.append(text)
                if choice.finish_reason:
                    finish_reason = choice.finish_reason
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return ("".join(pieces) if seen else None), finish_reason


# --- whole answers (200, not streamed): choice 0's text and finish reason, typed like the stream events --

class _BodyChoice(msgspec.Struct, gc=False):
    message: _Message | None = None  # the chat request's message type: role and content
    text: str | None = None
    finish_reason: str | None = None


class _Body(msgspec.Struct, gc=False):
    choices: list[_BodyChoice]


_BODY = msgspec.json.Decoder(_Body)


def body_answer(body: bytes) -> tuple[str | None, str | None] | None:
    """logrows.answer_of's (text, finish reason) of a whole JSON answer; None when only the general parse can say.

    Decoded straight into the fields the log keeps, as stream_answer decodes events, and with the same
    fallbacks: whatever the types do not describe as logrows reads it (no ``choices`` list, a choice or
    message that is not an object, a text or finish reason that is not a string, content parts) or
    bytes that are not UTF-8. The one input it reads unlike orjson is stream_answer's (``1e400``).
    """
    if not (body.isascii() or _utf8(body)):
        return None
    try:
        choices = _BODY.decode(body).choices
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not choices:
        return None, None
    choice = choices[0]
    return (choice.message.content if choice.message is not None else choice.text), choice.finish_reason


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True

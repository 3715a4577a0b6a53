"""Request-log records -> table rows, record by record: the reference every fast path must equal.

The answer text parsed out, the text kept, scrubbed or dropped. The records are defined in
service.requestlog.records; the conversion runs on the writer side of the log, never on the request path.
The rows follow the shared schema, loragate.common.logschema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from loragate.common.logschema import CHAT_ENDPOINT, SCHEMA_VERSION, Turn, flat_prompt
from loragate.common import sse
from loragate.common.scrub import scrub
from loragate.service.requestlog.records import FeedbackRecord, RequestRecord, TextMode


def request_row(record: RequestRecord, text_mode: TextMode, scrubber: Callable[[str], str] = scrub) -> dict[str, Any]:
    """One row of the requests table: the answer parsed, the text kept, scrubbed or dropped.

    Prompts are scrubbed message by message: with a caching ``scrubber`` a system prompt
    or the earlier turns of a conversation, sent again with every request, cost once.
    """
    response_text, finish_reason = answer_of(record)
    if text_mode == "none":
        turns = prompt_text = response_text = None
    elif text_mode == "scrubbed":
        turns, prompt_text = prompt_of(orjson.loads(record.payload), record.endpoint, scrubber)
        response_text = None if response_text is None else scrubber(response_text)
    else:
        turns, prompt_text = prompt_of(orjson.loads(record.payload), record.endpoint)
    return {
        "request_id": record.request_id,
        "timestamp": int(record.timestamp * 1000),
        "route": record.route,
        "variant": record.variant,
        "endpoint": record.endpoint,
        "status": record.status,
        "stream": record.stream,
        "fallback": record.fallback,
        "latency_s": record.latency_s,
        "ttft_s": record.ttft_s,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_usd": record.cost_usd,
        "reference_cost_usd": record.reference_cost_usd,
        "finish_reason": finish_reason,
        "prompt_text": prompt_text,
        "prompt_messages": turns,
        "response_text": response_text,
        "schema_version": SCHEMA_VERSION,
        "role": record.role,
        "priority": record.priority,
    }


def answer_of(record: RequestRecord) -> tuple[str | None, str | None]:
    """(answer text, finish reason) of choice 0: from the SSE events of a stream, or a 200's JSON body."""
    if record.stream:
        return _stream_answer(record.answer) if record.answer else (None, None)
    if record.answer is not None and record.status == 200:
        return _body_answer(record.answer)
    return None, None


def feedback_row(record: FeedbackRecord, text_mode: TextMode, scrubber: Callable[[str], str] = scrub) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "timestamp": int(record.timestamp * 1000),
        "route": record.route,
        "variant": record.variant,
        "score": record.score,
        # The label is kept in "none" mode too (a short word from the client, not the conversation).
        "label": record.label if text_mode == "full" or record.label is None else scrubber(record.label),
        "correction": keep_text(record.correction, text_mode, scrubber),
        "schema_version": SCHEMA_VERSION,
    }


def keep_text(text: str | None, mode: TextMode, scrubber: Callable[[str], str] = scrub) -> str | None:
    if text is None or mode == "none":
        return None
    return text if mode == "full" else scrubber(text)


def prompt_of(payload: dict, endpoint: str, clean: Callable[[str], str] = str) -> tuple[list[Turn] | None, str | None]:
    """(chat turns, flat prompt text): the turns are what readers use, the text is for drift features.

    Chat: one ``{role, content}`` turn per message, and the text as ``flat_prompt`` writes it.
    Completions: no turns; the prompt (a list joined by lines). ``clean`` is applied to each
    message content / prompt string (the scrubber).
    """
    if endpoint == CHAT_ENDPOINT:
        messages = payload.get("messages")
        if not isinstance(messages, list):
            return None, None
        turns = [
            {"role": str(message.get("role") or ""), "content": clean(_content_text(message.get("content")))}
            for message in messages
            if isinstance(message, dict)
        ]
        return turns, flat_prompt(turns)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return None, clean(prompt)
    if isinstance(prompt, list) and all(isinstance(part, str) for part in prompt):
        return None, "\n".join(clean(part) for part in prompt)
    return None, None  # token ids: no text to keep


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _body_answer(body: bytes) -> tuple[str | None, str | None]:
    try:
        parsed = orjson.loads(body)
        choice = parsed["choices"][0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None, None
    if not isinstance(choice, dict):
        return None, None
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return (text if isinstance(text, str) else None), choice.get("finish_reason")


def _stream_answer(stream: bytes) -> tuple[str | None, str | None]:
    """Concatenate the deltas (chat) or texts (completions) of choice 0; its last finish_reason."""
    parts: list[str] = []
    finish_reason = None
    seen = False
    for parsed in sse.json_objects(stream):
        choices = parsed.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            seen = True
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str):
                parts.append(text)
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
    return ("".join(parts) if seen else None), finish_reason

"""Turning request-log records into table rows: the answer text parsed out, the text kept, scrubbed or dropped.

Runs on the writer side of the request log (service.requestlog), never on the request path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import orjson

from loragate.common.scrub import scrub

if TYPE_CHECKING:
    from loragate.service.requestlog import FeedbackRecord, RequestRecord

TextMode = Literal["full", "scrubbed", "none"]



def request_row(record: RequestRecord, text_mode: TextMode,
                scrubber: Callable[[str], str] = scrub) -> dict[str, Any]:
    """One row of the requests table: the answer parsed, the text kept, scrubbed or dropped.

    Prompts are scrubbed message by message: with a caching ``scrubber`` a system prompt
    or the earlier turns of a conversation, sent again with every request, cost once.
    """
    if record.chunks:
        response_text, finish_reason = _stream_answer(record.chunks)
    elif record.body is not None and record.status == 200:
        response_text, finish_reason = _body_answer(record.body)
    else:
        response_text, finish_reason = None, None
    if text_mode == "none":
        prompt_text = response_text = None
    elif text_mode == "scrubbed":
        prompt_text = prompt_of(record.payload, record.endpoint, scrubber)
        response_text = None if response_text is None else scrub(response_text)
    else:
        prompt_text = prompt_of(record.payload, record.endpoint)
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
        "response_text": response_text,
    }


def feedback_row(record: FeedbackRecord, text_mode: TextMode) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "timestamp": int(record.timestamp * 1000),
        "route": record.route,
        "variant": record.variant,
        "score": record.score,
        "label": record.label if text_mode == "full" or record.label is None else scrub(record.label),
        "correction": keep_text(record.correction, text_mode),
    }


def keep_text(text: str | None, mode: TextMode) -> str | None:
    if text is None or mode == "none":
        return None
    return text if mode == "full" else scrub(text)


def prompt_of(payload: dict, endpoint: str, clean: Callable[[str], str] = str) -> str | None:
    """Chat: one ``role: content`` line per message. Completions: the prompt (a list joined by lines).

    ``clean`` is applied to each message content / prompt string (the scrubber).
    """
    if endpoint == "chat/completions":
        messages = payload.get("messages")
        if not isinstance(messages, list):
            return None
        lines = []
        for message in messages:
            if isinstance(message, dict):
                lines.append(f"{message.get('role', '')}: {clean(_content_text(message.get('content')))}")
        return "\n".join(lines)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return clean(prompt)
    if isinstance(prompt, list) and all(isinstance(part, str) for part in prompt):
        return "\n".join(clean(part) for part in prompt)
    return None  # token ids: no text to keep


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(part["text"] for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
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


def _stream_answer(chunks: list[bytes]) -> tuple[str | None, str | None]:
    """Concatenate the deltas (chat) or texts (completions) of choice 0; its last finish_reason."""
    parts: list[str] = []
    finish_reason = None
    seen = False
    for event in b"".join(chunks).split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            choices = parsed.get("choices") if isinstance(parsed, dict) else None
            for choice in choices or ():
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

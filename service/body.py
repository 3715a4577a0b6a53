"""Reading a client's request: its id, the body within a size limit, a JSON object, a completion request
within its route's limits, with OpenAI-style errors."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import orjson
from starlette.requests import ClientDisconnect, Request

from loragate.common.catalog import Route
from loragate.service.errors import GatewayError

# What a request id may look like (x-request-id from clients, request_id in feedback).
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_of(headers: Mapping[str, str]) -> str:
    """The client's ``x-request-id`` when it is a well-formed one, else a new random id."""
    given = headers.get("x-request-id")
    return given if given and REQUEST_ID.match(given) else os.urandom(16).hex()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed ``limit`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise GatewayError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise GatewayError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise GatewayError(413, f"request body is larger than {limit} bytes", code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise GatewayError(400, "client disconnected while sending the request") from None
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc.msg}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
    return payload


def parse_completion(body: bytes, endpoint: str) -> dict:
    """A chat or text completion request: a JSON object with a ``model`` and ``messages`` or ``prompt``."""
    payload = parse_json_object(body)
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise GatewayError(400, "`model` is required and must be a string", code="missing_model", param="model")
    if endpoint == "chat/completions":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GatewayError(400, "`messages` must be a non-empty array", code="invalid_messages", param="messages")
    elif "prompt" not in payload:
        raise GatewayError(400, "`prompt` is required", code="missing_prompt", param="prompt")
    if "stream" in payload and not isinstance(payload["stream"], bool):
        raise GatewayError(400, "`stream` must be a boolean", code="invalid_stream", param="stream")
    return payload


def check_limits(route: Route, payload: dict) -> None:
    """``max_tokens``, ``max_completion_tokens`` and ``n`` within the route's limits (400 otherwise)."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GatewayError(400, f"`{name}` must be a positive integer", code="invalid_parameter", param=name)
        if route.limits.max_tokens is not None and value > route.limits.max_tokens:
            raise GatewayError(
                400,
                f"`{name}` may be at most {route.limits.max_tokens} on this route",
                code="invalid_parameter",
                param=name,
            )
    n = payload.get("n", 1)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= route.limits.max_n):
        raise GatewayError(
            400, f"`n` must be an integer from 1 to {route.limits.max_n}", code="invalid_parameter", param="n"
        )

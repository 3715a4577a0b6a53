"""Reading a request body within a size limit, and parsing it as a JSON object, with OpenAI-style errors."""

from __future__ import annotations

import re

import orjson
from starlette.requests import ClientDisconnect, Request

from loragate.service.errors import GatewayError

# What a request id may look like (x-request-id from clients, request_id in feedback).
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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

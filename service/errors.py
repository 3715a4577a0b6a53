"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

``error_response`` is the one conversion of a GatewayError into what the client gets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson
from starlette.responses import Response

log = logging.getLogger("loragate")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


class GatewayError(Exception):
    """An error the client should see as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})  # e.g. Retry-After on a 429


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": _TYPES.get(status, "error"), "param": param, "code": code}}
    )


def error_response(error: GatewayError, headers: Mapping[str, str] | None = None) -> Response:
    """The client's answer to ``error``: its status, body (all four fields) and headers, over ``headers``."""
    return Response(
        error_body(error.status, error.message, code=error.code, param=error.param),
        status_code=error.status,
        media_type="application/json",
        headers={**headers, **error.headers} if headers else error.headers,
    )


def internal_error_response(exc: BaseException) -> Response:
    """The one answer to an unexpected exception: logged with its traceback, a bare 500 to the client."""
    log.error("unhandled error", exc_info=exc)
    return error_response(GatewayError(500, "internal error in the gateway", code="internal_error"))

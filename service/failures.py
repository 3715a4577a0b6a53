"""Why an upstream could not answer: one bounded set of reasons.

The values are metric labels (``loragate_retries_total``, ``loragate_fallbacks_total``), the
``x-loragate-fallback`` header and the error ``code`` when nothing could answer: keep them stable.
"""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    CONNECT_ERROR = "connect_error"  # no connection: the replica is marked unhealthy
    DISCONNECTED = "disconnected"  # the connection broke (before or during the answer)
    TIMEOUT = "timeout"  # no answer / first token in time, or the request's total time ran out
    UPSTREAM_5XX = "upstream_5xx"
    UPSTREAM_429 = "upstream_429"
    UPSTREAM_ERROR = "upstream_error"  # any other client-side HTTP error
    ADAPTER_MISSING = "adapter_missing"  # 404 for an adapter: the replica no longer holds it
    STREAM_ERROR = "stream_error"  # a stream that ended or failed before its first token
    MALFORMED_RESPONSE = "malformed_response"  # a 200 whose body is not a JSON object
    ERROR_EVENT = "error_event"  # an error event in the middle of a stream
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
    CIRCUIT_OPEN = "circuit_open"
    ADAPTER_UNAVAILABLE = "adapter_unavailable"  # the adapter cannot be loaded anywhere
    NO_CANDIDATE = "no_candidate"  # nothing to try at all

    @property
    def retryable(self) -> bool:
        """Worth another replica of the same variant (the others move straight to the fallback chain)."""
        return self in _RETRYABLE

    @property
    def status(self) -> int:
        """The client's status when no target could answer for this reason."""
        return _STATUS.get(self, 502)

    @property
    def midstream(self) -> str:
        """The fallback label of a stream carried over after this failure (``midstream_<reason>``)."""
        return f"midstream_{self.value}"


_RETRYABLE = frozenset(
    {
        FailureReason.CONNECT_ERROR,
        FailureReason.DISCONNECTED,
        FailureReason.UPSTREAM_5XX,
        FailureReason.UPSTREAM_429,
        FailureReason.UPSTREAM_ERROR,
        FailureReason.STREAM_ERROR,
        FailureReason.MALFORMED_RESPONSE,
    }
)
_STATUS = {FailureReason.TIMEOUT: 504, FailureReason.NO_HEALTHY_UPSTREAM: 503, FailureReason.CIRCUIT_OPEN: 503}


class UpstreamFailure(Exception):
    """The upstream could not answer; nothing has been sent to the client yet, so another target may."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

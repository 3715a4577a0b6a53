"""POST /v1/feedback: a score, label or correction for an answered request.

Body: ``{"request_id": "...", "score": 0.8, "label": "good", "correction": "..."}``;
``request_id`` is the ``x-request-id`` the gateway returned, and at least one of
score, label, correction is required. The feedback is stored with the request
log (table ``feedback``) and counted in ``loragate_feedback_total{route,variant,label}``
and ``loragate_feedback_score{route,variant}``.

An id this process does not remember (served by another replica or worker, or
longer ago than the last ``feedback_recent_requests`` requests, of which it keeps
at least that many and at most twice as many) is still
accepted: it is stored with null route and variant (the request log has them:
join on request_id) and counted under route ``_unknown``, variant ``none``.
A 404 would make clients' feedback depend on which replica the load balancer
picked. Labels outside the allow-list count as ``other``; the stored label is
the one given. Without the request log (``LORAGATE_REQUEST_LOG_URL`` unset) the
endpoint answers 404: there is nowhere to keep the feedback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from loragate.service.body import REQUEST_ID, parse_json_object, read_body
from loragate.service.errors import GatewayError, error_response
from loragate.service.metrics import Metrics
from loragate.service.requestlog import FeedbackRecord, RequestLog

MAX_BODY_BYTES = 65_536
MAX_LABEL_CHARS = 64
MAX_CORRECTION_CHARS = 16_384
_FIELDS = ("request_id", "score", "label", "correction")


class RecentRequests:
    """request id -> (route, variant) of at least the last ``capacity`` requests this process answered.

    Filled by the request log (RequestLog(recent=...)) as each primary answer is logged; read here.
    Two plain dicts, the current one and the one before: when the current one holds ``capacity``
    ids it becomes the one before and the oldest ``capacity`` are dropped at once (so at most
    2 x ``capacity`` are held). An OrderedDict evicting one id per request cost twice as much.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._current: dict[str, tuple[str, str]] = {}
        self._before: dict[str, tuple[str, str]] = {}
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}

    def add(self, request_id: str, route: str, variant: str) -> None:
        pair = self._pairs.get((route, variant))  # one tuple per pair, not one per request for the GC to visit
        if pair is None:
            if len(self._pairs) > 4096:
                self._pairs.clear()
            pair = self._pairs[route, variant] = (route, variant)
        current = self._current
        current[request_id] = pair
        if len(current) >= self.capacity:
            self._before, self._current = current, {}

    def get(self, request_id: str) -> tuple[str, str] | None:
        served = self._current.get(request_id)
        return served if served is not None else self._before.get(request_id)

    def __len__(self) -> int:
        return len(self._current) + len(self._before)


def feedback_router(
    request_log: RequestLog | None,
    metrics: Metrics,
    labels: Iterable[str],
    authenticate: Callable[[Mapping[str, str]], object] | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["feedback"])
    allowed = frozenset(labels)

    @router.post("/feedback")
    async def feedback(request: Request) -> Response:
        try:
            if authenticate is not None:
                authenticate(request.headers)
            if request_log is None:
                raise GatewayError(
                    404,
                    "feedback is off: the request log is not configured (LORAGATE_REQUEST_LOG_URL)",
                    code="feedback_disabled",
                )
            body = _parse(await read_body(request, MAX_BODY_BYTES))
        except GatewayError as exc:
            return error_response(exc)
        served = request_log.recent.get(body["request_id"]) if request_log.recent is not None else None
        route, variant = served if served else (None, None)
        record = FeedbackRecord(
            request_id=body["request_id"],
            timestamp=time.time(),
            route=route,
            variant=variant,
            score=body.get("score"),
            label=body.get("label"),
            correction=body.get("correction"),
        )
        if not request_log.record_feedback(record):
            busy = GatewayError(
                503, "the request log is busy; retry shortly", code="request_log_busy", headers={"retry-after": "1"}
            )
            return error_response(busy)
        route_label, variant_label = route or "_unknown", variant or "none"
        label = record.label
        metrics.feedback.labels(
            route_label, variant_label, "none" if label is None else label if label in allowed else "other"
        ).inc()
        if record.score is not None:
            metrics.feedback_score.labels(route_label, variant_label).observe(record.score)
        return Response(
            orjson.dumps({"object": "feedback", "request_id": record.request_id, "route": route, "variant": variant}),
            media_type="application/json",
        )

    return router


def _parse(raw: bytes) -> dict:
    body = parse_json_object(raw)
    for name in body:
        if name not in _FIELDS:
            raise GatewayError(400, f"unrecognized request argument: {name}", code="unknown_parameter", param=name)
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not REQUEST_ID.match(request_id):
        raise GatewayError(
            400,
            "`request_id` is required: the x-request-id of the answer (1-128 of A-Za-z0-9._:-)",
            code="invalid_request_id",
            param="request_id",
        )
    score = body.get("score")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score)
    ):
        raise GatewayError(400, "`score` must be a finite number", code="invalid_score", param="score")
    label = body.get("label")
    if label is not None and (not isinstance(label, str) or not 1 <= len(label) <= MAX_LABEL_CHARS):
        raise GatewayError(
            400, f"`label` must be a string of 1-{MAX_LABEL_CHARS} characters", code="invalid_label", param="label"
        )
    correction = body.get("correction")
    if correction is not None and (not isinstance(correction, str) or len(correction) > MAX_CORRECTION_CHARS):
        raise GatewayError(
            400,
            f"`correction` must be a string of at most {MAX_CORRECTION_CHARS} characters",
            code="invalid_correction",
            param="correction",
        )
    if score is None and label is None and correction is None:
        raise GatewayError(400, "feedback needs at least one of `score`, `label`, `correction`", code="empty_feedback")
    return {
        "request_id": request_id,
        "score": None if score is None else float(score),
        "label": label,
        "correction": correction,
    }

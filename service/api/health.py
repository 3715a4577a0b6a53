"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import ORJSONResponse
from starlette.responses import Response

from loragate.service.metrics import CONTENT_TYPE, Metrics
from loragate.service.upstreams import Pool


def health_router(pool: Pool, metrics: Metrics) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> Response:
        return ORJSONResponse({"status": "ok"})

    @router.get("/readyz")
    async def readyz() -> Response:
        upstreams = {r.url: r.healthy for r in pool.replicas}
        ready = pool.any_healthy
        return ORJSONResponse(
            {"status": "ready" if ready else "not ready", "upstreams": upstreams}, status_code=200 if ready else 503
        )

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return router

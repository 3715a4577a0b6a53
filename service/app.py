"""create_app(settings): wires catalog, upstream pool, metrics and routers; the lifespan owns the I/O."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.api.health import health_router
from service.api.openai import openai_router
from service.catalog import CatalogError, CatalogFile
from service.errors import error_response
from service.gateway import Gateway
from service.metrics import Metrics
from service.settings import Settings
from service.upstreams import Pool

log = logging.getLogger("loragate")


def create_app(settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    catalog = CatalogFile(settings.routes_file)  # raises CatalogError: fail fast on a bad file
    pool = Pool(
        settings.upstreams,
        metrics,
        health_timeout_s=settings.health_timeout_s,
        adapter_failure_ttl_s=settings.adapter_failure_ttl_s,
    )
    gateway = Gateway(catalog, pool, metrics, max_body_bytes=settings.max_body_bytes)
    metrics.set_rollout_weights(catalog.current.routes)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=settings.total_timeout_s,
                sock_connect=settings.connect_timeout_s,
                sock_read=settings.first_byte_timeout_s,
            ),
            skip_auto_headers=("User-Agent",),
        )
        pool.bind(session)
        gateway.bind(session)
        await pool.check_all()
        tasks = [
            asyncio.create_task(_every(settings.health_interval_s, pool.check_all)),
            asyncio.create_task(_every(settings.routes_reload_interval_s, lambda: _reload(catalog, metrics))),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()

    app = FastAPI(title="loragate", version="0.1.0", lifespan=lifespan)
    app.state.pool = pool
    app.state.catalog = catalog
    app.state.metrics = metrics
    app.include_router(openai_router(gateway, catalog))
    app.include_router(health_router(pool, metrics))
    _install_error_handlers(app)
    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn (``--factory``): settings from LORAGATE_* environment variables."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return create_app(Settings())


async def _reload(catalog: CatalogFile, metrics: Metrics) -> None:
    try:
        changed = catalog.reload_if_changed()
    except CatalogError as exc:
        metrics.catalog_reloads.labels("error").inc()
        log.error("routes file rejected, keeping the last good catalog: %s", exc)
        return
    if changed:
        metrics.catalog_reloads.labels("success").inc()
        metrics.set_rollout_weights(catalog.current.routes)
        log.info("routes reloaded: %s", ", ".join(catalog.current.routes))


async def _every(interval: float, job) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await job()
        except Exception:  # a background job must never die silently
            log.exception("background job failed")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return error_response(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def unexpected_error(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal error in the gateway", code="internal_error")

"""create_app(settings): the served ASGI app; wires catalog, upstream pool, metrics and routers; the lifespan owns I/O.

What it returns is exactly what uvicorn serves (``app_from_env``) and what in-process tests call.
"""

from __future__ import annotations

import asyncio
import gc
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from loragate.service.adapterprobe import LoadProbe
from loragate.service.aiohttpedge import AiohttpControl
from loragate.service.api.admin import admin_router
from loragate.service.api.feedback import RecentRequests, feedback_router
from loragate.service.api.health import health_router
from loragate.service.api.openai import CompletionsFirst, openai_router
from loragate.service.auth import authenticator_from_settings
from loragate.common.catalog import CatalogError, CatalogFile, Timeouts
from loragate.service.errors import GatewayError, error_response, internal_error_response
from loragate.service.gateway import Gateway
from loragate.service.httpclient import HttpClient
from loragate.service.transport import Timeout
from loragate.service.budgets import RedisLedger, budgets_from_settings
from loragate.service.limits import RedisLimiter, limiter_from_settings
from loragate.service.metrics import Metrics
from loragate.service.requestlog import RequestLog, parquet_store
from loragate.service.settings import Settings
from loragate.service.priority import open_policy, shares_named
from loragate.service.proxy import HttpUpstream, Upstream
from loragate.service.tracing import tracer_from_env
from loragate.service.upstreams import Pool

log = logging.getLogger("loragate")


def create_app(
    settings: Settings, metrics: Metrics | None = None, *, upstream: Upstream | None = None
) -> CompletionsFirst:
    """The served app. ``upstream``: the call to the replicas (tests pass a scripted one); default HTTP.

    Extend its ``.app`` (the FastAPI app): routers, exception handlers, middleware; middleware added there
    runs for completions too (see CompletionsFirst)."""
    metrics = metrics or Metrics()
    catalog = CatalogFile(settings.routes_file)  # raises CatalogError: fail fast on a bad file
    tracer = tracer_from_env(os.environ)  # None unless OTEL_* asks for traces (README, Tracing)
    pool = Pool(
        settings.upstreams,
        metrics,
        health_timeout_s=settings.health_timeout_s,
        adapter_failure_ttl_s=settings.adapter_failure_ttl_s,
        max_in_flight=settings.max_in_flight_per_upstream,
        max_waiting=settings.max_waiting,
        max_wait_s=settings.max_wait_s,
        sheddable_max_wait_s=settings.sheddable_max_wait_s,
        priority_shares=shares_named(settings.priority_shares),
        circuit_failures=settings.circuit_failures,
        circuit_open_s=settings.circuit_open_s,
        max_adapters_per_replica=settings.max_adapters_per_replica or None,
        adapter_min_idle_s=settings.adapter_min_idle_s,
        tracer=tracer,  # adapter loads: a span under the attempt that waits
        adapter_probe=_load_probe(settings),
    )
    request_log = _request_log(settings, metrics)  # None when off: pyarrow is imported only when on
    # Per-key limits in this process, or shared through Redis (LORAGATE_LIMITS_URL); only used with auth on.
    limiter = limiter_from_settings(settings, metrics, shared=settings.auth)  # auth off: nothing to share
    budgets = budgets_from_settings(settings, metrics) if settings.auth else None  # spend budgets, same Redis
    # raises KeysError: fail fast on a bad keys file
    auth = authenticator_from_settings(settings, metrics, limiter, budgets)
    http_upstream = HttpUpstream()
    gateway = Gateway(
        catalog,
        pool,
        metrics,
        upstream or http_upstream,
        max_body_bytes=settings.max_body_bytes,
        timeouts=Timeouts(
            connect_s=settings.connect_timeout_s,
            first_token_s=settings.first_token_timeout_s,
            total_s=settings.total_timeout_s,
        ),
        max_attempts=settings.max_attempts,
        auth=auth,
        request_log=request_log,
        tracer=tracer,
        priorities=open_policy(settings.default_priority),  # auth off; keys carry their own (service/auth.py)
    )
    metrics.set_rollout_weights(catalog.current.routes)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=settings.total_timeout_s,
                sock_connect=settings.connect_timeout_s,
            ),
            skip_auto_headers=("User-Agent",),
        )
        pool.bind(AiohttpControl(session))  # health checks, scrapes, adapter loads
        # The request path to plain http:// replicas: the lean client (timeouts default as the session's).
        client = (
            HttpClient(Timeout(total=settings.total_timeout_s, connect=settings.connect_timeout_s))
            if settings.upstream_client == "lean"
            else None
        )
        http_upstream.bind(session, client)
        if request_log is not None:
            request_log.start()
        if isinstance(limiter, RedisLimiter):
            await limiter.start()
        await pool.start()  # raises DiscoveryError: a host name in LORAGATE_UPSTREAMS that does not resolve
        # Everything allocated so far (modules, app, catalog) lives as long as the process: keep it
        # out of the garbage collector's scans, which otherwise walk it on every full collection.
        gc.freeze()
        tasks = [
            asyncio.create_task(_every(settings.health_interval_s, pool.check_all)),
            asyncio.create_task(_every(settings.engine_scrape_interval_s, pool.scrape_all)),
            *(
                [asyncio.create_task(_every(settings.health_interval_s, limiter.probe))]
                if isinstance(limiter, RedisLimiter)
                else []
            ),
            asyncio.create_task(_every(settings.routes_reload_interval_s, lambda: _reload(catalog, metrics))),
            asyncio.create_task(_every(settings.routes_reload_interval_s, auth.refresh)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await gateway.shadows.close()  # shadow copies still running: cancelled (the clients have their answers)
            await session.close()
            if client is not None:
                await client.close()
            if isinstance(limiter, RedisLimiter):
                await limiter.close()
            if budgets is not None and isinstance(budgets.ledger, RedisLedger):
                await budgets.ledger.close()
            if request_log is not None:  # after the last request: write everything queued
                await asyncio.to_thread(request_log.close)
            if tracer is not None:  # export the spans still queued
                await asyncio.to_thread(tracer.shutdown)

    app = FastAPI(title="loragate", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway
    app.state.pool = pool
    app.state.catalog = catalog
    app.state.metrics = metrics
    app.state.request_log = request_log
    app.include_router(openai_router(gateway, catalog))
    app.include_router(health_router(pool, metrics))
    app.include_router(feedback_router(request_log, metrics, settings.feedback_labels, auth.authenticate))
    app.include_router(admin_router(auth, pool))
    _install_error_handlers(app)
    return CompletionsFirst(app, gateway)


def app_from_env() -> CompletionsFirst:
    """Factory for uvicorn (``--factory``): settings from LORAGATE_* environment variables."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return create_app(Settings())


def _load_probe(settings: Settings) -> LoadProbe | None:
    """The probe after each adapter load (service/adapterprobe.py), or None when LORAGATE_ADAPTER_PROBE is off."""
    if not settings.adapter_probe:
        return None
    return LoadProbe(
        prompts=settings.adapter_probe_prompts,
        max_tokens=settings.adapter_probe_max_tokens,
        tolerance=settings.adapter_probe_tolerance,
        timeout_s=settings.adapter_probe_timeout_s,
    )


def _request_log(settings: Settings, metrics: Metrics) -> RequestLog | None:
    if not settings.request_log_url:
        return None
    store = functools.partial(
        parquet_store,
        settings.request_log_url,
        writer_id=settings.request_log_writer_id,
        s3_endpoint=settings.request_log_s3_endpoint,
        s3_region=settings.request_log_s3_region,
    )
    log.info(
        "request log on: %s (text %s, converted in a %s)",
        settings.request_log_url,
        settings.request_log_text,
        settings.request_log_convert,
    )
    # process: the store is built in the conversion process; thread: here, now (a bad URL fails fast)
    return RequestLog(
        store,
        metrics,
        convert=settings.request_log_convert,
        text_mode=settings.request_log_text,
        flush_interval_s=settings.request_log_flush_interval_s,
        batch_size=settings.request_log_batch_size,
        queue_size=settings.request_log_queue_size,
        recent=RecentRequests(settings.feedback_recent_requests),
        stall_floor_s=settings.request_log_stall_floor_s,
        close_timeout_s=settings.request_log_close_timeout_s,
    )


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


async def _every(interval: float, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await job()
        except Exception:  # a background job must never die silently
            log.exception("background job failed")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(GatewayError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return error_response(GatewayError(400, f"invalid request: {exc.errors()[:3]}"))

    @app.exception_handler(Exception)
    async def unexpected_error(_request: Request, exc: Exception) -> Response:
        return internal_error_response(exc)  # the front's 500 answer too

"""The OpenAI-compatible endpoints. Thin: the work is in service.gateway."""

from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import ORJSONResponse
from starlette.responses import Response
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send

from loragate.common.catalog import CatalogFile
from loragate.service.errors import GatewayError, error_response, internal_error_response
from loragate.service.gateway import Gateway

COMPLETION_PATHS = {"/v1/chat/completions": "chat/completions", "/v1/completions": "completions"}


def openai_router(gateway: Gateway, catalog: CatalogFile) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])
    created = int(time.time())

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.handle(request, COMPLETION_PATHS["/v1/chat/completions"])

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        return await gateway.handle(request, COMPLETION_PATHS["/v1/completions"])

    @router.get("/models")
    async def models(request: Request) -> Response:
        try:
            principal = gateway.auth.authenticate(request.headers)
        except GatewayError as exc:
            return error_response(exc)
        data = []
        for route in catalog.current.routes.values():
            if not principal.allows(route.name):
                continue  # a key sees only the models it may call
            data.append({"id": route.name, "object": "model", "created": created, "owned_by": "loragate"})
            if route.allow_pin:
                data.extend(
                    {
                        "id": f"{route.name}:{v.name}",
                        "object": "model",
                        "created": created,
                        "owned_by": "loragate",
                        "parent": route.name,
                    }
                    for v in route.variants
                )
        return ORJSONResponse({"object": "list", "data": data})

    return router


class CompletionsFirst:
    """The served ASGI app (what ``create_app`` returns): POSTs to the two completion paths go straight
    to the gateway, everything else (lifespan included) to the FastAPI app.

    Same handler as the FastAPI routes above (which stay for the OpenAPI schema), minus FastAPI's
    routing and dependency machinery: about 60 us a request, measured by bench/overhead.py.

    The FastAPI app (``.app``) is the one to extend. Once middleware is added to it (``add_middleware``,
    ``@app.middleware("http")``), completions go through it as well, so the middleware runs for every
    request; without any, the shortcut costs one list check (bench/middleware_overhead.py).
    """

    def __init__(self, app: FastAPI, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    @property
    def state(self) -> State:
        """The FastAPI app's state (gateway, pool, catalog, metrics, request_log)."""
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = COMPLETION_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST" or self.app.user_middleware:
            await self.app(scope, receive, send)
            return
        try:
            response = await self.gateway.handle(Request(scope, receive), endpoint)
        except Exception as exc:
            response = internal_error_response(exc)  # the FastAPI app's 500 handler too
        await response(scope, receive, send)

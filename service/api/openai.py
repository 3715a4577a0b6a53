"""The OpenAI-compatible endpoints. Thin: the work is in service.gateway."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

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
                    {"id": f"{route.name}:{v.name}", "object": "model", "created": created,
                     "owned_by": "loragate", "parent": route.name}
                    for v in route.variants
                )
        return ORJSONResponse({"object": "list", "data": data})

    return router


class CompletionsFirst:
    """ASGI front for the served app: POSTs to the two completion paths go straight to the gateway.

    Same handler as the FastAPI routes above (which stay for the OpenAPI schema and tests), minus
    FastAPI's routing and dependency machinery: about 60 us a request, measured by bench/overhead.py.
    Everything else, lifespan included, goes to the FastAPI app.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = COMPLETION_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await self.gateway.handle(Request(scope, receive), endpoint)
        except Exception as exc:
            response = internal_error_response(exc)
        await response(scope, receive, send)

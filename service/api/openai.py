"""The OpenAI-compatible endpoints. Thin: the work is in service.gateway."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse
from starlette.responses import Response

from service.catalog import CatalogFile
from service.errors import GatewayError, error_response
from service.gateway import Gateway


def openai_router(gateway: Gateway, catalog: CatalogFile) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])
    created = int(time.time())

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.handle(request, "chat/completions")

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        return await gateway.handle(request, "completions")

    @router.get("/models")
    async def models(request: Request) -> Response:
        try:
            principal = gateway.auth.authenticate(request.headers)
        except GatewayError as exc:
            return error_response(exc.status, exc.message, code=exc.code, headers=exc.headers)
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

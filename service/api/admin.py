"""Admin endpoints, behind the admin token (``Authorization: Bearer $LORAGATE_ADMIN_TOKEN``).

Read-only views of the gateway's state: the API keys (never their hashes) and the upstream replicas
(health, adapters, each engine's scraped state and what falls back to the gateway's own counts).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse
from starlette.responses import Response

from loragate.service.auth import Authenticator
from loragate.service.errors import GatewayError, error_response
from loragate.service.upstreams import Pool


def admin_router(auth: Authenticator, pool: Pool) -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"])

    def refused(request: Request) -> Response | None:
        try:
            auth.authorize_admin(request.headers)
        except GatewayError as exc:
            return error_response(exc)
        return None

    @router.get("/keys")
    async def keys(request: Request) -> Response:
        if (error := refused(request)) is not None:
            return error
        return ORJSONResponse({"auth": auth.enabled, "keys": [key.public() for key in auth.keys()]})

    @router.get("/upstreams")
    async def upstreams(request: Request) -> Response:
        if (error := refused(request)) is not None:
            return error
        return ORJSONResponse({"upstreams": pool.view()})

    @router.get("/circuits")
    async def circuits(request: Request) -> Response:
        if (error := refused(request)) is not None:
            return error
        return ORJSONResponse({"circuits": pool.circuits()})

    return router

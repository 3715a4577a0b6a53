"""What the STUB servers (tests/stub_upstream.py, tests/stub_engine.py) answer alike, as vLLM does: /health,
/v1/models (the base model, then each loaded adapter) and a second load of one adapter; and the routes they share.
Not vLLM."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def application(*, models: Handler, stats: Handler, load: Handler, complete: Handler) -> web.Application:
    """The routes both stubs serve: /health, /v1/models, /stub/stats, the adapter load, chat and text completions."""
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stub/stats", stats)
    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/v1/completions", complete)
    return app


async def health(_request: web.Request) -> web.Response:
    return web.Response(text="")


def models(adapters: Mapping[str, str | None], base_root: str | None = None) -> web.Response:
    """/v1/models: ``base``, then the adapters by name, each with its ``root`` (the path it came from) where known."""

    def model(name: str, parent: str | None, root: str | None) -> dict[str, str | None]:
        entry = {"id": name, "object": "model", "parent": parent}
        if root is not None:
            entry["root"] = root
        return entry

    data = [model("base", None, base_root)] + [model(name, "base", root) for name, root in sorted(adapters.items())]
    return web.json_response({"object": "list", "data": data})


def already_loaded() -> web.Response:
    """vLLM's answer to a load of an adapter it holds."""
    return web.json_response({"error": {"message": "has already been loaded", "code": 400}}, status=400)

"""The monitor's one Prometheus HTTP API client (aiohttp) and its one label escaper.

Instant and range queries; a query Prometheus refuses (or an answer that is not a success)
raises ``PrometheusError``; connection failures stay aiohttp's (``OSError`` subclasses).
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator


class PrometheusError(RuntimeError):
    """Prometheus answered, but not with a result (bad query, timeout inside Prometheus, ...)."""


def label(value: str) -> str:
    """``value`` escaped for a double-quoted PromQL label matcher."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def selector(labels: dict[str, str | None], *extra: str) -> str:
    """``{name="value",...}`` from ``labels`` (None values left out) and raw ``extra`` matchers."""
    parts = [f'{name}="{label(value)}"' for name, value in labels.items() if value is not None]
    return "{" + ",".join([*parts, *(e for e in extra if e)]) + "}"


Series = list[tuple[dict[str, str], list[tuple[float, float]]]]


class Prometheus:
    """Queries over Prometheus' HTTP API; nothing blocks the event loop.

    Each call opens its own session unless one from ``session()`` is passed (several queries at once).
    """

    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            yield session

    async def _get(self, path: str, params: dict[str, str], session: Any) -> Any:
        if session is None:
            async with self.session() as own:
                return await self._get(path, params, own)
        async with session.get(f"{self.url}{path}", params=params) as resp:
            body = await resp.json(content_type=None)
        if not isinstance(body, dict) or body.get("status") != "success":
            found = body if isinstance(body, dict) else {}
            raise PrometheusError(
                f"prometheus: {found.get('errorType')}: {found.get('error')} (query {params['query']})"
            )
        return body["data"]["result"]

    async def query(self, expr: str, *, session: Any = None) -> list[dict[str, Any]]:
        """An instant query: the result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        return await self._get("/api/v1/query", {"query": expr}, session)

    async def value(self, expr: str, *, session: Any = None) -> float | None:
        """The first sample of an instant query; None when empty or not finite (NaN from 0/0)."""
        result = await self.query(expr, session=session)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) else None

    async def query_range(
        self, expr: str, start: float, end: float, step_s: float = 60.0, *, session: Any = None
    ) -> Series:
        """A range query from ``start`` to ``end`` (unix seconds): ``[(labels, [(t, v), ...]), ...]``."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
        result = await self._get("/api/v1/query_range", params, session)
        return [(item["metric"], [(float(t), float(v)) for t, v in item["values"]]) for item in result]

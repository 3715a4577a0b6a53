"""An aiohttp answer's body, whole and capped: ``content.read(n)`` returns only what has arrived so far (a body
in two TCP segments reads as its first half), ``read()`` has no cap. The gateway's transport edge
(service/aiohttpedge.py) and the monitor's adapter probe (monitoring/probe.py) read bodies here."""

from __future__ import annotations

from typing import Any


class BodyTooLarge(ValueError):
    """The body is over the cap (declared so, or read so); the connection was closed, never reused."""


async def read_capped(response: Any, max_bytes: int) -> bytes:
    """The body of an aiohttp ``ClientResponse`` to its end; BodyTooLarge as soon as it is over ``max_bytes``
    (reading stops at the first chunk past it, so at most one chunk more than the cap is held)."""
    declared = response.content_length or 0
    chunks: list[bytes] = []
    read = 0
    while declared <= max_bytes and read <= max_bytes:
        chunk = await response.content.readany()
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        read += len(chunk)
    response.close()
    raise BodyTooLarge(f"{response.method} {response.url}: a body over {max_bytes} bytes")

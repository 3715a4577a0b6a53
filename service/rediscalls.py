"""How the gateway calls Redis (service/resp.py's client) for its limits and budgets: what "no answer" looks like,
Lua scripts called by their SHA1, and commands sent without waiting for the answer.

service/limits.py and service/budgets.py use these; each decides on its own what to do when Redis is down.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

from loragate.service.resp import RedisReplyError, RedisUnavailable, RespClient, encode

# What "no answer from Redis" looks like: refused, reset, timed out, an error reply (LOADING, OOM, ...).
REDIS_ERRORS = (RedisUnavailable, RedisReplyError, OSError, asyncio.TimeoutError)


class LuaScript:
    """One Lua script: ``evalsha`` sends its SHA1 (Redis's script cache), ``eval`` the script itself."""

    __slots__ = ("source", "sha")

    def __init__(self, source: bytes) -> None:
        self.source = source
        self.sha = hashlib.sha1(source).hexdigest().encode()

    def evalsha(self, keys: int, *arguments: bytes) -> bytes:
        return encode(b"EVALSHA", self.sha, b"%d" % keys, *arguments)

    def eval(self, keys: int, *arguments: bytes) -> bytes:
        return encode(b"EVAL", self.source, b"%d" % keys, *arguments)

    async def call(self, client: RespClient, keys: int, *arguments: bytes) -> object:
        """EVALSHA; on NOSCRIPT (a restarted Redis lost its script cache) EVAL, which caches it again.
        Raises REDIS_ERRORS (an error reply too)."""
        reply = await client.request(self.evalsha(keys, *arguments))
        if isinstance(reply, RedisReplyError):
            if not str(reply).startswith("NOSCRIPT"):
                raise reply
            reply = await client.execute(self.eval(keys, *arguments))
        return reply


class Unawaited:
    """Commands sent without a task or a waiting coroutine; each answer (or failure) goes to its callback.

    Kept until answered, so ``flush`` can wait for every command sent so far (at shutdown, in tests).
    """

    def __init__(self, client: RespClient) -> None:
        self.client = client
        self._pending: set[asyncio.Future] = set()

    def send(self, command: bytes, answered: Callable[[asyncio.Future], None]) -> None:
        future = asyncio.ensure_future(self.client.request(command))  # the reply's future itself when connected
        self._pending.add(future)

        def done(future: asyncio.Future) -> None:
            self._pending.discard(future)
            answered(future)
        future.add_done_callback(done)

    async def flush(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

"""How the gateway calls Redis (service/resp.py's client) for its limits and budgets: what "no answer" looks like,
Lua scripts called by their SHA1, and commands sent without waiting for the answer.

service/limits.py and service/budgets.py use these; each decides on its own what to do when Redis is down.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable

from loragate.service.resp import RedisReplyError, RedisUnavailable, RespClient, encode

# What "no answer from Redis" looks like: refused, reset, timed out, an error reply (LOADING, OOM, ...).
REDIS_ERRORS = (RedisUnavailable, RedisReplyError, OSError, asyncio.TimeoutError)


class LuaScript:
    """One Lua script: ``evalsha(numkeys, *keys_and_args)`` is the command that sends its SHA1 (Redis's script
    cache), ``eval(...)`` the one that sends the script itself; both take RESP's bytes (``b"1"``) and are partials
    of service/resp.py's ``encode``, so building one costs what ``encode`` does.

    A restarted Redis has lost its script cache: an EVALSHA then answers NOSCRIPT (``lost``), and EVAL, which
    caches the script again, is sent instead (``reload``).
    """

    __slots__ = ("source", "sha", "evalsha", "eval")

    def __init__(self, source: bytes) -> None:
        self.source = source
        self.sha = hashlib.sha1(source).hexdigest().encode()
        self.evalsha: Callable[..., bytes] = functools.partial(encode, b"EVALSHA", self.sha)
        self.eval: Callable[..., bytes] = functools.partial(encode, b"EVAL", source)

    @staticmethod
    def lost(reply: object) -> bool:
        """Whether ``reply`` is NOSCRIPT: Redis does not hold the script."""
        return isinstance(reply, RedisReplyError) and str(reply).startswith("NOSCRIPT")

    async def reload(self, client: RespClient, error: RedisReplyError, *arguments: bytes) -> object:
        """After an EVALSHA of ``arguments`` answered ``error``: EVAL where it was NOSCRIPT, else ``error`` raised."""
        if not self.lost(error):
            raise error
        return await client.execute(self.eval(*arguments))


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

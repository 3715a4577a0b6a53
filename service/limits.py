"""Per-key request and token limits, behind one interface: in this process, or shared through Redis.

Each limited key has up to two token buckets (``requests_per_minute``, ``tokens_per_minute``) that
refill continuously: a bucket holds at most one minute's allowance and a request is admitted while
every bucket holds at least 1. Admission takes one request; the answer's tokens are charged
afterwards with the real usage, so a large answer can leave the bucket in debt and the next request
waits until it is paid back (the wait is the ``Retry-After``).

- ``LocalLimiter``: the buckets live in the process. With several workers or pods each one
  enforces the limits on its own share of the traffic.
- ``RedisLimiter`` (``LORAGATE_LIMITS_URL=redis://...``): the same buckets in Redis, shared by every
  gateway process, over service/resp.py. One atomic round trip per admission (a Lua script on
  Redis's clock), one per charge (sent after the answer, not awaited by the request). Keys without
  limits never reach Redis.
  When Redis cannot be reached it serves on its own LocalLimiter (fail open, the default) or refuses
  with 503 (``LORAGATE_LIMITS_FAIL_CLOSED=true``); each change of state is one log line and moves
  ``loragate_limits_backend``; ``probe`` (run every health interval) brings it back to Redis.

``admit`` answers None (admitted), a ``Refusal``, or, for a Redis round trip, an awaitable of one of
these: the in-process path creates no coroutine at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, cast

from loragate.service.metrics import Metrics
from loragate.service.rediscalls import REDIS_ERRORS, LuaScript, Unawaited
from loragate.service.resp import RedisReplyError, RedisUnavailable, RespClient
from loragate.service.settings import Settings

log = logging.getLogger("loragate.limits")

# Values of loragate_limits_backend{backend}: where the limits of a process are enforced now.
BACKENDS = (
    "in_process",  # no LORAGATE_LIMITS_URL: buckets in this process
    "redis",  # shared buckets in Redis
    "fallback",  # Redis unreachable, fail open: buckets in this process until it is back
    "refusing",  # Redis unreachable, fail closed: limited keys get 503 until it is back
)
REDIS_PREFIX = "loragate:limits:"


class Refusal(NamedTuple):
    reason: str  # "request_rate", "token_rate" or "limiter_unavailable"
    wait_s: float  # seconds until a retry can succeed


Outcome = Refusal | None


class LimitedKey(Protocol):
    """What a limiter needs of an API key (service.apikeys.ApiKey, a frozen model: read-only)."""

    @property
    def id(self) -> str: ...
    @property
    def requests_per_minute(self) -> int | None: ...
    @property
    def tokens_per_minute(self) -> int | None: ...


class Limiter(Protocol):
    backend: str

    def admit(self, key: LimitedKey) -> Outcome | Awaitable[Outcome]: ...

    def charge(self, key: LimitedKey, tokens: int) -> None: ...

    def forget(self, live_ids: Iterable[str]) -> None: ...


# --- in this process ----------------------------------------------------------------------


@dataclass(slots=True)
class Bucket:
    """Holds up to ``per_minute``, refilled at ``per_minute / 60`` a second; may go into debt."""

    per_minute: int
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(float(self.per_minute), self.level + (now - self.updated) * self.per_minute / 60.0)
        self.updated = now

    def wait_s(self, now: float) -> float:
        """Seconds until at least 1 is available (0: available now)."""
        self.refill(now)
        return 0.0 if self.level >= 1 else (1 - self.level) * 60.0 / self.per_minute

    def resize(self, per_minute: int, now: float) -> None:
        self.refill(now)
        self.per_minute = per_minute
        self.level = min(self.level, float(per_minute))


def _bucket(per_minute: int | None, old: Bucket | None, now: float) -> Bucket | None:
    if per_minute is None:
        return None
    if old is None:
        return Bucket(per_minute, float(per_minute), now)
    if old.per_minute != per_minute:
        old.resize(per_minute, now)  # a reloaded keys file changed the limit: no reset
    return old


class LocalLimiter:
    backend = "in_process"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[Bucket | None, Bucket | None]] = {}

    def _of(self, key: LimitedKey, now: float) -> tuple[Bucket | None, Bucket | None]:
        old = self._buckets.get(key.id)
        buckets = (
            _bucket(key.requests_per_minute, old[0] if old else None, now),
            _bucket(key.tokens_per_minute, old[1] if old else None, now),
        )
        if buckets != old:
            self._buckets[key.id] = buckets
        return buckets

    def admit(self, key: LimitedKey) -> Outcome:
        now = self.clock()
        requests, tokens = self._of(key, now)
        wait, reason = 0.0, ""
        if requests is not None:
            wait, reason = requests.wait_s(now), "request_rate"
        if tokens is not None and (token_wait := tokens.wait_s(now)) > wait:
            wait, reason = token_wait, "token_rate"
        if wait > 0:
            return Refusal(reason, wait)
        if requests is not None:
            requests.level -= 1
        return None

    def charge(self, key: LimitedKey, tokens: int) -> None:
        if key.tokens_per_minute is None or tokens <= 0:
            return
        now = self.clock()
        bucket = self._of(key, now)[1]
        assert bucket is not None
        bucket.refill(now)
        bucket.level -= tokens

    def forget(self, live_ids: Iterable[str]) -> None:
        """Drop the buckets of keys no longer in the keys file."""
        live = set(live_ids)
        for key_id in [k for k in self._buckets if k not in live]:
            del self._buckets[key_id]


# --- shared through Redis -----------------------------------------------------------------

# The same buckets as Bucket, on Redis's clock. KEYS[1]: the key's hash. ARGV: requests per minute,
# tokens per minute (0: no such limit), tokens to charge (0: an admission). Returns {reason, wait_ms}:
# reason 0 admitted (or charged), 1 over requests per minute, 2 over tokens per minute.
LUA_BUCKETS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local rpm, tpm, charge = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local saved = redis.call('HMGET', KEYS[1], 'r', 'rs', 't', 'ts')
local function level(cap, value, stamp)
  if cap <= 0 then return nil end
  value = tonumber(value)
  if value == nil then return cap end
  return math.min(cap, value + (now - tonumber(stamp)) * cap / 60)
end
local r, t = level(rpm, saved[1], saved[2]), level(tpm, saved[3], saved[4])
if charge > 0 then
  if t == nil then return {0, 0} end
  t = t - charge
else
  local wait, reason = 0, 0
  if r ~= nil and r < 1 then wait, reason = (1 - r) * 60 / rpm, 1 end
  if t ~= nil and t < 1 and (1 - t) * 60 / tpm > wait then wait, reason = (1 - t) * 60 / tpm, 2 end
  if reason ~= 0 then return {reason, math.ceil(wait * 1000)} end
  if r ~= nil then r = r - 1 end
end
-- Kept until every bucket would be full again; after that a missing hash means the same thing.
local ttl = 1
if r ~= nil then
  redis.call('HSET', KEYS[1], 'r', r, 'rs', now)
  ttl = math.max(ttl, (rpm - r) * 60 / rpm)
end
if t ~= nil then
  redis.call('HSET', KEYS[1], 't', t, 'ts', now)
  ttl = math.max(ttl, (tpm - t) * 60 / tpm)
end
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 1000)
return {0, 0}
"""
_REASONS = {1: "request_rate", 2: "token_rate"}


def redis_key(key_id: str, prefix: str = REDIS_PREFIX) -> str:
    """The Redis key of a key id's buckets: a hash, so no character of the id can break it."""
    return prefix + hashlib.sha256(key_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class RedisLimiter:
    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        fallback: LocalLimiter | None = None,
        fail_closed: bool = False,
        retry_after_s: float = 5.0,
        timeout_s: float = 0.5,
        password: str | None = None,
        prefix: str = REDIS_PREFIX,
    ) -> None:
        self.client = RespClient(url, timeout_s, password)
        self._script = LuaScript(LUA_BUCKETS.encode())
        self.fallback = fallback or LocalLimiter()
        self.fail_closed = fail_closed
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.prefix = prefix
        self._keys: dict[str, bytes] = {}
        self._unawaited = Unawaited(self.client)
        self._duration = metrics.limits_redis_duration
        self.backend = ""
        self._set_backend("redis", None)

    @property
    def _sha(self) -> bytes:
        """The buckets script's SHA1, as Redis's script cache knows it."""
        return self._script.sha

    # --- state ------------------------------------------------------------------------

    def _set_backend(self, backend: str, cause: BaseException | None) -> None:
        if backend == self.backend:
            return
        gauge = self.metrics.limits_backend
        for name in BACKENDS:
            gauge.labels(name).set(1 if name == backend else 0)
        if self.backend:  # not the first state
            self.metrics.limits_backend_changes.labels(backend).inc()
            if backend == "redis":
                log.warning("limits: Redis is reachable again; limits are shared again")
            else:
                log.error(
                    "limits: Redis unreachable (%s: %s); %s until it is back",
                    type(cause).__name__,
                    cause,
                    "refusing limited keys with 503"
                    if backend == "refusing"
                    else "enforcing limits in this process only",
                )
        self.backend = backend

    def _went_down(self, cause: BaseException) -> None:
        if self.backend == "redis":
            self._set_backend("refusing" if self.fail_closed else "fallback", cause)

    async def probe(self) -> None:
        """While Redis is unreachable: one PING (the health job calls this every interval)."""
        if self.backend == "redis":
            return
        try:
            await self.client.call("PING")
        except REDIS_ERRORS as exc:
            log.debug("limits: Redis still unreachable: %s", exc)
            return
        self._set_backend("redis", None)

    async def start(self) -> None:
        """A first PING so an unreachable Redis shows from the start (the gateway serves anyway)."""
        try:
            await self.client.call("PING")
        except REDIS_ERRORS as exc:
            self._went_down(exc)

    async def flush(self) -> None:
        """Wait for the charges sent so far."""
        await self._unawaited.flush()

    async def close(self) -> None:
        await self.flush()
        await self.client.close()

    # --- the interface ------------------------------------------------------------------

    def _key(self, key_id: str) -> bytes:
        found = self._keys.get(key_id)
        if found is None:
            found = self._keys[key_id] = redis_key(key_id, self.prefix).encode()
        return found

    def _args(self, key: LimitedKey, charge: int) -> tuple[bytes, ...]:
        return (
            self._key(key.id),
            b"%d" % (key.requests_per_minute or 0),
            b"%d" % (key.tokens_per_minute or 0),
            b"%d" % charge,
        )

    def _down(self, key: LimitedKey) -> Outcome:
        if self.backend == "refusing":
            return Refusal("limiter_unavailable", self.retry_after_s)
        return self.fallback.admit(key)

    def admit(self, key: LimitedKey) -> Outcome | Awaitable[Outcome]:
        if self.backend != "redis":
            return self._down(key)
        return self._admit(key)

    async def _admit(self, key: LimitedKey) -> Outcome:
        started = time.perf_counter()
        try:
            reply = await self.client.request(self._script.evalsha(b"1", *self._args(key, 0)))
            if isinstance(reply, RedisReplyError):
                reply = await self._script.reload(self.client, reply, b"1", *self._args(key, 0))
        except REDIS_ERRORS as exc:
            self._went_down(exc)
            return self._down(key)
        self._duration.observe(time.perf_counter() - started)
        reason, wait_ms = cast(list, reply)  # the script's {reason, wait_ms}
        return None if reason == 0 else Refusal(_REASONS[reason], wait_ms / 1000)

    def charge(self, key: LimitedKey, tokens: int) -> None:
        if key.tokens_per_minute is None or tokens <= 0:
            return
        if self.backend != "redis":
            self.fallback.charge(key, tokens)
            return
        # Sent without a task or a waiting coroutine: the reply is only checked for errors.
        self._send_charge(key, tokens, self._script.evalsha(b"1", *self._args(key, tokens)))

    def _send_charge(self, key: LimitedKey, tokens: int, command: bytes) -> None:
        self._unawaited.send(command, lambda done: self._charged(key, tokens, done))

    def _charged(self, key: LimitedKey, tokens: int, done: asyncio.Future) -> None:
        error = done.exception() if not done.cancelled() else RedisUnavailable("cancelled")
        if error is None and isinstance(reply := done.result(), RedisReplyError):
            if LuaScript.lost(reply):
                self._send_charge(key, tokens, self._script.eval(b"1", *self._args(key, tokens)))
                return
            error = reply
        if error is not None:
            self._charge_failed(key, tokens, error)

    def _charge_failed(self, key: LimitedKey, tokens: int, error: BaseException) -> None:
        self._went_down(error)
        self.fallback.charge(key, tokens)

    def forget(self, live_ids: Iterable[str]) -> None:
        live = set(live_ids)
        self.fallback.forget(live)
        for key_id in [k for k in self._keys if k not in live]:
            del self._keys[key_id]


def limiter_from_settings(
    settings: Settings, metrics: Metrics, *, shared: bool = True, clock: Callable[[], float] = time.monotonic
) -> Limiter:
    """Redis when ``limits_url`` is set (and ``shared``), else in this process."""
    local = LocalLimiter(clock)
    if not settings.limits_url or not shared:
        for name in BACKENDS:  # every series exists, so alerts on the others read 0, not "no data"
            metrics.limits_backend.labels(name).set(1 if name == "in_process" else 0)
        return local
    return RedisLimiter(
        settings.limits_url.get_secret_value(),
        metrics,
        fallback=local,
        fail_closed=settings.limits_fail_closed,
        retry_after_s=max(1.0, settings.health_interval_s),
        timeout_s=settings.limits_timeout_s,
        password=settings.limits_password.get_secret_value() if settings.limits_password else None,
    )

"""Spend budgets: USD per day and per month, per API key and per team, from the route's pricing.

A key may carry ``usd_per_day`` / ``usd_per_month`` and a ``team`` (service/apikeys.py); a team's budgets
come from ``LORAGATE_TEAM_BUDGETS``. At admission a request is refused (429, code ``budget_exceeded``)
when one of its budgets is already spent (spent >= limit); the request's cost, from the same
``route.pricing`` as ``loragate_cost_usd``, is added when it completes. So a budget is overshot by at
most the cost of the requests in flight when it ran out (per gateway). Days and months start at
midnight in ``LORAGATE_BUDGET_TIMEZONE`` (zoneinfo).

Spending is counted in micro-USD integers (exact sums, no float drift):

- ``LocalLedger``: in this process (no ``LORAGATE_LIMITS_URL``).
- ``RedisLedger``: in the Redis of the rate limits, shared by every gateway: one MGET per admission,
  one INCRBY + EXPIRE per completed request (not awaited by the request). When Redis cannot be reached
  the check fails open (the request is served) and the cost is counted in this process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol
from zoneinfo import ZoneInfo

from loragate.service.metrics import Metrics
from loragate.service.rediscalls import REDIS_ERRORS, LuaScript, Unawaited
from loragate.service.resp import RedisReplyError, RespClient, encode
from loragate.service.settings import Settings

log = logging.getLogger("loragate.budgets")

REDIS_PREFIX = "loragate:budget:"
MICRO = 1_000_000
# KEYS: the counters; ARGV[1]: micro-USD to add; ARGV[1 + i]: the TTL (s) of KEYS[i].
LUA_ADD = LuaScript(b"""
for i, counter in ipairs(KEYS) do
  redis.call('INCRBY', counter, ARGV[1])
  redis.call('EXPIRE', counter, ARGV[i + 1])
end
return 0
""")


class Budget(NamedTuple):
    scope: str  # "key" or "team"
    name: str  # the key's id or the team's name (never a secret)
    period: str  # "day" or "month"
    limit_usd: float


class BudgetRefusal(NamedTuple):
    budget: Budget
    spent_usd: float
    resets_at: dt.datetime  # the start of the next period, in the budget time zone

    def message(self) -> str:
        b = self.budget
        return (
            f"{b.scope} `{b.name}` has spent ${self.spent_usd:.4f} of its ${b.limit_usd:g} {b.period}ly budget; "
            f"it resets at {self.resets_at.isoformat()}"
        )

    def retry_after_s(self, now: float) -> int:
        return max(1, math.ceil(self.resets_at.timestamp() - now))


class Periods:
    """The current day and month in a time zone: their ids (part of the counter names) and when they end."""

    def __init__(self, timezone: str = "UTC", clock: Callable[[], float] = time.time) -> None:
        self.zone = ZoneInfo(timezone)
        self.clock = clock
        self._cache: dict[str, tuple[float, float, str, dt.datetime]] = {}  # period -> [start, end), id, resets

    def current(self, period: str, now: float | None = None) -> tuple[str, dt.datetime]:
        now = self.clock() if now is None else now
        cached = self._cache.get(period)
        if cached is not None and cached[0] <= now < cached[1]:
            return cached[2], cached[3]
        local = dt.datetime.fromtimestamp(now, self.zone)
        if period == "day":
            start = local.date()
            nxt = start + dt.timedelta(days=1)
            ident = start.isoformat()
        else:
            start = local.date().replace(day=1)
            nxt = (local.replace(day=28) + dt.timedelta(days=4)).replace(day=1).date()
            ident = f"{local.year:04d}-{local.month:02d}"
        # Midnight of the next period, in the zone (a DST change moves it by the zone's rules).
        resets = dt.datetime(nxt.year, nxt.month, nxt.day, tzinfo=self.zone)
        began = dt.datetime(start.year, start.month, start.day, tzinfo=self.zone).timestamp()
        self._cache[period] = (began, resets.timestamp(), ident, resets)
        return ident, resets


class Ledger(Protocol):
    def spent(self, counters: Sequence[str]) -> list[int] | Awaitable[list[int]]: ...

    def add(self, counters: Sequence[str], micro_usd: int, ttls_s: Sequence[int]) -> None: ...


class LocalLedger:
    def __init__(self) -> None:
        self._spent: dict[str, int] = {}
        self._expires: dict[str, float] = {}

    def spent(self, counters: Sequence[str]) -> list[int]:
        return [self._spent.get(c, 0) for c in counters]

    def add(self, counters: Sequence[str], micro_usd: int, ttls_s: Sequence[int]) -> None:
        now = time.monotonic()
        for counter, ttl_s in zip(counters, ttls_s, strict=True):
            self._spent[counter] = self._spent.get(counter, 0) + micro_usd
            self._expires[counter] = now + ttl_s
        if len(self._spent) > 4096:  # old periods' counters
            for counter in [c for c, t in self._expires.items() if t < now]:
                self._spent.pop(counter, None)
                self._expires.pop(counter, None)


class RedisLedger:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.5,
        password: str | None = None,
        fallback: LocalLedger | None = None,
        retry_s: float = 5.0,
    ) -> None:
        self.client = RespClient(url, timeout_s, password)
        self.retry_s = retry_s  # after a failed check, budgets are checked in the process this long
        self._down_until = 0.0
        self.fallback = fallback or LocalLedger()
        self._unawaited = Unawaited(self.client)

    def spent(self, counters: Sequence[str]) -> Awaitable[list[int]]:
        return self._spent(counters)

    async def _spent(self, counters: Sequence[str]) -> list[int]:
        if time.monotonic() < self._down_until:  # Redis failed recently: no request waits on it meanwhile
            return self.fallback.spent(counters)
        try:
            reply = await self.client.execute(encode(b"MGET", *(c.encode() for c in counters)))
        except REDIS_ERRORS as exc:
            log.warning("budgets: Redis unreachable (%s); checking budgets in this process for %gs", exc, self.retry_s)
            self._down_until = time.monotonic() + self.retry_s
            return self.fallback.spent(counters)
        local = self.fallback.spent(counters)  # what could not be sent to Redis while it was down
        return [int(v or 0) + extra for v, extra in zip(reply, local, strict=True)]  # type: ignore[call-overload]

    def add(self, counters: Sequence[str], micro_usd: int, ttls_s: Sequence[int]) -> None:
        """One EVAL (INCRBY + EXPIRE of every counter), sent without awaiting; on failure counted here."""
        command = LUA_ADD.eval(
            b"%d" % len(counters), *(c.encode() for c in counters), b"%d" % micro_usd, *(b"%d" % t for t in ttls_s)
        )

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None or isinstance(f.result(), RedisReplyError):
                self.fallback.add(counters, micro_usd, ttls_s)

        self._unawaited.send(command, done)

    async def flush(self) -> None:
        await self._unawaited.flush()

    async def close(self) -> None:
        await self.flush()
        await self.client.close()


class BudgetedKey(Protocol):
    """What budgets need of an API key (service.apikeys.ApiKey)."""

    @property
    def id(self) -> str: ...
    @property
    def team(self) -> str | None: ...
    @property
    def usd_per_day(self) -> float | None: ...
    @property
    def usd_per_month(self) -> float | None: ...


@functools.lru_cache(maxsize=8192)
def counter_name(budget: Budget, period_id: str, prefix: str = REDIS_PREFIX) -> str:
    digest = hashlib.sha256(f"{budget.scope}\0{budget.name}".encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"{prefix}{budget.period}:{period_id}:{digest}"


class Budgets:
    """Checks and counts the spend budgets of keys and teams on a ledger (in this process or Redis)."""

    def __init__(
        self,
        ledger: Ledger,
        periods: Periods,
        team_budgets: dict[str, dict[str, float]] | None = None,
        observer: Callable[[Budget], Callable[[float], None]] | None = None,
    ) -> None:
        self.ledger = ledger
        self.periods = periods
        self.team_budgets = team_budgets or {}
        self.observer = observer  # budget -> a setter of its spent USD: the metrics
        self._observers: dict[Budget, Callable[[float], None]] = {}
        self._budgets: dict[int, tuple[BudgetedKey, list[Budget]]] = {}  # id(key) -> its budgets

    def of(self, key: BudgetedKey) -> list[Budget]:
        cached = self._budgets.get(id(key))
        if cached is not None and cached[0] is key:
            return cached[1]
        if len(self._budgets) >= 4096:
            self._budgets.clear()
        found = self._find(key)
        self._budgets[id(key)] = (key, found)
        return found

    def _find(self, key: BudgetedKey) -> list[Budget]:
        found = []
        if key.usd_per_day is not None:
            found.append(Budget("key", key.id, "day", key.usd_per_day))
        if key.usd_per_month is not None:
            found.append(Budget("key", key.id, "month", key.usd_per_month))
        team = self.team_budgets.get(key.team) if key.team else None
        if team:
            for period in ("day", "month"):
                if (limit := team.get(f"usd_per_{period}")) is not None:
                    found.append(Budget("team", key.team or "", period, float(limit)))
        return found

    def check(self, key: BudgetedKey) -> BudgetRefusal | None | Awaitable[BudgetRefusal | None]:
        """None when every budget of the key has money left (or it has none); else the first one spent."""
        budgets = self.of(key)
        if not budgets:
            return None
        now = self.periods.clock()
        periods = [self.periods.current(b.period, now) for b in budgets]
        counters = [counter_name(b, ident) for b, (ident, _) in zip(budgets, periods, strict=True)]
        spent = self.ledger.spent(counters)
        if isinstance(spent, list):
            return self._decide(budgets, periods, spent)
        return self._settle(budgets, periods, spent)

    async def _settle(
        self, budgets: list[Budget], periods: list[tuple[str, dt.datetime]], pending: Awaitable[list[int]]
    ) -> BudgetRefusal | None:
        return self._decide(budgets, periods, await pending)

    def _decide(
        self, budgets: list[Budget], periods: list[tuple[str, dt.datetime]], spent: list[int]
    ) -> BudgetRefusal | None:
        refusal = None
        for budget, (_, resets), micro in zip(budgets, periods, spent, strict=True):
            usd = micro / MICRO
            if self.observer is not None:
                observe = self._observers.get(budget)
                if observe is None:
                    observe = self._observers[budget] = self.observer(budget)
                observe(usd)
            if refusal is None and micro >= round(budget.limit_usd * MICRO):
                refusal = BudgetRefusal(budget, usd, resets)
        return refusal

    def add(self, key: BudgetedKey, cost_usd: float) -> None:
        """Count a completed request's cost against every budget of the key."""
        micro = round(cost_usd * MICRO)
        if micro <= 0:
            return
        budgets = self.of(key)
        if not budgets:
            return
        now = self.periods.clock()
        counters, ttls = [], []
        for budget in budgets:
            ident, resets = self.periods.current(budget.period, now)
            counters.append(counter_name(budget, ident))
            ttls.append(max(1, math.ceil(resets.timestamp() - now)) + 86400)  # a day past the period's end
        self.ledger.add(counters, micro, ttls)


def budgets_from_settings(settings: Settings, metrics: Metrics, clock: Callable[[], float] = time.time) -> Budgets:
    """In the Redis of ``limits_url`` when set, else in this process; days and months in ``budget_timezone``."""
    ledger: Ledger = LocalLedger()
    if settings.limits_url:
        ledger = RedisLedger(
            settings.limits_url.get_secret_value(),
            timeout_s=settings.limits_timeout_s,
            password=settings.limits_password.get_secret_value() if settings.limits_password else None,
        )

    def observer(budget: Budget) -> Callable[[float], None]:
        labels = (budget.scope, budget.name, budget.period)
        metrics.budget_limit.labels(*labels).set(budget.limit_usd)
        return metrics.budget_spent.labels(*labels).set

    teams = {team: {str(name): usd for name, usd in limits.items()} for team, limits in settings.team_budgets.items()}
    return Budgets(ledger, Periods(settings.budget_timezone, clock), teams, observer)

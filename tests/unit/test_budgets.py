"""Spend budgets: periods in a time zone, key and team budgets, the 429 they give, and N gateways on one real Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest

from loragate.service.apikeys import ApiKey
from loragate.service.auth import KeyPrincipal
from loragate.service.budgets import (
    MICRO,
    Budgets,
    LocalLedger,
    Periods,
    RedisLedger,
    budgets_from_settings,
    counter_name,
)
from loragate.service.errors import GatewayError
from loragate.service.limits import LocalLimiter
from loragate.service.metrics import Metrics
from loragate.service.settings import Settings
from tests.processes import free_port
from tests.redis_server import RedisServer

SHA = "a" * 64


def key(key_id: str = "k1", **fields) -> ApiKey:
    return ApiKey(id=key_id, sha256=SHA, **fields)


class Clock:
    def __init__(self, at: dt.datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now


def utc(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=dt.timezone.utc)


def test_days_and_months_start_at_midnight_in_the_configured_time_zone() -> None:
    periods = Periods("Europe/Paris")
    # 23:30 UTC on 31 Dec is 00:30 on 1 Jan in Paris: already the new day and month.
    ident, resets = periods.current("day", utc(2026, 12, 31, 23, 30).timestamp())
    assert ident == "2027-01-01" and resets == dt.datetime(2027, 1, 2, tzinfo=periods.zone)
    ident, resets = periods.current("month", utc(2026, 12, 31, 23, 30).timestamp())
    assert ident == "2027-01" and resets.isoformat() == "2027-02-01T00:00:00+01:00"
    # 22:30 UTC is still 31 Dec in Paris.
    assert periods.current("day", utc(2026, 12, 31, 22, 30).timestamp())[0] == "2026-12-31"
    assert Periods("UTC").current("month", utc(2026, 2, 28, 12).timestamp())[1] == utc(2026, 3, 1)


def test_a_key_is_refused_once_its_daily_budget_is_spent_and_served_again_the_next_day() -> None:
    clock = Clock(utc(2026, 5, 10, 12))
    budgets = Budgets(LocalLedger(), Periods("UTC", clock))
    k = key(usd_per_day=1.0)
    budgets.add(k, 0.6)
    assert budgets.check(k) is None  # 0.6 < 1: the next request may still run, and overshoot
    budgets.add(k, 0.6)
    refusal = budgets.check(k)
    assert refusal is not None and refusal.budget.period == "day" and refusal.budget.scope == "key"
    assert refusal.spent_usd == pytest.approx(1.2) and refusal.resets_at == utc(2026, 5, 11)
    assert refusal.retry_after_s(clock()) == 12 * 3600
    clock.now = utc(2026, 5, 11, 0, 0, 1).timestamp()
    assert budgets.check(k) is None


def test_a_team_budget_is_shared_by_its_keys_and_names_the_team() -> None:
    budgets = Budgets(LocalLedger(), Periods("UTC"), {"support": {"usd_per_month": 2.0}})
    a, b, other = key("a", team="support"), key("b", team="support"), key("c", team="sales")
    budgets.add(a, 1.5)
    assert budgets.check(b) is None
    budgets.add(b, 0.5)
    refusal = budgets.check(a)
    assert refusal is not None and (refusal.budget.scope, refusal.budget.name) == ("team", "support")
    assert budgets.check(other) is None and budgets.check(key("free")) is None


def test_the_refusal_is_an_openai_style_429_with_the_budget_and_its_reset() -> None:
    metrics = Metrics()
    settings = Settings(upstreams="http://127.0.0.1:1", budget_timezone="Europe/Paris")
    budgets = budgets_from_settings(settings, metrics, Clock(utc(2026, 5, 10, 12)))
    k = key(usd_per_month=0.5)

    def reject(reason, status, message, *, code, key_id=None, headers=None):
        return GatewayError(status, message, code=code, headers=headers)

    principal = KeyPrincipal(k, LocalLimiter(), reject, False, budgets)
    assert principal.admit("any") is None
    principal.charge(100, 0.5)
    with pytest.raises(GatewayError) as caught:
        principal.admit("any")
    error = caught.value
    assert error.status == 429 and error.code == "budget_exceeded"
    assert "monthly budget" in str(error) and "2026-06-01T00:00:00+02:00" in str(error)
    assert int(error.headers["retry-after"]) == int(
        dt.datetime(2026, 6, 1, tzinfo=budgets.periods.zone).timestamp() - utc(2026, 5, 10, 12).timestamp()
    )
    assert metrics.budget_spent.labels("key", "k1", "month")._value.get() == pytest.approx(0.5)
    assert metrics.budget_limit.labels("key", "k1", "month")._value.get() == 0.5


def test_an_unknown_time_zone_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        Settings(upstreams="http://127.0.0.1:1", budget_timezone="Mars/Olympus")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


async def test_n_gateways_on_one_redis_hold_the_budget_within_the_requests_in_flight(redis_server) -> None:
    """4 gateways (Budgets on one real Redis), 8 concurrent clients each: admitted spend <= limit + in flight."""
    gateways = [Budgets(RedisLedger(redis_server.url), Periods("UTC"), {"t": {"usd_per_day": 3.0}}) for _ in range(4)]
    await gateways[0].ledger.client.call("FLUSHDB")
    cost, concurrency = 0.07, 8
    keys = [key(f"k{i}", team="t") for i in range(3)]
    admitted = 0
    rng = random.Random(7)

    async def client(budgets: Budgets) -> None:
        nonlocal admitted
        for _ in range(40):
            k = rng.choice(keys)
            outcome = budgets.check(k)
            outcome = await outcome if asyncio.iscoroutine(outcome) else outcome
            if outcome is not None:
                assert outcome.budget.name == "t"
                return
            admitted += 1
            await asyncio.sleep(rng.random() * 0.005)  # the request runs
            budgets.add(k, cost)

    await asyncio.gather(*(client(g) for g in gateways for _ in range(concurrency)))
    for g in gateways:
        await g.ledger.flush()
    in_flight = len(gateways) * concurrency
    spent = admitted * cost
    assert 3.0 <= spent <= 3.0 + in_flight * cost, (admitted, spent)
    team_budget = gateways[0].of(keys[0])[0]
    counted = await gateways[0].ledger.spent([counter_name(team_budget, gateways[0].periods.current("day")[0])])
    assert counted == [round(admitted * cost * MICRO)]  # exact: integer micro-USD, every add counted once
    for g in gateways:
        await g.ledger.close()


async def test_an_unreachable_redis_fails_open_and_counts_in_the_process() -> None:
    budgets = Budgets(RedisLedger(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2), Periods("UTC"))
    k = key(usd_per_day=0.1)
    assert await budgets.check(k) is None
    budgets.add(k, 0.2)
    await budgets.ledger.flush()
    refusal = await budgets.check(k)
    assert refusal is not None and refusal.spent_usd == pytest.approx(0.2)


async def test_after_a_failed_check_redis_is_skipped_for_a_while() -> None:
    ledger = RedisLedger(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2, retry_s=60)
    budgets = Budgets(ledger, Periods("UTC"))
    k = key(usd_per_day=1.0)
    assert await budgets.check(k) is None
    calls = []
    ledger.client.execute = lambda command: calls.append(command)  # type: ignore[method-assign]
    assert await budgets.check(k) is None and calls == []  # served from the process, no round trip

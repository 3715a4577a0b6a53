"""Spend budgets shared by two gateway processes through a real redis-server, over the STUB upstream.

Each answer costs (7 prompt + 16 completion tokens) * $1 per 1K = $0.023. A budget is checked at
admission (spent >= limit: 429) and charged when the request completes, so the admitted spend may pass
the limit by at most the requests in flight (here 2 gateways x 8 clients).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from loragate.service.apikeys import new_key
from tests.metrics_text import sample_sum, scrape
from tests.redis_gateways import redis_gateways

ROUTES = (
    "routes:\n  plain:\n    pricing: {prompt_per_1k: 1.0, completion_per_1k: 1.0}\n"
    "    variants: [{name: base, weight: 1}]\n"
)
COST = (7 + 16) / 1000
KEYS = {name: new_key() for name in ("daily", "team-a", "team-b")}
FIELDS = {"daily": "usd_per_day: 0.5", "team-a": "team: ops", "team-b": "team: ops"}
CONCURRENCY = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    keys = {name: (key, FIELDS[name]) for name, key in KEYS.items()}
    env = {"LORAGATE_TEAM_BUDGETS": '{"ops": {"usd_per_month": 0.8}}', "LORAGATE_BUDGET_TIMEZONE": "America/New_York"}
    with redis_gateways(tmp_path_factory.mktemp("budgets-redis"), 2, ROUTES, keys, env) as (_, urls, _):
        yield urls


async def hammer(urls: list[str], keys: list[str], per_client: int) -> list[httpx.Response]:
    responses: list[httpx.Response] = []

    async def client(url: str, index: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for n in range(per_client):
                responses.append(
                    await http.post(
                        "/v1/chat/completions",
                        headers={"authorization": f"Bearer {keys[(index + n) % len(keys)]}"},
                        json={"model": "plain", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
                    )
                )

    await asyncio.gather(*(client(url, i) for url in urls for i in range(CONCURRENCY)))
    return responses


def check(responses: list[httpx.Response], limit_usd: float, what: str) -> None:
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(served) + len(refused) == len(responses), {r.status_code for r in responses}
    in_flight = 2 * CONCURRENCY
    assert limit_usd <= len(served) * COST <= limit_usd + in_flight * COST, len(served)
    assert refused, "the budget never refused"
    error = refused[-1].json()["error"]
    assert error["code"] == "budget_exceeded" and error["type"] and "param" in error
    assert what in error["message"] and "resets at" in error["message"]
    assert int(refused[-1].headers["retry-after"]) >= 1


def test_a_key_daily_budget_holds_across_two_gateways(cluster) -> None:
    responses = asyncio.run(hammer(cluster, [KEYS["daily"]], 10))
    check(responses, 0.5, "key `daily`")
    message = next(r for r in responses if r.status_code == 429).json()["error"]["message"]
    assert "T00:00:00-05:00" in message or "T00:00:00-04:00" in message  # midnight in America/New_York
    text = scrape(cluster[0])
    assert sample_sum(text, "loragate_budget_limit_usd", scope="key", owner="daily", period="day") == 0.5


def test_a_team_monthly_budget_is_shared_by_its_keys_across_two_gateways(cluster) -> None:
    responses = asyncio.run(hammer(cluster, [KEYS["team-a"], KEYS["team-b"]], 10))
    check(responses, 0.8, "team `ops`")

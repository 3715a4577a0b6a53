"""What the spend-budget check costs per request, against the same request path without budgets, in the same run.

Drives service.auth.KeyPrincipal.admit + charge (what the gateway calls per request) for one key with
rate limits, with and without ``usd_per_day`` + a team ``usd_per_month`` budget (3 budgets checked):

- in process: LocalLimiter vs LocalLimiter + Budgets(LocalLedger);
- shared: RedisLimiter vs RedisLimiter + Budgets(RedisLedger), on a real redis-server, 32 concurrent
  callers (the budget MGET is in flight beside the limiter's EVALSHA).

Reported: this process's CPU per request (process_time) and wall per request, and each ratio to its
baseline, median over ``--rounds`` alternating rounds. It measures the admission/accounting path
only (no HTTP, no upstream): the gateway-level ratio is smaller, as a request costs far more there.

Run:  .venv/bin/python bench/budget_overhead.py [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from loragate.service.apikeys import ApiKey
    from loragate.service.auth import KeyPrincipal
    from loragate.service.budgets import Budgets, LocalLedger, Periods, RedisLedger
    from loragate.service.errors import GatewayError
    from loragate.service.limits import LocalLimiter, RedisLimiter
    from loragate.service.metrics import Metrics
    from tests.redis_server import RedisServer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--redis-requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    key = ApiKey(
        id="bench", sha256="a" * 64, requests_per_minute=10**9, tokens_per_minute=10**9, team="t", usd_per_day=10**9
    )
    teams = {"t": {"usd_per_month": 10.0**9}}

    def reject(reason, status, message, **kw):
        return GatewayError(status, message, code=kw["code"])

    def local_run(budgets: Budgets | None) -> tuple[float, float]:
        principal = KeyPrincipal(key, LocalLimiter(), reject, True, budgets)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(args.requests):
            principal.admit("r")
            principal.charge(40, 0.00012)
        return ((time.process_time() - cpu) / args.requests, (time.perf_counter() - wall) / args.requests)

    async def redis_run(url: str, with_budgets: bool) -> tuple[float, float]:
        limiter = RedisLimiter(url, Metrics())
        await limiter.start()
        budgets = Budgets(RedisLedger(url), Periods("UTC"), teams) if with_budgets else None
        principal = KeyPrincipal(key, limiter, reject, True, budgets)
        per_caller = args.redis_requests // 32

        async def caller() -> None:
            for _ in range(per_caller):
                pending = principal.admit("r")
                if pending is not None:
                    await pending
                principal.charge(40, 0.00012)

        await caller()  # connect and load the script
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(32)))
        await limiter.flush()
        if budgets is not None:
            await budgets.ledger.flush()  # type: ignore[attr-defined]
        n = per_caller * 32
        result = ((time.process_time() - cpu) / n, (time.perf_counter() - wall) / n)
        await limiter.close()
        if budgets is not None:
            await budgets.ledger.close()  # type: ignore[attr-defined]
        return result

    rows: dict[str, list[tuple[float, float]]] = {n: [] for n in ("local", "local+budgets", "redis", "redis+budgets")}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            for _ in range(args.rounds):
                rows["local"].append(local_run(None))
                rows["local+budgets"].append(local_run(Budgets(LocalLedger(), Periods("UTC"), teams)))
                rows["redis"].append(asyncio.run(redis_run(server.url, False)))
                rows["redis+budgets"].append(asyncio.run(redis_run(server.url, True)))
        finally:
            server.stop()

    def ratio(name: str, base: str, i: int) -> float:
        return statistics.median(r[i] / b[i] for r, b in zip(rows[name], rows[base], strict=True))

    result = {
        "python": platform.python_version(),
        "rounds": args.rounds,
        "cpu_us_per_request": {n: round(statistics.median(r[0] for r in v) * 1e6, 2) for n, v in rows.items()},
        "wall_us_per_request": {n: round(statistics.median(r[1] for r in v) * 1e6, 2) for n, v in rows.items()},
        "cpu_ratio_local": round(ratio("local+budgets", "local", 0), 3),
        "cpu_ratio_redis": round(ratio("redis+budgets", "redis", 0), 3),
        "wall_ratio_redis": round(ratio("redis+budgets", "redis", 1), 3),
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / "budget_overhead.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

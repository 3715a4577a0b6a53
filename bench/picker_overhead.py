"""The picker's own CPU per request, at 4, 16 and 64 replicas (target: at most 10 us at 64).

Measured in one run, each as the best of 5 rounds of process CPU time over many picks:

  holder_first   the selection loragate made before #27 (every replica looked at: healthy, circuits,
                 holders, fewest in flight), the same-run baseline
  picker         service/picker.py's Picker.pick alone (prefix key given, scraped engine states)
  acquire        Pool.acquire + Pool.release, the whole path a request takes (circuits, admission,
                 counters, the decision metric), adapter already loaded, no I/O

Writes bench/results/picker_overhead.json. Run: .venv/bin/python bench/picker_overhead.py
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from loragate.service.enginestate import EngineState  # noqa: E402
from loragate.service.metrics import Metrics  # noqa: E402
from loragate.service.picker import Picker  # noqa: E402
from loragate.service.prefixring import prefix_key  # noqa: E402
from loragate.service.upstreams import Pool, Replica  # noqa: E402

PICKS = 20_000
SYSTEM = "You are the support assistant of ACME. Answer briefly and politely. " * 6


def replicas_for(pool: Pool, rng: random.Random) -> list[Replica]:
    for i, replica in enumerate(pool.replicas):
        replica.healthy = True
        replica.adapters = {f"a{j}" for j in range(16) if (i + j) % 4 == 0}
        replica.in_flight = rng.randint(0, 20)
        replica.engine = EngineState(
            running=float(replica.in_flight),
            waiting=float(rng.randint(0, 3)),
            kv_usage=rng.random(),
            max_lora=4,
            running_adapters=frozenset(list(replica.adapters)[:2]),
            waiting_adapters=frozenset(),
        )
        replica.engine_in_flight = replica.in_flight
    pool.total_in_flight = sum(r.in_flight for r in pool.replicas)
    return pool.replicas


def holder_first(pool: Pool, adapter: str) -> Replica:
    """The selection of loragate before #27 (service/upstreams.py at 16f69c0), without the await."""
    healthy = [r for r in pool.replicas if r.healthy]
    now = time.monotonic()

    def loadable(r: Replica) -> bool:
        return adapter in r.adapters or r.failed_adapters.get(adapter, 0) <= now

    eligible = [r for r in healthy if pool._open_to(r, adapter) and loadable(r)]
    candidates = [r for r in eligible if r.in_flight < pool.max_in_flight]
    holders = [r for r in candidates if adapter in r.adapters]
    return min(holders or candidates, key=lambda r: r.in_flight)


def cpu_us(work, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        work(n)
        best = min(best, time.process_time() - started)
    return best / n * 1e6


def measure(n: int) -> dict:
    rng = random.Random(n)
    pool = Pool([f"http://10.0.0.{i}:8000" for i in range(n)], Metrics(CollectorRegistry()), max_in_flight=10_000)
    replicas_for(pool, rng)
    adapters = [f"a{j}" for j in range(16)]
    prompts = [SYSTEM + f"conversation {i}" for i in range(256)]
    keys = [prefix_key(adapters[i % 16], p) for i, p in enumerate(prompts)]
    picker: Picker = pool.picker
    pool.set.reindex()
    holders = pool.set.holders
    for replica in pool.replicas:  # circuits exist, as after the first requests
        pool.circuit(replica, None)
        for adapter in adapters:
            pool.circuit(replica, adapter)

    def run_holder_first(count: int) -> None:
        for i in range(count):
            holder_first(pool, adapters[i & 15])

    def run_picker(count: int) -> None:
        usable = lambda r: r.healthy
        can_load = lambda r: True
        for i in range(count):
            adapter = adapters[i & 15]
            picker.pick(
                pool.replicas,
                usable,
                adapter=adapter,
                can_load=can_load,
                prefix=keys[i & 255],
                holders=holders.get(adapter, ()),
                total_in_flight=pool.total_in_flight,
            )

    async def acquire_release(count: int) -> None:
        for i in range(count):
            adapter = adapters[i & 15]
            replica = await pool.acquire(adapter, None, prefix=prompts[i & 255])
            pool.release(replica, adapter)

    loop = asyncio.new_event_loop()
    try:
        result = {
            "replicas": n,
            "holder_first_us": cpu_us(run_holder_first, PICKS),
            "picker_us": cpu_us(run_picker, PICKS),
            "acquire_release_us": cpu_us(lambda c: loop.run_until_complete(acquire_release(c)), PICKS),
        }
    finally:
        loop.close()
    result["picker_over_holder_first"] = result["picker_us"] / result["holder_first_us"]
    result["acquire_over_holder_first"] = result["acquire_release_us"] / result["holder_first_us"]
    return result


def main() -> None:
    rows = [measure(n) for n in (4, 16, 64)]
    for row in rows:
        print(
            f"{row['replicas']:>3} replicas: holder_first {row['holder_first_us']:.1f} us, picker "
            f"{row['picker_us']:.1f} us ({row['picker_over_holder_first']:.2f}x), acquire+release "
            f"{row['acquire_release_us']:.1f} us ({row['acquire_over_holder_first']:.2f}x)"
        )
    out = {
        "rows": rows,
        "target_picker_us_at_64": 10.0,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
    }
    (ROOT / "bench" / "results" / "picker_overhead.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""What priority classes cost: Pool.acquire + release with nobody waiting (the fast path), and the CPU per
request admitted from a long wait queue, this checkout against another git ref (default main) in the same run.

  fast       Pool.acquire + Pool.release of the base model, 4 replicas with room, nothing waiting
             (CPU us per request, best of 5 passes of 20,000)
  resolve    a request's class from its x-loragate-priority header (this checkout only: the step it adds)
  handoff    Admission.notify alone: one freed slot handed to a waiter, 1,000 critical and 1,000 standard
             waiting (CPU us per hand-off, best of 5); this checkout with its default priority shares
             (LORAGATE_PRIORITY_SHARES) beside the ref (strict priority before the shares), and
  handoff_strict  the same in this checkout with the shares set to strict priority (critical=1): the share
             logic's own cost is handoff / handoff_strict, both from this checkout, same process
  mixed N    as queue N, the N waiters half critical, half standard (arrivals alternate)
  queue N    one replica with room for one request, N requests waiting; each one admitted releases its
             slot one event-loop step later, which lets the next waiter in: CPU us per admitted request. Before the
             priority classes every release woke every waiter to look again (O(N) per release); now the
             freed slot is handed to one (service/admission.py)

Each checkout runs in its own interpreter (bench/gitref.py lays the ref out as a package), rounds alternate
between them, and medians are reported with their ratio. Writes bench/results/priority_overhead.json.

Run: .venv/bin/python bench/priority_overhead.py [--ref main] [--rounds 3] [--waiting 100 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST_REQUESTS = 20_000


def measure(waiting: list[int]) -> dict:
    """Run in the checkout under test (its loragate first on sys.path)."""
    from prometheus_client import CollectorRegistry

    from loragate.service.metrics import Metrics
    from loragate.service.priority import Priority
    from loragate.service.upstreams import Pool

    def pool(replicas: int, max_in_flight: int, max_waiting: int = 512) -> Pool:
        built = Pool(
            [f"http://10.0.0.{i}:8000" for i in range(replicas)],
            Metrics(CollectorRegistry()),
            max_in_flight=max_in_flight,
            max_waiting=max_waiting,
            max_wait_s=600,
        )
        for replica in built.replicas:
            replica.healthy = True
        return built

    loop = asyncio.new_event_loop()

    def fast() -> float:
        fast_pool = pool(4, 10_000)

        async def run(count: int) -> None:
            for _ in range(count):
                fast_pool.release(await fast_pool.acquire(None, None))

        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            loop.run_until_complete(run(FAST_REQUESTS))
            best = min(best, time.process_time() - started)
        return best / FAST_REQUESTS * 1e6

    def queue(n: int, priority_of: Callable[[int], Priority] = lambda _i: Priority.STANDARD) -> float:
        """CPU us per waiter served from a queue of ``n`` (each waiter's class: ``priority_of(its index)``)."""
        full = pool(1, 1, max_waiting=n + 1)

        async def one(priority: Priority) -> None:
            replica = await full.acquire(None, None, priority=priority)
            await asyncio.sleep(0)  # a request holds its slot past the release that let it in
            full.release(replica)

        async def run() -> float:
            held = await full.acquire(None, None)
            tasks = [asyncio.ensure_future(one(priority_of(i))) for i in range(n)]
            while full.admission.waiting < n:
                await asyncio.sleep(0)
            started = time.process_time()
            full.release(held)
            await asyncio.gather(*tasks)
            return time.process_time() - started

        return loop.run_until_complete(run()) / n * 1e6

    def handoff(shares: dict | None) -> float | None:
        """CPU us per Admission.notify that hands one slot over (no event loop step in between)."""
        import inspect

        from loragate.service.admission import Admission

        if shares is not None and "shares" not in inspect.signature(Admission).parameters:
            return None  # the ref has strict priority only
        count = 1000

        async def run() -> float:
            admission = Admission(4 * count, 600, **({} if shares is None else {"shares": shares}))
            free = [0]

            def take() -> int | None:
                if free[0]:
                    free[0] -= 1
                    return 1
                return None

            tasks = [
                asyncio.ensure_future(admission.wait(Priority(i % 2), take, lambda _t: None)) for i in range(2 * count)
            ]
            while admission.waiting < 2 * count:
                await asyncio.sleep(0)
            started = time.process_time()
            for _ in range(count):
                free[0] = 1
                admission.notify()
            spent = time.process_time() - started
            assert admission.waiting == count, admission.waiting
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return spent

        return min(loop.run_until_complete(run()) for _ in range(5)) / count * 1e6

    def resolve() -> float | None:
        """A request's class from its header (the gateway's added step); None where the ref has no classes."""
        import inspect

        if "priority" not in inspect.signature(Pool.acquire).parameters:
            return None  # (an import of the module would find this checkout's through the editable install)
        from loragate.service.priority import PRIORITY_HEADER, open_policy
        from starlette.datastructures import Headers

        headers = Headers(
            raw=[
                (b"host", b"gw"),
                (b"content-type", b"application/json"),
                (b"content-length", b"99"),
                (b"x-user-id", b"u1"),
                (b"x-loragate-priority", b"sheddable"),
            ]
        )
        policy = open_policy("standard")
        count = 200_000
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for _ in range(count):
                policy.of(headers.get(PRIORITY_HEADER))
            best = min(best, time.process_time() - started)
        return best / count * 1e6

    try:
        return {
            "fast_us": fast(),
            **{f"queue_{n}_us": queue(n) for n in waiting},
            **{f"mixed_{n}_us": queue(n, lambda i: Priority(i % 2)) for n in waiting},
            "handoff_us": handoff(None),
            "handoff_strict_us": handoff({Priority.CRITICAL: 1}),
            "resolve_class_us": resolve(),
        }
    finally:
        loop.close()


def run_in(package: Path | None, waiting: list[int]) -> dict:
    """measure() in a fresh interpreter, with ``package`` (a ref's loragate) first on sys.path."""
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None; "
        f"sys.path.insert(1, {str(ROOT)!r}); from bench.priority_overhead import measure; "
        "print(json.dumps(measure([int(a) for a in sys.argv[2:]])))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(package or ""), *map(str, waiting)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref", default="main", help="the git ref measured beside this checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--waiting", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "priority_overhead.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.gitref import overlay

    work = Path(tempfile.mkdtemp(prefix="loragate-prio-bench-"))
    ref_package = overlay(args.ref, work)
    ours: list[dict] = []
    theirs: list[dict] = []
    for _ in range(args.rounds):  # alternate, so both see the same machine neighbours
        ours.append(run_in(None, args.waiting))
        theirs.append(run_in(ref_package, args.waiting))
    figures = {}
    for name in ours[0]:
        mine = statistics.median(r[name] for r in ours)
        if theirs[0][name] is None:  # a step the ref does not have
            figures[name] = {"this": round(mine, 3)}
            print(f"{name:18s} this {mine:10.2f} us   ({args.ref} has no such step)")
            continue
        base = statistics.median(r[name] for r in theirs)
        figures[name] = {"this": round(mine, 3), args.ref: round(base, 3), "ratio": round(mine / base, 3)}
        print(f"{name:18s} this {mine:10.2f} us   {args.ref} {base:10.2f} us   ratio {mine / base:6.3f}")
    shares = statistics.median(r["handoff_us"] for r in ours)
    strict = statistics.median(r["handoff_strict_us"] for r in ours)
    figures["handoff_shares_vs_strict"] = {"ratio": round(shares / strict, 3)}
    print(f"hand-off with the priority shares / strict priority, this checkout: ratio {shares / strict:6.3f}")
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    args.out.write_text(
        json.dumps(
            {
                "what": "CPU us per request: Pool.acquire+release with nobody waiting (fast), and per request admitted "
                "from a queue of N waiters of one class (queue_N) or two (mixed_N); CPU us per Admission.notify "
                "hand-off with 1000 critical + 1000 standard waiting (handoff: this checkout's default priority "
                "shares; handoff_strict: this checkout, shares critical=1); this checkout vs the ref, same run, "
                "medians of rounds",
                "commit": head,
                "ref": args.ref,
                "rounds": args.rounds,
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "figures": figures,
                "rounds_this": ours,
                f"rounds_{args.ref}": theirs,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

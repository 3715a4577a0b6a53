"""The upstream HTTP client alone: CPU per request of this checkout's lean client against another git ref's
(default main) and aiohttp's, in the same run, on the STUB upstream (tests/stub_upstream.py, in its own process).

Each round runs every client on the same cells (non-streaming and streaming answers of 16 chunks, ``--concurrency``
requests in flight), order reversed every other round; the CPU is this process's (time.process_time) over the
requests, so the stub's does not count. Ratios are taken within a round, medians reported. bench/overhead.py
measures the whole gateway the same way (``--compare-ref main``); this isolates the client, where the fixes are.

Run:  .venv/bin/python bench/wire_clients.py [--requests 3000] [--rounds 5] [--ref main]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    import aiohttp
    import uvloop

    from bench.gitref import module_at
    from loragate.service.httpclient import HttpClient
    from loragate.service.transport import Timeout
    from tests.processes import start_stub

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests per client, cell and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--ref", default="main")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wire_clients.json")
    args = parser.parse_args()

    old = module_at(args.ref, "service/httpclient.py", "httpclient_at_ref")
    work = Path(tempfile.mkdtemp(prefix="loragate-wire-bench-"))
    stub, stub_url = start_stub(work / "stub.log")
    url = f"{stub_url}/v1/chat/completions"
    bodies = {
        mode: json.dumps(
            {
                "model": "base",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 16,
                "stream": mode == "stream",
            }
        ).encode()
        for mode in ("plain", "stream")
    }

    async def one_lean(client: object, body: bytes, timeout: object) -> int:
        response = await client.post(url, body, request_id="b", timeout=timeout)  # type: ignore[attr-defined]
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
        response.release()
        return size

    async def one_aiohttp(session: aiohttp.ClientSession, body: bytes, _timeout: object) -> int:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
            return size

    async def cell(one: object, client: object, body: bytes, timeout: object) -> float:
        async def worker(count: int) -> None:
            for _ in range(count):
                assert await one(client, body, timeout) > 0  # type: ignore[operator]

        per_worker = args.requests // args.concurrency
        await asyncio.gather(*(worker(20) for _ in range(args.concurrency)))  # warm: connections
        started = time.process_time()
        await asyncio.gather(*(worker(per_worker) for _ in range(args.concurrency)))
        return (time.process_time() - started) * 1e6 / (per_worker * args.concurrency)

    async def run() -> dict[str, list[float]]:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        old_timeouts = (
            (Timeout(total=30, connect=5), Timeout(total=30, connect=5, read=30))
            if hasattr(old, "Timeout")
            # a ref from before service/transport.py: aiohttp's
            else (
                aiohttp.ClientTimeout(total=30, sock_connect=5),
                aiohttp.ClientTimeout(total=30, sock_connect=5, sock_read=30),
            )
        )
        clients = {
            "lean": (one_lean, HttpClient(Timeout(total=30, connect=5)), Timeout(total=30, connect=5, read=30)),
            f"lean@{args.ref}": (one_lean, old.HttpClient(*old_timeouts[:1]), old_timeouts[1]),
            "aiohttp": (one_aiohttp, session, None),
        }
        costs: dict[str, list[float]] = {}
        for index in range(args.rounds):
            order = list(clients.items())
            for mode, body in bodies.items():
                for name, (one, client, timeout) in order if index % 2 == 0 else order[::-1]:
                    cost = await cell(one, client, body, timeout)
                    costs.setdefault(f"{mode}|{name}", []).append(cost)
                    print(f"round {index + 1}/{args.rounds} {mode:6s} {name:12s} {cost:7.1f} us/request", flush=True)
        for name, (_one, client, _timeout) in clients.items():
            await client.close()  # type: ignore[attr-defined]
        return costs

    try:
        costs = uvloop.run(run())  # the gateway's loop
    finally:
        stub.stop()
    ratios: dict[str, float] = {}
    deltas: dict[str, float] = {}
    for mode in bodies:
        lean = costs[f"{mode}|lean"]
        for other in (f"lean@{args.ref}", "aiohttp"):
            theirs = costs[f"{mode}|{other}"]
            ratios[f"{mode}|lean/{other}"] = statistics.median(a / b for a, b in zip(lean, theirs))
            deltas[f"{mode}|lean-{other}"] = statistics.median(a - b for a, b in zip(lean, theirs))
    medians = {key: statistics.median(values) for key, values in costs.items()}
    print("\nmedian client CPU per request: " + ", ".join(f"{k} {v:.1f} us" for k, v in medians.items()))
    print("per-round ratios (median): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("per-round differences (median): " + ", ".join(f"{k} {v:+.1f} us" for k, v in deltas.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "what": "client CPU per request (this process), stub upstream, uvloop; lean client vs its version at "
                f"{args.ref} vs aiohttp, same rounds",
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
                "settings": {
                    "requests": args.requests,
                    "rounds": args.rounds,
                    "concurrency": args.concurrency,
                    "ref": args.ref,
                    "stream_chunks": 16,
                },
                "median_us": medians,
                "ratios": ratios,
                "deltas_us": deltas,
                "rounds_us": costs,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the shared (Redis) limiter costs the gateway, against the in-process limiter, in the same run.

Starts the STUB upstream, a real redis-server and two gateways (one worker each, auth on, the same
keys file: one key with limits far above the load, so every request is admitted, charged, and goes
through the limiter): one with in-process limits, one with ``LORAGATE_LIMITS_URL``. wrk at c=32
(non-streaming chat, 16 tokens) runs against each, alternating, for ``--rounds`` rounds; the gateway's
CPU time per request (its process tree's utime+stime over the run / requests) is compared within a
round and the median ratio reported. With the Redis limiter each request is one admission round trip
(EVALSHA) plus one charge after the answer. redis-server's own CPU per request is reported apart.
Pinned like bench/overhead.py: stub, redis and wrk on CPU 0, the gateway under test on CPU 1.

``--limits-python PATH``: also measure, in that interpreter (one with `limits` and `redis` installed),
the client CPU of one check with this Lua script against the `limits` library's Redis strategies.

Run:  .venv/bin/python bench/limiter_overhead.py [--duration 5] [--rounds 3] [--limits-python ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.15  # Redis limiter CPU/request over in-process limiter CPU/request, at c=32
CONNECTIONS = 32

ROUTES = "routes:\n  bench:\n    variants: [{name: base, weight: 1}]\n"
WRK_SCRIPT = """\
local body = [[%(body)s]]
local req
init = function(args)
  req = wrk.format("POST", "/v1/chat/completions",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer %(key)s"}, body)
end
request = function() return req end
"""


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from bench.overhead import WRK_DONE, can_pin, pinned, run_wrk, tree_cpu_s, wrk_missing
    from loragate.service.apikeys import hash_key, new_key
    from loragate.service.limits import LUA_BUCKETS
    from tests.processes import Service, free_port, wait_http
    from tests.redis_server import RedisServer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument(
        "--compare-ref",
        metavar="REF",
        help="also measure the Redis-limited gateway at this git ref (e.g. main) in the same rounds",
    )
    parser.add_argument("--reader-rounds", type=int, default=5, help="rounds of the reply-reader comparison")
    parser.add_argument("--limits-python", type=Path, help="an interpreter with `limits` and `redis` installed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "limiter_overhead.json")
    args = parser.parse_args()
    if wrk_missing():
        return 2
    pin = can_pin(args.no_pin)
    side_cpu, gateway_cpu = (0, 1) if pin else (None, None)

    work = Path(tempfile.mkdtemp(prefix="loragate-limiter-bench-"))
    key = new_key()
    (work / "routes.yaml").write_text(ROUTES)
    (work / "keys.yaml").write_text(
        f'keys:\n  - {{id: bench, sha256: "{hash_key(key)}", requests_per_minute: 1000000000, '
        f"tokens_per_minute: 1000000000000}}\n"
    )
    body = json.dumps(
        {"model": "bench", "messages": [{"role": "user", "content": "My order has not arrived."}], "max_tokens": 16}
    )
    script = work / "bench.lua"
    script.write_text((WRK_SCRIPT + WRK_DONE) % {"body": body, "key": key})

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    services: list = []
    redis = RedisServer(work, prefix=("taskset", "-c", str(side_cpu)) if pin else ())
    try:
        services.append(redis.start().service)
        port = free_port()
        stub = Service(
            pinned([sys.executable, str(ROOT / "tests" / "stub_upstream.py"), "--port", str(port)], side_cpu),
            work / "stub.log",
            env,
        )
        services.append(stub)
        stub_url = f"http://127.0.0.1:{port}"
        wait_http(f"{stub_url}/health", stub.process, 30, work / "stub.log")
        gateways = {}
        variants: list[tuple[str, dict, list[str]]] = [
            ("in_process", {}, [sys.executable, "-m", "loragate", "serve"]),
            ("redis", {"LORAGATE_LIMITS_URL": redis.url}, [sys.executable, "-m", "loragate", "serve"]),
        ]
        if args.compare_ref:  # the Redis-limited gateway at another git ref (e.g. main), in the same rounds
            from bench.gitref import command, overlay

            pkg = overlay(args.compare_ref, work / "ref")
            variants.append(
                (
                    f"redis@{args.compare_ref}",
                    {"LORAGATE_LIMITS_URL": redis.url, "PYTHONPATH": str(pkg)},
                    command(pkg, ["serve"]),
                )
            )
        for name, extra, argv in variants:
            port = free_port()
            service = Service(
                pinned(argv, gateway_cpu),
                work / f"gateway-{name}.log",
                {
                    **env,
                    "LORAGATE_ROUTES_FILE": str(work / "routes.yaml"),
                    "LORAGATE_UPSTREAMS": stub_url,
                    "LORAGATE_PORT": str(port),
                    "LORAGATE_WORKERS": "1",
                    "LORAGATE_AUTH": "on",
                    "LORAGATE_API_KEYS_FILE": str(work / "keys.yaml"),
                    **extra,
                },
            )
            services.append(service)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/readyz", service.process, 60, work / f"gateway-{name}.log")
            gateways[name] = (url, service)
        check_backends(gateways)

        rounds = []
        for index in range(args.rounds):
            cells = {}
            order = list(gateways.items())
            for name, (url, service) in order if index % 2 == 0 else order[::-1]:  # ABBA: drift cancels
                run_wrk(url, script, CONNECTIONS, args.warmup, side_cpu)
                cpu_before = tree_cpu_s(service.process.pid)
                redis_before = tree_cpu_s(redis.service.process.pid)
                result = run_wrk(url, script, CONNECTIONS, args.duration, side_cpu)
                cpu = tree_cpu_s(service.process.pid) - cpu_before
                redis_cpu = tree_cpu_s(redis.service.process.pid) - redis_before
                requests = result["requests"]
                errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
                cells[name] = {
                    "rps": requests / (result["duration_us"] / 1e6),
                    "p50_ms": result["p50_us"] / 1000,
                    "p99_ms": result["p99_us"] / 1000,
                    "cpu_us_per_req": cpu * 1e6 / max(requests, 1),
                    "redis_cpu_us_per_req": redis_cpu * 1e6 / max(requests, 1),
                    "requests": requests,
                    "errors": errors,
                }
            cells["cpu_ratio"] = cells["redis"]["cpu_us_per_req"] / cells["in_process"]["cpu_us_per_req"]
            if args.compare_ref:
                other = cells[f"redis@{args.compare_ref}"]["cpu_us_per_req"]
                cells["cpu_ratio_vs_ref"] = cells["redis"]["cpu_us_per_req"] / other
                cells["cpu_us_delta_vs_ref"] = cells["redis"]["cpu_us_per_req"] - other
            rounds.append(cells)
            print(
                f"round {index + 1}: in-process {cells['in_process']['cpu_us_per_req']:.0f} us/req "
                f"({cells['in_process']['rps']:.0f} req/s), redis {cells['redis']['cpu_us_per_req']:.0f} us/req "
                f"({cells['redis']['rps']:.0f} req/s), ratio {cells['cpu_ratio']:.3f}",
                flush=True,
            )
        check_backends(gateways)
        readers = reader_costs(redis.url, LUA_BUCKETS, args.reader_rounds, args.compare_ref or "main")
        client = compare_clients(args.limits_python, redis.url, LUA_BUCKETS, work) if args.limits_python else None
    finally:
        for service in reversed(services):
            service.stop()

    summary = {
        name: {
            k: statistics.median(r[name][k] for r in rounds)
            for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "redis_cpu_us_per_req")
        }
        for name in gateways
    }
    ratio = statistics.median(r["cpu_ratio"] for r in rounds)
    errors = sum(r[name]["errors"] for r in rounds for name in gateways)
    vs_ref = (
        {
            "cpu_ratio_median": statistics.median(r["cpu_ratio_vs_ref"] for r in rounds),
            "cpu_us_delta_median": statistics.median(r["cpu_us_delta_vs_ref"] for r in rounds),
        }
        if args.compare_ref
        else None
    )
    report = {
        "what": "gateway CPU per request, Redis limiter vs in-process limiter, c=32, stub upstream, one worker",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "pinned": pin},
        "duration_s": args.duration,
        "rounds": rounds,
        "median": summary,
        "cpu_ratio_median": ratio,
        "target_ratio_max": TARGET_RATIO,
        "target_met": ratio <= TARGET_RATIO,
        "errors": errors,
        "client_check_cost": client,
        "compare_ref": args.compare_ref,
        "redis_vs_ref": vs_ref,
        "reply_readers": readers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"CPU per request: in-process {summary['in_process']['cpu_us_per_req']:.0f} us, "
        f"redis {summary['redis']['cpu_us_per_req']:.0f} us (+ redis-server "
        f"{summary['redis']['redis_cpu_us_per_req']:.0f} us); ratio {ratio:.3f} (target <= {TARGET_RATIO}); "
        f"errors {errors}; written {args.out}"
    )
    if vs_ref:
        print(
            f"Redis-limited gateway, this checkout over {args.compare_ref}: CPU/request ratio "
            f"{vs_ref['cpu_ratio_median']:.3f} ({vs_ref['cpu_us_delta_median']:+.1f} us)"
        )
    print(
        "reply readers, client CPU per admission check (median of rounds): "
        + ", ".join(f"{k} {v:.2f} us" for k, v in readers["median_us"].items())
        + "; ratios: "
        + ", ".join(f"{k} {v:.3f}" for k, v in readers["ratios"].items())
    )
    if client:
        print("client CPU per check: " + ", ".join(f"{k} {v:.1f} us" for k, v in client.items()))
    return 0 if errors == 0 else 1


def reader_costs(url: str, lua: str, rounds: int, ref: str, checks: int = 8000, concurrency: int = 32) -> dict:
    """Client CPU (this process) per admission check (EVALSHA of the limiter's script, c=32) through RespClient
    with each reply reader, in the same rounds (order reversed every other round): RespReader (this checkout),
    hiredis.Reader (C, what redis-py uses) and the recursive parser of ``ref`` (its whole resp.py)."""
    import asyncio

    import hiredis

    from bench.gitref import module_at
    from loragate.service import resp

    old = module_at(ref, "service/resp.py", "resp_at_ref")

    def hiredis_reader() -> hiredis.Reader:
        return hiredis.Reader(protocolError=resp.RespProtocolError, replyError=resp.RedisReplyError)

    clients = {
        "resp_reader": lambda: resp.RespClient(url, reader=resp.RespReader),
        "hiredis_reader": lambda: resp.RespClient(url, reader=hiredis_reader),
        f"{ref}_parse": lambda: old.RespClient(url),
    }

    async def timed(client: object, command: bytes) -> float:
        async def worker(count: int) -> None:
            for _ in range(count):
                reply = await client.request(command)  # type: ignore[attr-defined]
                assert isinstance(reply, list) and reply[0] == 0, reply

        await asyncio.gather(*(worker(200 // concurrency + 1) for _ in range(concurrency)))  # warm
        started = time.process_time()
        await asyncio.gather(*(worker(checks // concurrency) for _ in range(concurrency)))
        return (time.process_time() - started) * 1e6 / (checks // concurrency * concurrency)

    async def run() -> dict[str, list[float]]:
        made = {name: make() for name, make in clients.items()}
        sha = await made["resp_reader"].call("SCRIPT", "LOAD", lua)
        command = resp.encode(b"EVALSHA", sha, b"1", b"bench:reader", b"1000000000", b"1000000000000", b"0")
        costs: dict[str, list[float]] = {name: [] for name in made}
        for index in range(rounds):
            order = list(made.items())
            for name, client in order if index % 2 == 0 else order[::-1]:
                costs[name].append(await timed(client, command))
        for client in made.values():
            await client.close()  # type: ignore[attr-defined]
        return costs

    costs = asyncio.run(run())
    median = {name: statistics.median(values) for name, values in costs.items()}
    per_round = {
        "resp_reader_over_hiredis": [a / b for a, b in zip(costs["resp_reader"], costs["hiredis_reader"])],
        f"resp_reader_over_{ref}": [a / b for a, b in zip(costs["resp_reader"], costs[f"{ref}_parse"])],
    }
    return {
        "what": "client CPU per admission check (us), c=32, real redis-server",
        "checks": checks,
        "rounds_us": costs,
        "median_us": median,
        "ratios": {k: statistics.median(v) for k, v in per_round.items()},
        "ratios_rounds": per_round,
    }


def check_backends(gateways: dict) -> None:
    """Each gateway enforces limits where it should (the numbers mean nothing otherwise)."""
    import urllib.request

    for name, (url, _service) in gateways.items():
        text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
        backend = name.split("@")[0]  # redis@REF: the same backend at another git ref
        assert f'loragate_limits_backend{{backend="{backend}"}} 1.0' in text, f"{name} gateway is not on {backend}"


def compare_clients(python: Path, url: str, lua: str, work: Path) -> dict[str, float]:
    (work / "buckets.lua").write_text(lua)
    out = subprocess.run(
        [str(python), __file__, "--client-micro", url, str(work / "buckets.lua")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def client_micro(url: str, lua_path: str, checks: int = 6000, concurrency: int = 32) -> None:
    """Client CPU (this process, redis-py asyncio) per limit check; one check = what admits one request."""
    import asyncio
    import importlib.util

    from limits import RateLimitItemPerMinute
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
    from redis.asyncio import Redis

    async def timed(check) -> float:
        queue = list(range(checks))

        async def worker() -> None:
            while queue:
                queue.pop()
                await check()

        await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm: connections, script cache
        queue.extend(range(checks))
        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (time.process_time() - started) * 1e6 / checks

    async def run() -> dict[str, float]:
        client = Redis.from_url(url)
        lua = Path(lua_path).read_text()
        script = client.register_script(lua)
        spec = importlib.util.spec_from_file_location("resp", ROOT / "service" / "resp.py")  # stdlib only
        resp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(resp)
        own = resp.RespClient(url)
        sha = await own.call("SCRIPT", "LOAD", lua)
        command = resp.encode(b"EVALSHA", sha, b"1", b"bench:lua", b"1000000000", b"1000000000000", b"0")
        item = RateLimitItemPerMinute(10**9)
        storage = RedisStorage(url.replace("redis://", "async+redis://"), implementation="redispy")
        moving, sliding = MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage)
        results = {
            "loragate_resp_lua_admit": await timed(lambda: own.execute(command)),
            "redis_py_lua_admit": await timed(lambda: script(keys=("bench:lua",), args=(10**9, 10**12, 0))),
            # limits: hit() only; a Retry-After needs get_window_stats() too (one more round trip)
            "limits_moving_window_hit": await timed(lambda: moving.hit(item, "bench")),
            "limits_sliding_window_counter_hit": await timed(lambda: sliding.hit(item, "bench")),
        }
        await client.aclose()
        await own.close()
        return results

    print(json.dumps(asyncio.run(run())))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client-micro":
        client_micro(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(main())

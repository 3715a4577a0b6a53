"""What shadow traffic at 100 % costs the client: p50 with the shadow on against the same gateway with it off.

Starts the STUB upstream (tests/stub_upstream.py: answers in microseconds) and two gateways (one
worker each, the same settings): ``off`` serves route ``bench`` (adapter v1) without a shadow, ``on``
the same route with ``shadow: {variant: v2, percent: 100}``, so every request is also sent,
non-streaming, to adapter v2 in the background. wrk at c=1 (the client's p50, non-streaming and
streaming) runs against each, alternating within every round; the p50 difference is taken within a
round and the median over rounds reported. Target: the shadow adds <= 1 ms to the client's p50.
The gateway's CPU per request is reported too (the shadow's own work is real CPU: a second upstream
call, its accounting). Before and after, /metrics must show every measured request shadowed (no drops).
Pinned like bench/overhead.py: stub and wrk on CPU 0, the gateway under test on CPU 1.

Run:  .venv/bin/python bench/shadow_overhead.py [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_P50_DELTA_MS = 1.0
ROUTES = """\
routes:
  bench:
    variants:
      - {name: v1, adapter: bench-a1, path: /adapters/bench-a1, weight: 1}
      - {name: v2, adapter: bench-a2, path: /adapters/bench-a2, weight: 0}
%s"""
SHADOW = "    shadow: {variant: v2, percent: 100, max_in_flight: 64}\n"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from bench.overhead import WRK_SCRIPT, can_pin, pinned, request_body, run_wrk, tree_cpu_s, wrk_missing
    from tests.metrics_text import sample_sum, scrape
    from tests.processes import Service, free_port, wait_http

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shadow_overhead.json")
    args = parser.parse_args()
    if wrk_missing():
        return 2
    pin = can_pin(args.no_pin)
    side_cpu, gateway_cpu = (0, 1) if pin else (None, None)

    work = Path(tempfile.mkdtemp(prefix="loragate-shadow-bench-"))
    scripts = {}
    for mode, stream in (("plain", False), ("stream", True)):
        scripts[mode] = work / f"{mode}.lua"
        scripts[mode].write_text(WRK_SCRIPT % {"body": request_body(stream).decode(), "users": 100})

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    services: list = []
    try:
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
        for name, shadow in (("off", ""), ("on", SHADOW)):
            routes = work / f"routes-{name}.yaml"
            routes.write_text(ROUTES % shadow)
            port = free_port()
            service = Service(
                pinned([sys.executable, "-m", "loragate", "serve"], gateway_cpu),
                work / f"gateway-{name}.log",
                {
                    **env,
                    "LORAGATE_ROUTES_FILE": str(routes),
                    "LORAGATE_UPSTREAMS": stub_url,
                    "LORAGATE_PORT": str(port),
                    "LORAGATE_WORKERS": "1",
                },
            )
            services.append(service)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/readyz", service.process, 60, work / f"gateway-{name}.log")
            gateways[name] = (url, service)

        def shadowed(url: str) -> tuple[float, float, float]:
            text = scrape(url)
            return (
                sample_sum(text, "loragate_requests_total", route="bench", status_class="2xx"),
                sample_sum(text, "loragate_shadow_requests_total", route="bench", status_class="2xx"),
                sample_sum(text, "loragate_shadow_dropped_total", route="bench"),
            )

        rounds = []
        for index in range(args.rounds):
            cells: dict = {}
            for mode in ("plain", "stream"):
                for name, (url, service) in gateways.items():
                    run_wrk(url, scripts[mode], 1, args.warmup, side_cpu)
                    cpu_before = tree_cpu_s(service.process.pid)
                    result = run_wrk(url, scripts[mode], 1, args.duration, side_cpu)
                    cpu = tree_cpu_s(service.process.pid) - cpu_before
                    requests = result["requests"]
                    cells[f"{mode}|{name}"] = {
                        "rps": requests / (result["duration_us"] / 1e6),
                        "p50_ms": result["p50_us"] / 1000,
                        "p99_ms": result["p99_us"] / 1000,
                        "cpu_us_per_req": cpu * 1e6 / max(requests, 1),
                        "requests": requests,
                        "errors": sum(result[k] for k in ("connect", "read", "write", "status", "timeout")),
                    }
                cells[f"{mode}|p50_delta_ms"] = cells[f"{mode}|on"]["p50_ms"] - cells[f"{mode}|off"]["p50_ms"]
            rounds.append(cells)
            print(
                f"round {index + 1}: "
                + "; ".join(
                    f"{mode} p50 off {cells[f'{mode}|off']['p50_ms']:.3f} ms, "
                    f"on {cells[f'{mode}|on']['p50_ms']:.3f} ms "
                    f"(delta {cells[f'{mode}|p50_delta_ms']:+.3f}),"
                    f" cpu/req off {cells[f'{mode}|off']['cpu_us_per_req']:.0f}"
                    f" on {cells[f'{mode}|on']['cpu_us_per_req']:.0f} us"
                    for mode in ("plain", "stream")
                ),
                flush=True,
            )
        time.sleep(1)  # the last shadows finish
        answered, shadows, dropped = shadowed(gateways["on"][0])
        off_shadows = shadowed(gateways["off"][0])[1]
    finally:
        for service in reversed(services):
            service.stop()

    deltas = {mode: statistics.median(r[f"{mode}|p50_delta_ms"] for r in rounds) for mode in ("plain", "stream")}
    medians = {
        key: statistics.median(r[key]["p50_ms"] for r in rounds) for key in rounds[0] if not key.endswith("delta_ms")
    }
    every_one_shadowed = shadows == answered and dropped == 0 and off_shadows == 0
    errors = sum(r[k]["errors"] for r in rounds for k in r if not k.endswith("delta_ms"))
    ok = all(d <= TARGET_P50_DELTA_MS for d in deltas.values()) and every_one_shadowed and errors == 0
    print(f"\nmedians of {args.rounds} rounds at c=1: " + ", ".join(f"{k} p50 {v:.3f} ms" for k, v in medians.items()))
    for mode, delta in deltas.items():
        print(
            f"  {mode:6s} shadow 100% adds {delta:+.3f} ms to the client's p50 "
            f"[{'PASS' if delta <= TARGET_P50_DELTA_MS else 'FAIL'}: target <= {TARGET_P50_DELTA_MS} ms]"
        )
    print(
        f"  every request shadowed: {answered:.0f} answered, {shadows:.0f} shadows answered, {dropped:.0f} dropped "
        f"[{'yes' if every_one_shadowed else 'NO'}]; wrk errors {errors}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
                "settings": {
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "rounds": args.rounds,
                    "connections": 1,
                    "pinned": pin,
                    "upstream": "stub (tests/stub_upstream.py)",
                },
                "target_p50_delta_ms_max": TARGET_P50_DELTA_MS,
                "p50_delta_ms": deltas,
                "p50_ms_medians": medians,
                "shadow_counts": {"answered": answered, "shadows_answered": shadows, "dropped": dropped},
                "rounds": rounds,
                "pass": ok,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

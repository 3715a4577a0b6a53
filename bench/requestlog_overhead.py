"""Request-log overhead: gateway throughput with the log on vs off, in front of the STUB upstream.

Starts tests/stub_upstream.py and two gateways (one worker each, loopback): one with
the request log off, one writing Parquet to a temporary directory (text scrubbed,
the default; flush every 10 s / 1000 rows, the defaults). Each cell (non-streaming /
streaming at one concurrency) runs both gateways back to back with wrk (1 s warmup,
then a fixed duration); the sweep is repeated with the order alternated, and the
median of the per-round on/off ratios is reported. The prompt carries an e-mail
address and a phone number, so the scrubber has work to do.

Each run also records the gateway's CPU time (all threads) per request: on a shared or
noisy machine req/s swings with the neighbours, CPU per request does not, and at CPU
saturation the req/s ratio is the inverse of the CPU-per-request ratio. The target is
judged on that ratio; both are printed.

After the sweep the logging gateway is stopped (SIGTERM) and its Parquet rows are
counted against the requests it answered: the log must be complete, not just cheap.

With --pin (default on machines with 2+ cores) the stub and wrk share CPU 0 and both
gateways CPU 1, so a gateway's writer thread competes with its own event loop, as it
would in a one-core pod.

Run:  .venv/bin/python bench/requestlog_overhead.py [--duration 5] [--rounds 3] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import Service, free_port, wait_http  # noqa: E402

TARGET_RATIO = 0.90  # logging on keeps at least 90% of the req/s of logging off
CHUNKS = 16
ROUTES = """\
routes:
  bench:
    sticky_key: x-user-id
    variants:
      - {name: v1, adapter: bench-a1, path: /adapters/bench-a1, weight: 90}
      - {name: base, weight: 10}
    pricing: {prompt_per_1k: 0.0001, completion_per_1k: 0.0002}
"""
# Every request's user message differs (an order number), so the scrubber's cache only helps
# with the system prompt, as in real traffic.
WRK_SCRIPT = """\
local head = [[%(head)s]]
local tail = [[%(tail)s]]
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/chat/completions",
    {["Content-Type"] = "application/json", ["x-user-id"] = "user-" .. (n %% 64)}, head .. n .. tail)
end
done = function(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"errors":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status
      + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def body(stream: bool, order: str = "4521") -> str:
    return json.dumps({
        "model": "bench",
        "messages": [{"role": "system", "content": "You are a helpful support assistant."},
                     {"role": "user", "content": "I'm jane.doe@example.com, call me on +44 20 7946 0958: "
                                                 f"my order #{order} has not arrived yet, what can I do?"}],
        "max_tokens": CHUNKS, "temperature": 0, "stream": stream,
    })


def pinned(command: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if cpu is not None else command


def start_gateway(work: Path, name: str, upstream: str, cpu: int | None, log_url: str | None,
                  text: str = "scrubbed") -> tuple[Service, str]:
    port = free_port()
    env = {**os.environ, "LORAGATE_ROUTES_FILE": str(work / "routes.yaml"), "LORAGATE_UPSTREAMS": upstream,
           "LORAGATE_PORT": str(port), "LORAGATE_WORKERS": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if log_url:
        env["LORAGATE_REQUEST_LOG_URL"] = log_url
        env["LORAGATE_REQUEST_LOG_TEXT"] = text
    service = Service(pinned([sys.executable, "-m", "service.cli", "serve"], cpu), work / f"{name}.log", env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", service.process, 60, work / f"{name}.log")
    return service, url


def wrk(url: str, script: Path, concurrency: int, duration: float, cpu: int | None) -> dict:
    command = pinned(["wrk", "-t1", f"-c{concurrency}", f"-d{duration:g}s", "--latency", "-s", str(script), url], cpu)
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.search(r"WRKJSON (\{.*\})", out)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    result = json.loads(match.group(1))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def cpu_s(pid: int) -> float:
    """utime+stime of a process, all its threads (the writer thread included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def answered(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("loragate_requests_total{") and 'route="bench"' in line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--text", choices=("full", "scrubbed", "none"), default="scrubbed",
                        help="LORAGATE_REQUEST_LOG_TEXT of the logging gateway")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    load_cpu, gateway_cpu = (0, 1) if pin else (None, None)

    work = Path(tempfile.mkdtemp(prefix="loragate-bench-log-"))
    (work / "routes.yaml").write_text(ROUTES)
    stub_port = free_port()
    stub = Service(pinned([sys.executable, str(ROOT / "tests" / "stub_upstream.py"), "--port", str(stub_port),
                           "--chunks", str(CHUNKS)], load_cpu), work / "stub.log")
    services = [stub]
    try:
        upstream = f"http://127.0.0.1:{stub_port}"
        wait_http(f"{upstream}/health", stub.process, 30, work / "stub.log")
        off, off_url = start_gateway(work, "gateway-off", upstream, gateway_cpu, None)
        services.append(off)
        log_dir = work / "requestlog"
        on, on_url = start_gateway(work, "gateway-on", upstream, gateway_cpu, str(log_dir), args.text)
        services.append(on)
        targets = {"off": off_url, "on": on_url}
        pids = {"off": off.process.pid, "on": on.process.pid}

        print(f"stub upstream, {CHUNKS} chunks; c={args.concurrency}; {args.duration:g}s x {args.rounds} rounds; "
              f"pinned={pin}; text {args.text}")
        summary = []
        for stream in (False, True):
            script = work / f"wrk-{stream}.lua"
            head, tail = body(stream, "@ORDER@").split("@ORDER@")
            script.write_text(WRK_SCRIPT % {"head": head, "tail": tail})
            results: dict[str, list[dict]] = {"off": [], "on": []}
            ratios, cpu_ratios = [], []
            for round_ in range(args.rounds):
                order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
                for name in order:
                    wrk(targets[name], script, args.concurrency, 1, load_cpu)  # warmup
                    before = cpu_s(pids[name])
                    result = wrk(targets[name], script, args.concurrency, args.duration, load_cpu)
                    result["cpu_us"] = (cpu_s(pids[name]) - before) / max(result["requests"], 1) * 1e6
                    results[name].append(result)
                ratios.append(results["on"][-1]["rps"] / results["off"][-1]["rps"])
                cpu_ratios.append(results["off"][-1]["cpu_us"] / results["on"][-1]["cpu_us"])
            cell = "stream" if stream else "whole"
            for name in ("off", "on"):
                runs = results[name]
                errors = sum(r["errors"] for r in runs)
                print(f"  {cell:6s} log {name:3s}: {statistics.median(r['rps'] for r in runs):8.1f} req/s "
                      f"(runs: {', '.join(format(r['rps'], '.0f') for r in runs)}), "
                      f"p50 {statistics.median(r['p50_us'] for r in runs) / 1000:.2f} ms, "
                      f"p99 {statistics.median(r['p99_us'] for r in runs) / 1000:.2f} ms, "
                      f"CPU {statistics.median(r['cpu_us'] for r in runs):.0f} us/request, errors {errors}")
            ratio, cpu_ratio = statistics.median(ratios), statistics.median(cpu_ratios)
            summary.append((cell, cpu_ratio))
            print(f"  {cell:6s} on/off req/s ratio: {ratio:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")
            print(f"  {cell:6s} on/off by CPU per request (req/s ratio at CPU saturation, robust to noisy "
                  f"neighbours): {cpu_ratio:.3f} (per round: {', '.join(f'{r:.3f}' for r in cpu_ratios)})")

        time.sleep(1)  # requests still in flight when wrk stopped
        served = answered(on_url)
        on.stop()
        services.remove(on)
        import pyarrow.parquet as pq

        rows = sum(pq.read_metadata(p).num_rows for p in log_dir.rglob("*.parquet"))
        files = len(list(log_dir.rglob("*.parquet")))
        print(f"log completeness: {rows} rows in {files} files for {served:.0f} requests answered "
              f"({'complete' if rows == served else 'MISMATCH'})")
        ok = all(ratio >= TARGET_RATIO for _, ratio in summary) and rows == served
        print(f"target: on/off (by CPU per request) >= {TARGET_RATIO:.2f} and a complete log: "
              f"{'met' if ok else 'NOT met'}")
        return 0 if ok else 1
    finally:
        for service in services:
            service.stop()
        time.sleep(0.1)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

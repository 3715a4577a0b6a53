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

The logging gateway converts records (answer parsing, scrubbing, Parquet encoding) in
its conversion process (LORAGATE_REQUEST_LOG_CONVERT=process, the default; --convert
thread measures the old in-thread conversion). That process's CPU is not the gateway's:
it is measured separately (CPU us per record it wrote) and printed, with the on/off ratio
of the total (gateway + conversion process) CPU per request, so the whole cost is visible.
The gateway's CPU in threads other than the event loop's (the writer thread, the pool's
feeder and manager threads) is printed too: that is the log's direct cost there, besides
the ~3.5 us record() spends pickling each record on the event loop. On a 2-core machine the
conversion process has to share a CPU with the stub and wrk or with the gateway, and either
way it perturbs the measurement (slower load generator, or a shared core), so the gateway's
on/off ratio here includes that interference.

After the sweep the logging gateway is stopped (SIGTERM) and its Parquet rows are
counted against the requests it answered: the log must be complete, not just cheap.

With --pin (default on machines with 2+ cores) the stub and wrk share CPU 0 and both
gateways CPU 1, so a gateway's writer thread competes with its own event loop, as it
would in a one-core pod. The conversion process is moved to CPU 0 (next to the load
generator, --child-cpu other, the default: a pod sized with CPU for it) or kept on the
gateway's CPU 1 (--child-cpu same: a one-core pod, where its CPU comes out of the
gateway's throughput).

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

from bench.overhead import can_pin, pinned, wrk_missing  # noqa: E402
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
    return json.dumps(
        {
            "model": "bench",
            "messages": [
                {"role": "system", "content": "You are a helpful support assistant."},
                {
                    "role": "user",
                    "content": "I'm jane.doe@example.com, call me on +44 20 7946 0958: "
                    f"my order #{order} has not arrived yet, what can I do?",
                },
            ],
            "max_tokens": CHUNKS,
            "temperature": 0,
            "stream": stream,
        }
    )


def start_gateway(
    work: Path,
    name: str,
    upstream: str,
    cpu: int | None,
    log_url: str | None,
    text: str = "scrubbed",
    convert: str = "process",
) -> tuple[Service, str]:
    port = free_port()
    env = {
        **os.environ,
        "LORAGATE_ROUTES_FILE": str(work / "routes.yaml"),
        "LORAGATE_UPSTREAMS": upstream,
        "LORAGATE_PORT": str(port),
        "LORAGATE_WORKERS": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if log_url:
        env["LORAGATE_REQUEST_LOG_URL"] = log_url
        env["LORAGATE_REQUEST_LOG_TEXT"] = text
        env["LORAGATE_REQUEST_LOG_CONVERT"] = convert
    service = Service(pinned([sys.executable, "-m", "loragate", "serve"], cpu), work / f"{name}.log", env)
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
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def side_threads_cpu_s(pid: int) -> float:
    """utime+stime of a process's threads other than the main one (the event loop's)."""
    return sum(_stat_cpu_s(task / "stat") for task in Path(f"/proc/{pid}/task").iterdir() if task.name != str(pid))


def _stat_cpu_s(stat: Path) -> float:
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # a thread that ended
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def answered(url: str) -> float:
    return metric_sum(url, "loragate_requests_total{", 'route="bench"')


def written(url: str) -> float:
    return metric_sum(url, "loragate_requestlog_records_total{", 'result="written"')


def metric_sum(url: str, prefix: str, label: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix) and label in line)


def conversion_process(pid: int, timeout_s: float = 30) -> int:
    """The gateway's request-log conversion process: its child started by multiprocessing's spawn."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if (
                    int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid
                    and b"spawn_main" in (stat.parent / "cmdline").read_bytes()
                ):
                    return int(stat.parent.name)
            except (OSError, ValueError):
                continue
        time.sleep(0.2)
    raise RuntimeError(f"gateway {pid} started no conversion process")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument(
        "--text",
        choices=("full", "scrubbed", "none"),
        default="scrubbed",
        help="LORAGATE_REQUEST_LOG_TEXT of the logging gateway",
    )
    parser.add_argument(
        "--convert",
        choices=("process", "thread"),
        default="process",
        help="LORAGATE_REQUEST_LOG_CONVERT of the logging gateway",
    )
    parser.add_argument(
        "--child-cpu",
        choices=("other", "same"),
        default="other",
        help="pinned: the conversion process on the load generator's CPU 0 (other) or on the gateway's CPU 1 (same)",
    )
    args = parser.parse_args()
    if wrk_missing():
        return 2
    pin = can_pin(args.no_pin)
    load_cpu, gateway_cpu = (0, 1) if pin else (None, None)

    work = Path(tempfile.mkdtemp(prefix="loragate-bench-log-"))
    (work / "routes.yaml").write_text(ROUTES)
    stub_port = free_port()
    stub = Service(
        pinned(
            [
                sys.executable,
                str(ROOT / "tests" / "stub_upstream.py"),
                "--port",
                str(stub_port),
                "--chunks",
                str(CHUNKS),
            ],
            load_cpu,
        ),
        work / "stub.log",
    )
    services = [stub]
    try:
        upstream = f"http://127.0.0.1:{stub_port}"
        wait_http(f"{upstream}/health", stub.process, 30, work / "stub.log")
        off, off_url = start_gateway(work, "gateway-off", upstream, gateway_cpu, None)
        services.append(off)
        log_dir = work / "requestlog"
        on, on_url = start_gateway(work, "gateway-on", upstream, gateway_cpu, str(log_dir), args.text, args.convert)
        services.append(on)
        targets = {"off": off_url, "on": on_url}
        pids = {"off": off.process.pid, "on": on.process.pid}
        child = conversion_process(on.process.pid) if args.convert == "process" else None
        if child is not None and pin:
            os.sched_setaffinity(child, {load_cpu if args.child_cpu == "other" else gateway_cpu})
        placement = (
            "in the gateway's writer thread"
            if child is None
            else f"in the conversion process (pid {child}) on CPU(s) "
            f"{sorted(os.sched_getaffinity(child))}, gateway on CPU {gateway_cpu}, stub+wrk on CPU {load_cpu}"
            if pin
            else f"in the conversion process (pid {child}), unpinned"
        )

        print(
            f"stub upstream, {CHUNKS} chunks; c={args.concurrency}; {args.duration:g}s x {args.rounds} rounds; "
            f"pinned={pin}; text {args.text}; records converted {placement}"
        )
        summary = []
        for stream in (False, True):
            script = work / f"wrk-{stream}.lua"
            head, tail = body(stream, "@ORDER@").split("@ORDER@")
            script.write_text(WRK_SCRIPT % {"head": head, "tail": tail})
            results: dict[str, list[dict]] = {"off": [], "on": []}
            ratios, cpu_ratios = [], []
            child_before = (cpu_s(child), written(on_url)) if child is not None else None
            for round_ in range(args.rounds):
                order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
                for name in order:
                    wrk(targets[name], script, args.concurrency, 1, load_cpu)  # warmup
                    before, side_before = cpu_s(pids[name]), side_threads_cpu_s(pids[name])
                    result = wrk(targets[name], script, args.concurrency, args.duration, load_cpu)
                    result["cpu_us"] = (cpu_s(pids[name]) - before) / max(result["requests"], 1) * 1e6
                    result["side_us"] = (
                        (side_threads_cpu_s(pids[name]) - side_before) / max(result["requests"], 1) * 1e6
                    )
                    results[name].append(result)
                ratios.append(results["on"][-1]["rps"] / results["off"][-1]["rps"])
                cpu_ratios.append(results["off"][-1]["cpu_us"] / results["on"][-1]["cpu_us"])
            cell = "stream" if stream else "whole"
            child_us = 0.0
            if child_before is not None:  # CPU of the batches the child finished during this cell, per row
                time.sleep(0.5)
                child_cpu, rows_written = cpu_s(child) - child_before[0], written(on_url) - child_before[1]
                child_us = child_cpu / max(rows_written, 1) * 1e6
            for name in ("off", "on"):
                runs = results[name]
                errors = sum(r["errors"] for r in runs)
                print(
                    f"  {cell:6s} log {name:3s}: {statistics.median(r['rps'] for r in runs):8.1f} req/s "
                    f"(runs: {', '.join(format(r['rps'], '.0f') for r in runs)}), "
                    f"p50 {statistics.median(r['p50_us'] for r in runs) / 1000:.2f} ms, "
                    f"p99 {statistics.median(r['p99_us'] for r in runs) / 1000:.2f} ms, "
                    f"CPU {statistics.median(r['cpu_us'] for r in runs):.0f} us/request "
                    f"(threads besides the event loop's: {statistics.median(r['side_us'] for r in runs):.1f}), "
                    f"errors {errors}"
                )
            ratio, cpu_ratio = statistics.median(ratios), statistics.median(cpu_ratios)
            summary.append((cell, cpu_ratio))
            print(f"  {cell:6s} on/off req/s ratio: {ratio:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")
            print(
                f"  {cell:6s} on/off by gateway CPU per request (req/s ratio at CPU saturation, robust to noisy "
                f"neighbours): {cpu_ratio:.3f} (per round: {', '.join(f'{r:.3f}' for r in cpu_ratios)})"
            )
            if child is not None:
                off_us = statistics.median(r["cpu_us"] for r in results["off"])
                on_us = statistics.median(r["cpu_us"] for r in results["on"])
                print(
                    f"  {cell:6s} conversion process: {child_us:.0f} us CPU per record; gateway + conversion "
                    f"process {on_us + child_us:.0f} us/request vs {off_us:.0f} off: on/off by total CPU "
                    f"{off_us / (on_us + child_us):.3f} (what a one-core pod would keep)"
                )

        time.sleep(1)  # requests still in flight when wrk stopped
        served = answered(on_url)
        on.stop()
        services.remove(on)
        import pyarrow.parquet as pq

        rows = sum(pq.read_metadata(p).num_rows for p in log_dir.rglob("*.parquet"))
        files = len(list(log_dir.rglob("*.parquet")))
        print(
            f"log completeness: {rows} rows in {files} files for {served:.0f} requests answered "
            f"({'complete' if rows == served else 'MISMATCH'})"
        )
        ok = all(ratio >= TARGET_RATIO for _, ratio in summary) and rows == served
        print(
            f"target: on/off (by CPU per request) >= {TARGET_RATIO:.2f} and a complete log: "
            f"{'met' if ok else 'NOT met'}"
        )
        return 0 if ok else 1
    finally:
        for service in services:
            service.stop()
        time.sleep(0.1)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

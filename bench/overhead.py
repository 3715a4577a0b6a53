"""Gateway overhead benchmark: the STUB upstream direct, a zero-feature baseline proxy, and loragate.

Starts three servers (one worker each, loopback): tests/stub_upstream.py (answers in
microseconds, 16 SSE chunks when streaming), bench/baseline_proxy.py (FastAPI +
aiohttp, forwards bytes) and the gateway (``python -m loragate serve``; route
``bench``: adapter variant 90% + base 10%, sticky key, pricing; metrics and usage
counting on). Each cell (non-streaming / streaming x concurrency) runs the three
targets back to back with wrk (1 s warmup, then a fixed duration), and the whole
sweep is repeated; medians are reported, ratios are taken within a round.

CPU per request is the proxy's utime+stime (its whole process tree) over the measured
run, divided by the requests wrk completed.

Run:  .venv/bin/python bench/overhead.py [--duration 5] [--rounds 3] [--no-pin]

Profile the gateway under load: start with --keep-running; while it waits, in another shell:
  wrk -t1 -c32 -d10s -s <logs dir>/plain.lua <gateway url> &
  py-spy record -r 500 -d 8 --nonblocking -o gateway.svg -p <gateway pid>
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import Service, free_port, wait_http

CHUNKS = 16
TARGET_RATIO = 1.0  # gateway req/s / baseline req/s
TARGET_P50_DELTA_MS = 0.5  # gateway p50 - baseline p50 at c=1
CLK_TCK = os.sysconf("SC_CLK_TCK")

ROUTES = """\
routes:
  bench:
    sticky_key: x-user-id
    variants:
      - {name: v1, adapter: bench-a1, path: /adapters/bench-a1, weight: 90}
      - {name: base, weight: 10}
    fallback: [base]
    pricing:
      prompt_per_1k: 0.0001
      completion_per_1k: 0.0002
      reference_name: gpt-4o-mini
      reference_prompt_per_1k: 0.00015
      reference_completion_per_1k: 0.0006
"""

# What every wrk run prints at its end: one JSON line that run_wrk reads.
WRK_DONE = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,' ..
    '"timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"mean_us":%%.1f,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""

# One pre-formatted request per sticky user, cycled: wrk spends no time building requests.
WRK_SCRIPT = (
    """\
local body = [[%(body)s]]
local users = %(users)d
local reqs = {}
local i = 0
init = function(args)
  for n = 1, users do
    reqs[n] = wrk.format("POST", "/v1/chat/completions",
      {["Content-Type"] = "application/json", ["x-user-id"] = "user-" .. n}, body)
  end
end
request = function()
  i = i %% users + 1
  return reqs[i]
end
"""
    + WRK_DONE
)


def request_body(stream: bool) -> bytes:
    return json.dumps(
        {
            "model": "bench",
            "messages": [
                {"role": "system", "content": "You are a helpful support assistant."},
                {"role": "user", "content": "My order #4521 has not arrived yet, what can I do?"},
            ],
            "max_tokens": CHUNKS,
            "temperature": 0,
            "stream": stream,
        }
    ).encode()


# --- processes and CPU accounting --------------------------------------------------


def tree_cpu_s(pid: int) -> float:
    """utime+stime of ``pid`` and all its live descendants, plus its reaped children."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        f = stats.get(p)
        if f is None:
            continue
        total += int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
        if p == pid:
            total += int(f[13]) + int(f[14])  # cutime, cstime of reaped children
        todo.extend(children.get(p, []))
    return total / CLK_TCK


def wrk_missing() -> bool:
    """True (and says how to install it) when wrk is not on the PATH."""
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return True
    return False


def can_pin(no_pin: bool) -> bool:
    """Pin the load (CPU 0) and the process under test (CPU 1) apart: 2+ CPUs, taskset, and not ``--no-pin``."""
    return not no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def baseline_command(port: int) -> list[str]:
    """The zero-feature baseline proxy (bench/baseline_proxy.py) on ``port``: uvicorn as the gateway runs it."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.baseline_proxy:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


def pinned(command: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if cpu is not None else command


@dataclass
class Target:
    name: str
    url: str
    service: Service


def start_all(work: Path, pin: bool, ref: str | None = None) -> tuple[Target, ...]:
    stub_cpu, proxy_cpu = (0, 1) if pin else (None, None)
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    port = free_port()
    stub = Service(
        pinned(
            [sys.executable, str(ROOT / "tests" / "stub_upstream.py"), "--port", str(port), "--chunks", str(CHUNKS)],
            stub_cpu,
        ),
        work / "stub.log",
        env,
    )
    stub_url = f"http://127.0.0.1:{port}"
    wait_http(f"{stub_url}/health", stub.process, 30, work / "stub.log")

    port = free_port()
    baseline = Service(
        pinned(baseline_command(port), proxy_cpu),
        work / "baseline.log",
        {**env, "BASELINE_UPSTREAM": stub_url},
    )
    baseline_url = f"http://127.0.0.1:{port}"
    wait_http(f"{baseline_url}/health", baseline.process, 30, work / "baseline.log")

    port = free_port()
    routes = work / "routes.yaml"
    routes.write_text(ROUTES)
    gateway = Service(
        pinned([sys.executable, "-m", "loragate", "serve"], proxy_cpu),
        work / "gateway.log",
        {
            **env,
            "LORAGATE_ROUTES_FILE": str(routes),
            "LORAGATE_UPSTREAMS": stub_url,
            "LORAGATE_PORT": str(port),
            "LORAGATE_WORKERS": "1",
        },
    )
    gateway_url = f"http://127.0.0.1:{port}"
    wait_http(f"{gateway_url}/readyz", gateway.process, 60, work / "gateway.log")
    targets = (
        Target("stub", stub_url, stub),
        Target("baseline", baseline_url, baseline),
        Target("gateway", gateway_url, gateway),
    )
    if ref is None:
        return targets
    # The same gateway at another git ref (e.g. main), in the same run: what this checkout's changes cost.
    from bench.gitref import command, overlay

    pkg = overlay(ref, work / "ref")
    port = free_port()
    other = Service(
        pinned(command(pkg, ["serve"]), proxy_cpu),
        work / "gateway-ref.log",
        {
            **env,
            "LORAGATE_ROUTES_FILE": str(routes),
            "LORAGATE_UPSTREAMS": stub_url,
            "LORAGATE_PORT": str(port),
            "LORAGATE_WORKERS": "1",
            "PYTHONPATH": str(pkg),
        },
    )
    other_url = f"http://127.0.0.1:{port}"
    wait_http(f"{other_url}/readyz", other.process, 60, work / "gateway-ref.log")
    return (*targets, Target(f"gateway@{ref}", other_url, other))


# --- correctness checks before measuring ---------------------------------------------


def post(url: str, body: bytes, user: str) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json", "x-user-id": user})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def check_target(target: Target) -> None:
    variants = set()
    for n in range(40):
        status, headers, data = post(target.url, request_body(False), f"user-{n}")
        assert status == 200, f"{target.name}: non-streaming answered {status}: {data[:300]!r}"
        answer = json.loads(data)
        assert answer["choices"][0]["message"]["content"] and answer["usage"]["completion_tokens"] == CHUNKS
        variants.add(headers.get("x-loragate-variant"))
    status, headers, data = post(target.url, request_body(True), "user-1")
    assert status == 200, f"{target.name}: streaming answered {status}: {data[:300]!r}"
    assert headers.get("content-type", "").startswith("text/event-stream"), headers
    events = [e for e in data.split(b"\n\n") if e]
    content = [e for e in events if b'"delta"' in e]
    assert len(content) == CHUNKS and events[-1] == b"data: [DONE]", f"{target.name}: incomplete stream {data!r}"
    if target.name == "gateway":
        assert headers.get("x-loragate-route") == "bench", headers
        assert variants == {"v1", "base"}, f"sticky users should spread over v1 and base, got {variants}"
        assert b'"usage"' not in data, "the usage chunk the client did not ask for must be hidden"


def gateway_counts(url: str) -> dict[str, float]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    counts = {"2xx": 0.0, "other": 0.0, "completion_tokens": 0.0, "cost_usd": 0.0}
    for line in text.splitlines():
        m = re.match(r"loragate_requests_total\{(.*)\} (\S+)$", line)
        if m and 'route="bench"' in m.group(1):
            key = "2xx" if 'status_class="2xx"' in m.group(1) else "other"
            counts[key] += float(m.group(2))
        m = re.match(r'loragate_completion_tokens_total\{route="bench",.*\} (\S+)$', line)
        if m:
            counts["completion_tokens"] += float(m.group(1))
        m = re.match(r'loragate_cost_usd_total\{route="bench",.*\} (\S+)$', line)
        if m:
            counts["cost_usd"] += float(m.group(1))
    return counts


# --- measuring -----------------------------------------------------------------------


def run_wrk(url: str, script: Path, connections: int, duration: int, wrk_cpu: int | None) -> dict:
    command = pinned(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{int(duration)}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        wrk_cpu,
    )
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("WRKJSON "))
    return json.loads(line[len("WRKJSON ") :])


def measure(target: Target, script: Path, connections: int, duration: int, warmup: int, wrk_cpu: int | None) -> dict:
    run_wrk(target.url, script, connections, warmup, wrk_cpu)
    is_gateway = target.name == "gateway"
    before_counts = gateway_counts(target.url) if is_gateway else None
    cpu_before = tree_cpu_s(target.service.process.pid)
    result = run_wrk(target.url, script, connections, duration, wrk_cpu)
    cpu_after = tree_cpu_s(target.service.process.pid)
    requests = result["requests"]
    errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    cell = {
        "rps": requests / (result["duration_us"] / 1e6),
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "mean_ms": result["mean_us"] / 1000,
        "cpu_us_per_req": (cpu_after - cpu_before) * 1e6 / max(requests, 1),
        "requests": requests,
        "errors": errors,
    }
    if is_gateway:
        after = gateway_counts(target.url)
        counted = after["2xx"] - before_counts["2xx"]
        # wrk stops (after the warmup too) with up to `connections` requests in flight that the
        # gateway still answers and counts: allow that many on each side of the measured run.
        cell["gateway_counted_2xx"] = counted
        cell["gateway_counted_other"] = after["other"] - before_counts["other"]
        cell["gateway_completion_tokens"] = after["completion_tokens"] - before_counts["completion_tokens"]
        cell["counts_match"] = (
            requests <= counted <= requests + 2 * connections
            and cell["gateway_counted_other"] == 0
            and cell["gateway_completion_tokens"] == counted * CHUNKS
        )
    return cell


def median_cell(cells: list[dict]) -> dict:
    keys = ("rps", "p50_ms", "p99_ms", "mean_ms", "cpu_us_per_req")
    out = {k: statistics.median(c[k] for c in cells) for k in keys}
    out["errors"] = sum(c["errors"] for c in cells)
    if "counts_match" in cells[0]:
        out["counts_match"] = all(c["counts_match"] for c in cells)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds measured per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="repeat the whole sweep; medians are reported")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin (default: stub and wrk on CPU 0, the proxy under test on CPU 1)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    parser.add_argument(
        "--compare-ref", metavar="REF", help="also measure the gateway at this git ref (e.g. main) in the same rounds"
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="pause after the checks with the servers up (prints urls and pids), e.g. to profile",
    )
    args = parser.parse_args()
    if wrk_missing():
        return 2
    pin = can_pin(args.no_pin)
    wrk_cpu = 0 if pin else None

    work = Path(tempfile.mkdtemp(prefix="loragate-bench-"))
    scripts = {}
    for stream in (False, True):
        scripts[stream] = work / f"{'stream' if stream else 'plain'}.lua"
        scripts[stream].write_text(WRK_SCRIPT % {"body": request_body(stream).decode(), "users": 100})

    targets = start_all(work, pin, args.compare_ref)
    try:
        for target in targets:
            check_target(target)
        print(
            f"checks passed: 200s, complete {CHUNKS}-chunk streams, gateway headers and variant spread; "
            f"pinning: {'stub+wrk on CPU 0, proxy on CPU 1' if pin else 'off'}; logs in {work}",
            flush=True,
        )
        if args.keep_running:
            print("servers (url, pid):", {t.name: (t.url, t.service.process.pid) for t in targets}, flush=True)
            input("press Enter to measure (or Ctrl-C to stop the servers) ")
        cells = [(stream, c) for stream in (False, True) for c in args.concurrency]
        raw: dict[str, list[dict]] = {}
        for round_no in range(args.rounds):
            # The gateway and the gateway at --compare-ref swap places every other round (ABBA): drift cancels.
            order = targets if round_no % 2 == 0 else (*targets[:2], *reversed(targets[2:]))
            for stream, c in cells:
                for target in order:
                    key = f"{'stream' if stream else 'plain'}|c{c}|{target.name}"
                    cell = measure(target, scripts[stream], c, args.duration, args.warmup, wrk_cpu)
                    raw.setdefault(key, []).append(cell)
                    print(
                        f"round {round_no + 1}/{args.rounds} {key:24s} {cell['rps']:9.0f} req/s  "
                        f"p50 {cell['p50_ms']:6.2f} ms  p99 {cell['p99_ms']:6.2f} ms  "
                        f"cpu {cell['cpu_us_per_req']:6.0f} us/req  errors {cell['errors']}"
                        + (
                            f"  counted {cell['gateway_counted_2xx']:.0f}"
                            f" tokens {cell['gateway_completion_tokens']:.0f}"
                            if "counts_match" in cell
                            else ""
                        ),
                        flush=True,
                    )
    finally:
        for target in reversed(targets):
            target.service.stop()

    results = {k: median_cell(v) for k, v in raw.items()}
    comparisons = {}
    for stream, c in cells:
        mode = "stream" if stream else "plain"
        gw, bl = raw[f"{mode}|c{c}|gateway"], raw[f"{mode}|c{c}|baseline"]
        ratios = [g["rps"] / b["rps"] for g, b in zip(gw, bl)]
        deltas = [g["p50_ms"] - b["p50_ms"] for g, b in zip(gw, bl)]
        comparisons[f"{mode}|c{c}"] = {
            "rps_ratio": statistics.median(ratios),
            "rps_ratio_rounds": ratios,
            "p50_delta_ms": statistics.median(deltas),
            "p50_delta_ms_rounds": deltas,
            "cpu_ratio": statistics.median(g["cpu_us_per_req"] / b["cpu_us_per_req"] for g, b in zip(gw, bl)),
        }
        if args.compare_ref:
            other = raw[f"{mode}|c{c}|gateway@{args.compare_ref}"]
            comparisons[f"{mode}|c{c}|vs {args.compare_ref}"] = {
                "cpu_ratio": statistics.median(g["cpu_us_per_req"] / o["cpu_us_per_req"] for g, o in zip(gw, other)),
                "cpu_us_delta": statistics.median(g["cpu_us_per_req"] - o["cpu_us_per_req"] for g, o in zip(gw, other)),
                "rps_ratio": statistics.median(g["rps"] / o["rps"] for g, o in zip(gw, other)),
            }

    print(
        f"\nmedians of {args.rounds} rounds, {args.duration:g} s each (after {args.warmup:g} s warmup), "
        f"pinning {'on' if pin else 'off'}\n"
    )
    print(
        f"{'mode':7s} {'c':>3s} {'target':9s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'CPU us/req':>11s} {'errors':>7s}"
    )
    for stream, c in cells:
        mode = "stream" if stream else "plain"
        for name in [t.name for t in targets]:
            r = results[f"{mode}|c{c}|{name}"]
            print(
                f"{mode:7s} {c:3d} {name:9s} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
                f"{r['cpu_us_per_req']:11.0f} {r['errors']:7d}"
            )
    print(
        f"\ngateway vs baseline (per-round ratios, median)   targets: req/s ratio >= {TARGET_RATIO}, "
        f"p50 delta at c=1 <= {TARGET_P50_DELTA_MS} ms"
    )
    verdicts = {}
    for key, comp in comparisons.items():
        if "|vs " in key:
            print(
                f"  {key:16s} this checkout over {args.compare_ref}: CPU/req ratio {comp['cpu_ratio']:.3f} "
                f"({comp['cpu_us_delta']:+.1f} us/req), req/s ratio {comp['rps_ratio']:.3f}"
            )
            continue
        ok_ratio = comp["rps_ratio"] >= TARGET_RATIO
        line = f"  {key:10s} req/s ratio {comp['rps_ratio']:.2f} [{'PASS' if ok_ratio else 'FAIL'}]"
        verdicts[f"{key}|rps_ratio"] = ok_ratio
        if key.endswith("|c1"):
            ok_p50 = comp["p50_delta_ms"] <= TARGET_P50_DELTA_MS
            verdicts[f"{key}|p50_delta"] = ok_p50
            line += f"   p50 delta {comp['p50_delta_ms']:+.3f} ms [{'PASS' if ok_p50 else 'FAIL'}]"
        line += f"   CPU/req ratio {comp['cpu_ratio']:.2f}"
        print(line)
    counted = all(r.get("counts_match", True) for r in results.values())
    print(
        f"\ngateway /metrics counted every measured request (2xx only, tokens = {CHUNKS}/request): "
        f"{'yes' if counted else 'NO'}"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
                "compare_ref": args.compare_ref,
                "settings": {
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "rounds": args.rounds,
                    "concurrency": args.concurrency,
                    "stream_chunks": CHUNKS,
                    "pinned": pin,
                    "wrk_threads": 1,
                },
                "targets": {"rps_ratio_min": TARGET_RATIO, "p50_delta_ms_max_at_c1": TARGET_P50_DELTA_MS},
                "results": results,
                "comparisons": comparisons,
                "rounds": raw,
                "verdicts": verdicts,
                "gateway_counts_match": counted,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

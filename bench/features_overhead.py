"""What each gateway feature costs in CPU per request: featureless proxy, plain, keys, log, keys+log, in ONE run.

Starts the STUB upstream (tests/stub_upstream.py, 16 SSE chunks) and five proxies, one
worker each, all on the same CPU (stub and wrk on the other):

  baseline   bench/baseline_proxy.py: FastAPI + aiohttp, forwards bytes, no features
  plain      loragate: routing (two variants, sticky key x-user-id), metrics, usage, pricing
  keys       plain + API keys (LORAGATE_AUTH=on, one key, no limits)
  log        plain + the request log (Parquet, text scrubbed, conversion process)
  all        keys + log (+ sticky routing, as every loragate target here)

Every target gets the same requests: ``Authorization: Bearer <key>``, a sticky user id,
and a user message with an e-mail address, a phone number and an order number that
changes with every request (so the scrubber's cache only helps with the system prompt).

CPU per request is utime+stime of the proxy's whole process tree (the request log's
conversion process included), read from /proc before and after each measured wrk run. For the
log targets the conversion runs in batches (every 5000 rows, the default, or every 2 s here
instead of the default 10 s, so that the waits stay short; smaller batches cost more per row, if
anything): after the run the bench waits until the log's Parquet files hold a row for every
request the gateway answered (loragate_requests_total, read once per reading from every loragate
target alike), so the rows a run produced are paid for inside its window. That wait has no
load: each target's idle CPU rate (timers, the log's writer ticks; measured once, all targets
idle together, before the rounds) times the part of the window without load is subtracted, so
CPU per request is what a request costs under sustained load, and a target is not charged for
waiting longer. One target runs at a time (with its children: a gateway and its conversion
process, as deployed). Ratios are taken within a round (baseline, plain and all measured back to
back, in alternating order), medians over rounds, each with a 90% bootstrap interval over the
rounds (this VM's noise moves one round's ratio by tens of %). After the sweep the log targets
are stopped and their Parquet rows counted against the requests they answered: the log must be
complete, and no record's text withheld (no batch of ordinary requests may look stalled).

The proxies' CPU never idles (on where pinning is; ``--no-idle-spinner`` turns it off): a SCHED_IDLE busy
loop on CPU 1 takes the CPU whenever no proxy thread wants it, the user-space form of the
kernel's ``idle=poll``. Without it, at c=1 every request wakes an idle virtual CPU and the
hypervisor's exit and wake-up costs (up to several times the request's own work, and as
variable as the host) are charged to whichever process woke. The spinner is never charged to
a proxy (it is not in any proxy's tree) and yields to any proxy thread at once.

Verdicts: all/plain <= 1.15 in every cell (JSON and SSE, c=1 and c=32); plain/baseline <= 0.8
for JSON and < 1 for SSE at c=32, the issue's measured condition (at c=1 the per-request costs of
the event loop and the kernel, the same in both, dominate: printed, not judged).

Run:  .venv/bin/python bench/features_overhead.py [--duration 5] [--rounds 3] [--targets ...]
Profile: --keep-running prints the pids and waits; then e.g.
  py-spy record -r 500 -d 8 --nonblocking -o gw.svg -p <pid>     (and the conversion child's pid)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.overhead import CHUNKS, ROUTES, baseline_command, can_pin, pinned, tree_cpu_s, wrk_missing  # noqa: E402
from tests.processes import Service, free_port, wait_http  # noqa: E402

KEY = "lg-benchbenchbenchbenchbenchbenchbenchbench0"
TARGETS = ("baseline", "plain", "keys", "log", "all")
# Within a round, the targets of the two verdicts' ratios (plain/baseline, all/plain) are measured back to
# back, in either direction: on a shared VM the CPU a request costs drifts over tens of seconds.
MEASURE_ORDER = ("keys", "baseline", "plain", "all", "log")
FLUSH_S = 2  # the log targets' flush interval (default 10 s; batches still reach 1000 rows at c=32)
IDLE_S = 20.0  # how long every target's idle CPU is measured, all at once, before the rounds (/proc: 10 ms ticks)
BASELINE_VERDICT_CONNECTIONS = 32  # plain/baseline is judged where the issue measured it
FEATURE_LIMIT = 1.15  # all / plain CPU per request
BASELINE_LIMIT = 0.80  # plain / baseline CPU per request, JSON

WRK_SCRIPT = """\
local head = [[%(head)s]]
local tail = [[%(tail)s]]
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/chat/completions",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer %(key)s",
     ["x-user-id"] = "user-" .. (n %% 100)}, head .. n .. tail)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"errors":%%d,"non2xx":%%d,' ..
    '"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def body(stream: bool) -> str:
    return json.dumps(
        {
            "model": "bench",
            "messages": [
                {"role": "system", "content": "You are a helpful support assistant."},
                {
                    "role": "user",
                    "content": "I'm jane.doe@example.com, call me on +44 20 7946 0958: "
                    "my order #@ORDER@ has not arrived yet, what can I do?",
                },
            ],
            "max_tokens": CHUNKS,
            "temperature": 0,
            "stream": stream,
        }
    )


def metric_sum(url: str, prefix: str, label: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix) and label in line)


def settled(url: str, log_dir: Path | None, timeout_s: float = 60) -> None:
    """Wait until the request log (if any) has a row on disk for every request answered so far.

    The gateway is asked once (/metrics: every target pays one scrape); then only the disk is polled.
    """
    time.sleep(0.2)  # requests still in flight when wrk stopped
    answered = answered_2xx(url)
    deadline = time.monotonic() + timeout_s
    while log_dir is not None and log_rows(log_dir) < answered:
        if time.monotonic() > deadline:
            print(
                f"  {url}: the request log has {log_rows(log_dir)} rows for {answered:.0f} answered after "
                f"{timeout_s:.0f}s",
                flush=True,
            )
            return
        time.sleep(0.2)


def answered_2xx(url: str) -> float:
    """Requests the gateway answered with 2xx: each is in the log (refusals before any upstream are not)."""
    return metric_sum(url, "loragate_requests_total{", 'status_class="2xx"')


def start(name: str, work: Path, upstream: str, cpu: int | None) -> tuple[Service, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if name == "baseline":
        command = baseline_command(port)
        env["BASELINE_UPSTREAM"] = upstream
        ready = f"{url}/health"
    else:
        command = [sys.executable, "-m", "loragate", "serve"]
        env.update(
            {
                "LORAGATE_ROUTES_FILE": str(work / "routes.yaml"),
                "LORAGATE_UPSTREAMS": upstream,
                "LORAGATE_PORT": str(port),
                "LORAGATE_WORKERS": "1",
            }
        )
        if name in ("keys", "all"):
            env["LORAGATE_AUTH"] = "on"
            env["LORAGATE_API_KEYS"] = json.dumps({"keys": [{"id": "bench", "sha256": _sha(KEY)}]})
        if name in ("log", "all"):
            env["LORAGATE_REQUEST_LOG_URL"] = str(work / f"log-{name}")
            env["LORAGATE_REQUEST_LOG_TEXT"] = "scrubbed"
            env["LORAGATE_REQUEST_LOG_FLUSH_INTERVAL_S"] = str(FLUSH_S)
        ready = f"{url}/readyz"
    service = Service(pinned(command, cpu), work / f"{name}.log", env)
    wait_http(ready, service.process, 60, work / f"{name}.log")
    return service, url


def _sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def wrk(url: str, script: Path, connections: int, duration: float, cpu: int | None) -> dict:
    command = pinned(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s", "--latency", "-s", str(script), url],
        cpu,
    )
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.search(r"WRKJSON (\{.*\})", out)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    return json.loads(match.group(1))


def measure(
    name: str,
    url: str,
    pid: int,
    script: Path,
    connections: int,
    duration: float,
    wrk_cpu: int | None,
    work: Path,
    idle_cpu_s_per_s: float,
) -> dict:
    """One target, one cell: wrk for ``duration``, then until its log (if any) holds every answered
    request; CPU over that window less the idle CPU of the part without load (see the docstring)."""
    log_dir = log_dir_of(name, work)
    wrk(url, script, connections, 1, wrk_cpu)  # warmup
    if name != "baseline":
        settled(url, log_dir)
    before, own_before, steal_before = tree_cpu_s(pid), own_cpu_s(pid), steal_ticks()
    started = time.monotonic()
    result = wrk(url, script, connections, duration, wrk_cpu)
    if name != "baseline":
        settled(url, log_dir)
    cpu, own = tree_cpu_s(pid) - before, own_cpu_s(pid) - own_before
    window = time.monotonic() - started
    steal = (steal_ticks() - steal_before) / os.sysconf("SC_CLK_TCK") / ((os.cpu_count() or 1) * window)
    requests, seconds = result["requests"], result["duration_us"] / 1e6
    unloaded = idle_cpu_s_per_s * max(0.0, window - seconds)  # timers and ticks while its rows were written
    return {
        "rps": requests / seconds,
        "cpu_us_per_req": (cpu - unloaded) * 1e6 / max(requests, 1),
        "idle_subtracted_us_per_req": unloaded * 1e6 / max(requests, 1),
        "children_us_per_req": (cpu - own) * 1e6 / max(requests, 1),
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "requests": requests,
        "errors": result["errors"] + result["non2xx"],
        "steal": steal,
    }


def idle_rates(targets: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU seconds per second each target's process tree spends with no requests (timers, ticks)."""
    before = {name: tree_cpu_s(pid) for name, pid in targets.items()}
    time.sleep(seconds)
    return {name: (tree_cpu_s(pid) - before[name]) / seconds for name, pid in targets.items()}


def log_dir_of(name: str, work: Path) -> Path | None:
    return work / f"log-{name}" if name in ("log", "all") else None


@contextlib.contextmanager
def idle_spinner(cpu: int | None) -> Iterator[None]:
    """A SCHED_IDLE busy loop pinned to ``cpu`` for as long as the block runs (nothing when None)."""
    if cpu is None:
        yield
        return
    spinner = subprocess.Popen(
        ["chrt", "--idle", "0", "taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"]
    )
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def steal_ticks() -> int:
    """Ticks the hypervisor gave to other guests (/proc/stat "steal", all CPUs): CPU time a process is
    charged for while it did not run. Reported, so that a noisy run can be told from a slow gateway."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8])


def own_cpu_s(pid: int) -> float:
    """utime+stime of the process itself (all its threads), without its children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in path.rglob("*.parquet"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--modes", nargs="+", choices=("json", "sse"), default=["json", "sse"])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--no-idle-spinner", action="store_true", help="let the proxies' CPU idle (see above)")
    parser.add_argument("--keep-running", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "features_overhead.json")
    args = parser.parse_args()
    if wrk_missing():
        return 2
    pin = can_pin(args.no_pin)
    load_cpu, proxy_cpu = (0, 1) if pin else (None, None)
    spin_cpu = proxy_cpu if pin and not args.no_idle_spinner and shutil.which("chrt") else None

    work = Path(tempfile.mkdtemp(prefix="loragate-bench-features-"))
    (work / "routes.yaml").write_text(ROUTES)
    scripts = {}
    for mode in args.modes:
        head, tail = body(mode == "sse").split("@ORDER@")
        scripts[mode] = work / f"{mode}.lua"
        scripts[mode].write_text(WRK_SCRIPT % {"head": head, "tail": tail, "key": KEY})

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
    services: dict[str, tuple[Service, str]] = {}
    raw: dict[str, list[dict]] = {}
    completeness = {}
    try:
        upstream = f"http://127.0.0.1:{stub_port}"
        wait_http(f"{upstream}/health", stub.process, 30, work / "stub.log")
        for name in args.targets:
            services[name] = start(name, work, upstream, proxy_cpu)
        print(
            f"targets {', '.join(args.targets)}; pinning: "
            f"{'stub+wrk on CPU 0, proxies (and their children) on CPU 1' if pin else 'off'}; "
            f"idle spinner {'on CPU ' + str(spin_cpu) if spin_cpu is not None else 'off'}; logs in {work}",
            flush=True,
        )
        if args.keep_running:
            print({name: (url, service.process.pid) for name, (service, url) in services.items()}, flush=True)
            input("press Enter to measure ")
        cells = [(mode, c) for mode in args.modes for c in args.concurrency]
        measured = [name for name in MEASURE_ORDER if name in args.targets]
        pids = {name: services[name][0].process.pid for name in measured}
        with idle_spinner(spin_cpu):
            time.sleep(2)  # started: the first readings are behind them
            idle = idle_rates(pids, IDLE_S)
            print("idle CPU (ms/s): " + ", ".join(f"{n} {v * 1e3:.2f}" for n, v in idle.items()), flush=True)
            for round_no in range(args.rounds):
                for mode, c in cells:
                    for name in measured if round_no % 2 == 0 else measured[::-1]:
                        cell = measure(
                            name,
                            services[name][1],
                            pids[name],
                            scripts[mode],
                            c,
                            args.duration,
                            load_cpu,
                            work,
                            idle[name],
                        )
                        raw.setdefault(f"{mode}|c{c}|{name}", []).append(cell)
                        print(
                            f"round {round_no + 1}/{args.rounds} {mode:4s} c={c:<3d} {name:9s} "
                            f"{cell['rps']:8.0f} req/s  "
                            f"cpu {cell['cpu_us_per_req']:6.0f} us/req (children {cell['children_us_per_req']:4.0f}, "
                            f"idle subtracted {cell['idle_subtracted_us_per_req']:3.0f})  "
                            f"p50 {cell['p50_ms']:6.2f} ms  "
                            f"errors {cell['errors']}  steal {cell['steal']:.0%}",
                            flush=True,
                        )
        time.sleep(1.0)
        for name in ("log", "all"):
            if name in services:
                service, url = services[name]
                log_dir = work / f"log-{name}"
                settled(url, log_dir)
                answered = answered_2xx(url)
                # Ordinary requests never stall the log's conversion (service/requestlog/sink.py): none withheld.
                withheld = metric_sum(url, "loragate_requestlog_records_total{", 'result="text_withheld"')
                service.stop()
                rows = log_rows(log_dir)
                completeness[name] = {
                    "answered": answered,
                    "rows": rows,
                    "text_withheld": withheld,
                    "complete": rows == answered and withheld == 0,
                }
    finally:
        for service, _url in services.values():
            service.stop()
        stub.stop()

    results = {
        key: {
            k: statistics.median(c[k] for c in cells)
            for k in ("rps", "cpu_us_per_req", "children_us_per_req", "p50_ms", "p99_ms")
        }
        | {"errors": sum(c["errors"] for c in cells)}
        for key, cells in raw.items()
    }

    def per_round(mode: str, c: int, top: str, bottom: str) -> list[float] | None:
        """``top``'s CPU per request over ``bottom``'s, round by round (measured back to back)."""
        a, b = raw.get(f"{mode}|c{c}|{top}"), raw.get(f"{mode}|c{c}|{bottom}")
        if not a or not b:
            return None
        return [x["cpu_us_per_req"] / y["cpu_us_per_req"] for x, y in zip(a, b)]

    def ratio(mode: str, c: int, top: str, bottom: str) -> float | None:
        ratios = per_round(mode, c, top, bottom)
        return None if ratios is None else statistics.median(ratios)

    def ratio_interval(mode: str, c: int, top: str, bottom: str) -> tuple[float, float] | None:
        """A 90% bootstrap interval of ``ratio`` (rounds resampled): how far this run's verdict can be trusted."""
        ratios = per_round(mode, c, top, bottom)
        if ratios is None:
            return None
        draw = random.Random(0)
        medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios))) for _ in range(2000))
        return medians[100], medians[1899]

    def floor_ratio(mode: str, c: int, top: str, bottom: str) -> float | None:
        """Lowest CPU per request of each over the rounds, divided: interference (steal, neighbours) only adds."""
        a, b = raw.get(f"{mode}|c{c}|{top}"), raw.get(f"{mode}|c{c}|{bottom}")
        if not a or not b:
            return None
        return min(x["cpu_us_per_req"] for x in a) / min(y["cpu_us_per_req"] for y in b)

    print(f"\nmedians of {args.rounds} rounds, {args.duration:g} s each; CPU us/request of the proxy's process tree")
    names = [n for n in TARGETS if n in args.targets]
    print(f"{'cell':10s} " + " ".join(f"{n:>16s}" for n in names))
    for mode, c in cells:
        row = [results[f"{mode}|c{c}|{n}"] for n in names]
        print(
            f"{mode + ' c=' + str(c):10s} " + " ".join(f"{r['cpu_us_per_req']:6.0f} {r['rps']:6.0f}/s  " for r in row)
        )
    print("\nCPU per request ratios (per-round, median)")
    ratios, floors, intervals, verdicts = {}, {}, {}, {}
    for mode, c in cells:
        cell = f"{mode}|c{c}"
        ratios[cell] = {
            f"{top}/{bottom}": ratio(mode, c, top, bottom)
            for top, bottom in (("plain", "baseline"), ("keys", "plain"), ("log", "plain"), ("all", "plain"))
        }
        floors[cell] = {
            f"{top}/{bottom}": floor_ratio(mode, c, top, bottom)
            for top, bottom in (("plain", "baseline"), ("all", "plain"))
        }
        intervals[cell] = {
            f"{top}/{bottom}": ratio_interval(mode, c, top, bottom)
            for top, bottom in (("plain", "baseline"), ("all", "plain"))
        }
        line = "  ".join(f"{k} {v:.3f}" for k, v in ratios[cell].items() if v is not None)
        line += (
            "   (90% interval: "
            + "  ".join(f"{k} {v[0]:.2f}-{v[1]:.2f}" for k, v in intervals[cell].items() if v is not None)
            + ")"
        )
        line += (
            "   (lowest/lowest: " + "  ".join(f"{k} {v:.3f}" for k, v in floors[cell].items() if v is not None) + ")"
        )
        if ratios[cell]["all/plain"] is not None:
            verdicts[f"{cell}|all/plain<={FEATURE_LIMIT}"] = ratios[cell]["all/plain"] <= FEATURE_LIMIT
        pb = ratios[cell]["plain/baseline"]
        if pb is not None and c == BASELINE_VERDICT_CONNECTIONS:
            verdicts[f"{cell}|plain/baseline<={BASELINE_LIMIT if mode == 'json' else 1.0}"] = pb <= (
                BASELINE_LIMIT if mode == "json" else 1.0
            )
        print(f"  {mode:4s} c={c:<3d} {line}")
    for name, comp in completeness.items():
        print(
            f"log completeness ({name}): {comp['rows']} rows for {comp['answered']:.0f} requests answered, "
            f"{comp['text_withheld']:.0f} with text withheld ({'complete' if comp['complete'] else 'MISMATCH'})"
        )
    steal = statistics.median(c["steal"] for cs in raw.values() for c in cs)
    print(
        f"hypervisor steal during the measured runs: median {steal:.0%}"
        " of the machine (charged to whatever ran: above a few % the ratios are noisy)"
    )
    print("verdicts: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in verdicts.items()))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "kernel": platform.release(),
                    "loadavg": os.getloadavg(),
                },
                "settings": {
                    "duration_s": args.duration,
                    "rounds": args.rounds,
                    "concurrency": args.concurrency,
                    "modes": args.modes,
                    "stream_chunks": CHUNKS,
                    "pinned": pin,
                    "targets": args.targets,
                    "idle_spinner": spin_cpu is not None,
                },
                "results": results,
                "ratios": ratios,
                "ratio_intervals_90": intervals,
                "lowest_ratios": floors,
                "verdicts": verdicts,
                "idle_cpu_ms_per_s": {n: v * 1e3 for n, v in idle.items()},
                "steal_median": statistics.median(c["steal"] for cells in raw.values() for c in cells),
                "log_completeness": completeness,
                "rounds": raw,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(verdicts.values()) and all(c["complete"] for c in completeness.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

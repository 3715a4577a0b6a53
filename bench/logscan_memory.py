"""Where the sampled read's memory goes: the drift check's read of two windows (no report), phase by phase.

    python bench/logscan_memory.py ROOT [--parallel 8] [--tracemalloc] [--windows reference shifted]

For each window (bench/volume_log.py's hours) the read of bench/monitor_volume.py's drift case
(RequestLog.sample, 10,000 rows, one sample for all variants) with marks at the phase boundaries of
monitoring/logscan.py (plan, key pass, selection, row pass): the resident set now and its peak during the
phase (VmHWM, reset at each mark through /proc/self/clear_refs), Arrow's bytes allocated now and its pool's
high-water mark, and with ``--tracemalloc`` Python's traced memory (now, peak in the phase) and the top
allocation sites after the key pass. One JSON line per mark.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.volume_log import hour_window  # noqa: E402


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                name, value = line.split(":")
                out[name] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--windows", nargs="+", default=["reference", "shifted"])
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()

    import pyarrow as pa

    from loragate.monitoring import logscan
    from loragate.monitoring.driftfeatures import LOG_COLUMNS
    from loragate.monitoring.sources import RequestLog, Window

    pool = pa.default_memory_pool()
    started = time.perf_counter()
    if args.tracemalloc:
        tracemalloc.start(8)

    def mark(phase: str, **extra: object) -> None:
        status = _status()
        row = {
            "phase": phase,
            "s": round(time.perf_counter() - started, 1),
            "rss_mb": round(status["VmRSS"] / 2**20),
            "phase_peak_rss_mb": round(status["VmHWM"] / 2**20),
            "arrow_now_mb": round(pa.total_allocated_bytes() / 2**20),
            "arrow_pool_max_mb": round(pool.max_memory() / 2**20),
            "pool": pool.backend_name,
            **extra,
        }
        if args.tracemalloc:
            now, peak = tracemalloc.get_traced_memory()
            row["py_now_mb"], row["py_phase_peak_mb"] = round(now / 2**20), round(peak / 2**20)
            tracemalloc.reset_peak()
        print(json.dumps(row), flush=True)
        _reset_peak()

    pass1, select = logscan.WindowScan._pass1, logscan.WindowScan._select

    def timed_pass1(self, plan, done):  # type: ignore[no-untyped-def]
        mark("plan", files=len(plan), bytes=sum(f.size for f in plan))
        out = pass1(self, plan, done)
        kept = [c for c in done.values() if c is not None]
        mark("key pass", candidates=sum(len(c.rows) for c in kept), starts=sum(len(c.row_group_starts) for c in kept))
        if args.tracemalloc:
            for stat in tracemalloc.take_snapshot().statistics("lineno")[:8]:
                print("  ", stat, flush=True)
        return out

    def timed_select(self, done):  # type: ignore[no-untyped-def]
        out = select(self, done)
        mark("select")
        return out

    logscan.WindowScan._pass1 = timed_pass1  # type: ignore[method-assign]
    logscan.WindowScan._select = timed_select  # type: ignore[method-assign]
    mark("start")
    log = RequestLog(args.root, parallel=args.parallel)
    for name in args.windows:
        sample = log.sample(
            Window(*hour_window(name)), "chat", columns=LOG_COLUMNS, per_variant=10_000, by_variant=False
        )
        mark(f"row pass ({name})", rows=len(sample.frame), window_rows=sum(sample.window_rows.values()))
        del sample
        mark(f"after ({name}) freed")


if __name__ == "__main__":
    main()

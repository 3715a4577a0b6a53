"""The monitor at traffic volume: a drift check and a dataset export on windows of 100k, 1M and 10M requests.

    python bench/monitor_volume.py [--sizes 100000 1000000 10000000] [--root /tmp/monvol-log]
                                   [--baseline-sizes 100000] [--compaction-sizes 100000 1000000] [--s3]
                                   [--compacted-sizes ...] [--keyed-sizes ...]
                                   [--out bench/results/monitor_volume.json]

The log (bench/volume_log.py) is generated once per size under ``--root`` and reused: an hour of ``size``
primary requests (plus 5% shadow answers) from 4 writers flushing every 10 s (1,440 files an hour), real
text from the ChatterBot corpus, prompts 150 B - 8 KB, answers 150 B - 2 KB. Hours: ``reference`` (tech
questions), ``quiet`` (the same population, other draws) and ``shifted`` (half the prompts on everyday
topics, same sizes). Generating 10M rows takes ~40 min on 2 cores and ~5 GB of disk: only reference and
shifted are made at 10M.

Every case runs in its own process; wall time is measured there, and the parent samples the resident set of
the whole process tree (every 0.2 s, from /proc) and reads the child's ``ru_maxrss``: the peak is reported.

Cases, per size:

- ``drift`` (the new reader): a deterministic sample of 10,000 requests of each window (monitoring/logscan.py)
  and the full drift report (Evidently, text content, HTML + JSON) on it, for reference vs shifted (drift
  expected in ``inputs``) and reference vs quiet (none expected).
- ``drift_full``: the same report on every row of the window, read by the new reader with projection (only at
  100k: whether the sample's verdicts match the full window's).
- ``baseline``: today's reader (``RequestLog.requests`` at 16f69c0: every file, every column, one pandas frame)
  and the report on the full windows, in the same run, stopped when its tree passes ``--baseline-kill-gb``.
- ``export``: the dataset export of a 50,000-request sample of the window, streamed to JSONL.
- ``layout`` (``--compacted-sizes``, ``--keyed-sizes``): the drift case again on a copy of the log, either
  compacted whole (``loragate log compact``'s work on closed hours: the compaction's time is recorded) or
  rewritten file by file as the gateway writes now (service/requestlog/store.encode: key order, key ranges in
  the footer; the bytes before and after are recorded). ``--pools default system``: the compacted layout's
  drift case also with Arrow's system allocator (freed memory goes back to malloc, which the report reuses).
  The generated log is in the older gateways' layout
  (one time-ordered row group a file), so the plain drift case is the baseline of both, in the same run.
- ``compaction`` (``--compaction-sizes``): a copy of the reference hour; the time to read its sample before,
  the compaction's time and memory, and the read time after; with ``--s3`` the same on a moto S3 server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.volume_log import DAY, HOURS, generate, hour_window, rewrite_keyed  # noqa: E402

ROUTE = "chat"
SAMPLE_ROWS = 10_000
EXPORT_ROWS = 50_000


# --- the cases (each runs in a child process) ---------------------------------------------------


def _window(name: str):
    from loragate.monitoring.sources import Window

    start, end = hour_window(name)
    return Window(start, end)


def _baseline_requests(root: str, window) -> "object":
    """Today's reader (monitoring/sources.py at 16f69c0), verbatim in what it does: every file of every
    day the window touches, every column, into one frame, then the time filter."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from pyarrow import fs

    from loragate.common import logschema
    from loragate.common.objectstore import filesystem

    filesystem_, base = filesystem(root)
    files = []
    for day in window.days():
        selector = fs.FileSelector(f"{base}/requests/date={day.isoformat()}", allow_not_found=True)
        files += sorted(
            i.path
            for i in filesystem_.get_file_info(selector)
            if i.type == fs.FileType.File and i.path.endswith(".parquet")
        )
    tables = []
    for path in files:
        table = logschema.conform(pq.read_table(path, filesystem=filesystem_), "requests")
        mask = pc.and_(pc.equal(table["route"], ROUTE), pc.equal(table["role"], logschema.PRIMARY))
        tables.append(table.filter(mask).select(list(logschema.REQUEST_COLUMNS)))
    frame = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    stamps = pd.to_datetime(frame["timestamp"], utc=True)
    frame["timestamp"] = stamps
    keep = (stamps >= pd.Timestamp(window.start)) & (stamps < pd.Timestamp(window.end))
    return frame.loc[keep].sort_values("timestamp").reset_index(drop=True)


def case_drift(root: str, current: str, mode: str) -> dict:
    from loragate.monitoring.drift import DriftConfig, run_drift
    from loragate.monitoring.driftfeatures import LOG_COLUMNS
    from loragate.monitoring.sources import RequestLog

    config = DriftConfig(sample_rows=SAMPLE_ROWS)
    started = time.perf_counter()
    windows = {}
    if mode == "baseline":
        for side, name in (("reference", "reference"), ("current", current)):
            frame = _baseline_requests(root, _window(name))
            windows[side] = (frame, len(frame))
    else:
        log = RequestLog(root)
        for side, name in (("reference", "reference"), ("current", current)):
            sample = log.sample(
                _window(name),
                ROUTE,
                columns=LOG_COLUMNS,
                per_variant=None if mode == "full" else config.sample_rows,
                by_variant=False,
            )
            windows[side] = (sample.frame, sample.total_rows)
    read_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as out:
        result = run_drift(
            windows["reference"][0],
            windows["current"][0],
            route=ROUTE,
            config=config,
            out_dir=out,
            window_rows=(windows["reference"][1], windows["current"][1]),
        )
    return {
        "read_s": round(read_s, 2),
        "wall_s": round(time.perf_counter() - started, 2),
        "window_rows": [windows["reference"][1], windows["current"][1]],
        "compared_rows": [result.reference_rows, result.current_rows],
        "drifted_groups": result.drifted_groups,
        "status": result.status,
        "prompt_content_auc": round(result.feature("prompt_content").score, 4),
    }


def case_export(root: str, _current: str, _mode: str) -> dict:
    from loragate.monitoring.sources import RequestLog, WindowSource
    from loragate.monitoring.triggers.dataset import export_window

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        path = f"{out}/export.jsonl"
        written = export_window(
            WindowSource(RequestLog(root), _window("reference"), ROUTE, None),
            path,
            rows=EXPORT_ROWS,
            until=DAY.timestamp() + 86_400,
        )
        size = os.path.getsize(path)
    return {"wall_s": round(time.perf_counter() - started, 2), "records": written, "bytes": size}


def case_compaction(root: str, _current: str, mode: str) -> dict:
    """Read the reference hour's sample (the drift check's read), compact it, read again."""
    from loragate.common.objectstore import filesystem
    from loragate.monitoring.compaction import Compactor
    from loragate.monitoring.driftfeatures import LOG_COLUMNS
    from loragate.monitoring.sources import RequestLog

    def read() -> tuple[float, int]:
        started = time.perf_counter()
        log = RequestLog(root)
        sample = log.sample(_window("reference"), ROUTE, columns=LOG_COLUMNS, per_variant=SAMPLE_ROWS, by_variant=False)
        return round(time.perf_counter() - started, 2), len(sample.frame)

    def ids() -> list:
        frame = RequestLog(root).requests(_window("reference"), columns=("request_id", "timestamp", "role"), role=None)
        return sorted(zip(frame["request_id"], frame["role"]))

    before_ids = ids()
    before_s, before_rows = read()
    started = time.perf_counter()
    results = Compactor(*filesystem(root)).run(("requests",), days=1, now=DAY.timestamp() + 86_399)
    compact_s = time.perf_counter() - started
    after_s, after_rows = read()
    same = ids() == before_ids
    return {
        "mode": mode,
        "read_before_s": before_s,
        "compaction_s": round(compact_s, 2),
        "read_after_s": after_s,
        "read_ratio_after_before": round(after_s / before_s, 3),
        "rows_read": [before_rows, after_rows],
        "ids_identical": same,
        "ids": len(before_ids),
        "files_in": sum(r.inputs for r in results),
        "files_out": sum(len(r.outputs) for r in results),
    }


def case_compact(root: str, _current: str, _mode: str) -> dict:
    """Compact every hour of the log under ``root`` (what ``loragate log compact`` does to closed hours)."""
    from loragate.common.objectstore import filesystem
    from loragate.monitoring.compaction import Compactor

    started = time.perf_counter()
    results = Compactor(*filesystem(root)).run(("requests",), days=1, now=DAY.timestamp() + 86_399)
    return {
        "compaction_s": round(time.perf_counter() - started, 2),
        "files_in": sum(r.inputs for r in results),
        "files_out": sum(len(r.outputs) for r in results),
        "rows": sum(r.rows for r in results),
    }


def case_verdicts(rows: str, _current: str, _mode: str) -> dict:
    """bench/drift_topics.py's windows (short real questions, the rest of the request synthetic) of ``rows``
    a side: the verdict on every row against the verdict on the reader's sample (the 10,000 rows of smallest
    sample key), for a topic shift of 0.5 and for one population (shift 0)."""
    import numpy as np
    import pyarrow as pa

    from loragate.monitoring.drift import DriftConfig, run_drift
    from loragate.monitoring.logkeys import sample_keys
    from tests.synthetic import requests_frame
    from tests.topics import window

    n = int(rows)
    out = {}
    for shift in (0.5, 0.0):
        frames = []
        for seed, share in ((11, 0.0), (12, shift)):
            frame = requests_frame(n, seed=seed)
            frame["prompt_text"] = window(n, seed=seed, shifted=share)
            frames.append(frame)

        def sample(frame):
            keys = sample_keys(pa.array(frame["request_id"].tolist()))
            return frame.iloc[np.sort(np.argsort(keys)[:SAMPLE_ROWS])].reset_index(drop=True)

        for name, (ref, cur) in (("full", frames), ("sample", [sample(f) for f in frames])):
            started = time.perf_counter()
            result = run_drift(ref, cur, route=ROUTE, config=DriftConfig())
            out[f"shift_{shift}_{name}"] = {
                "drifted_groups": result.drifted_groups,
                "rows": len(cur),
                "prompt_content_auc": round(result.feature("prompt_content").score, 4),
                "s": round(time.perf_counter() - started, 1),
            }
    return out


CASES = {
    "drift": case_drift,
    "export": case_export,
    "compaction": case_compaction,
    "verdicts": case_verdicts,
    "compact": case_compact,
}


# --- the parent: run a case, watch its process tree ----------------------------------------------


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def run_case(
    case: str, root: str, current: str = "shifted", mode: str = "sample", *, kill_gb: float = 0, env: dict | None = None
) -> dict:
    command = [sys.executable, __file__, "--case", case, "--root", root, "--current", current, "--mode", mode]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    peak, killed = [0], [False]

    def watch() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_rss(process.pid))
            if kill_gb and peak[0] > kill_gb * 2**30:
                killed[0] = True
                process.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.perf_counter()
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    watcher.join()
    output = process.stdout.read() if process.stdout else ""
    peak_mb = max(peak[0] / 2**20, usage.ru_maxrss / 1024)
    cpu = round(usage.ru_utime + usage.ru_stime, 1)  # the tree's CPU seconds: steadier than wall time here
    if killed[0] or status != 0:
        return {
            "case": case,
            "mode": mode,
            "current": current,
            "ok": False,
            "killed": killed[0],
            "after_s": round(wall, 1),
            "cpu_s": cpu,
            "peak_rss_mb": round(peak_mb),
        }
    result = json.loads(output.strip().splitlines()[-1])
    return {
        "case": case,
        "mode": mode,
        "current": current,
        "ok": True,
        "process_s": round(wall, 2),
        "cpu_s": cpu,
        "peak_rss_mb": round(peak_mb),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        **result,
    }


def _moto(port: int) -> tuple[subprocess.Popen, dict]:
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return process, env


def _copy_hour(source: Path, target: str, name: str, env: dict | None = None) -> None:
    """The files of hour ``name`` (by flush stamp) to ``target`` (a directory or an s3:// URL)."""
    from loragate.common.objectstore import S3Options, filesystem

    s3 = S3Options.resolve(environ=env) if env else None
    fs, base = filesystem(target, s3)
    stamp = f"{DAY:%Y%m%d}T{HOURS[name][0]:02d}"
    directory = f"requests/date={DAY:%Y-%m-%d}"
    if not target.startswith("s3://"):
        fs.create_dir(f"{base}/{directory}", recursive=True)
    for path in sorted((source / directory).glob(f"*-{stamp}*.parquet")):
        with fs.open_output_stream(f"{base}/{directory}/{path.name}") as out:  # one PUT, as the gateway writes
            out.write(path.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--baseline-sizes", type=int, nargs="*", default=[100_000])
    parser.add_argument("--baseline-kill-gb", type=float, default=8.0)
    parser.add_argument("--quiet-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--drift-sizes", type=int, nargs="*", help="default: every size")
    parser.add_argument("--export-sizes", type=int, nargs="*", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--full-sizes", type=int, nargs="*", default=[100_000])
    parser.add_argument("--compaction-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument(
        "--compacted-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also: compact a hard-linked copy of the log (every hour, as `loragate log compact` "
        "does closed hours) and run the drift case on it; the copy is deleted after",
    )
    parser.add_argument(
        "--keyed-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also: rewrite a copy of the log as the gateway writes files now (rows in sample-key "
        "order, key ranges in the footer) and run the drift case on it; deleted after",
    )
    parser.add_argument(
        "--pools",
        nargs="+",
        default=["default"],
        choices=["default", "system"],
        help="Arrow memory pools the compacted layout's drift runs with (ARROW_DEFAULT_MEMORY_POOL)",
    )
    parser.add_argument("--s3", action="store_true", help="also the compaction case on a moto S3 server (100k)")
    parser.add_argument(
        "--writers", type=int, default=4, help="gateway replicas writing the log (360 files an hour each)"
    )
    parser.add_argument("--root", default="/tmp/monvol-log")
    parser.add_argument("--out", type=Path, default=Path("bench/results/monitor_volume.json"))
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--current", default="shifted", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="sample", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(CASES[args.case](args.root, args.current, args.mode)))
        return

    results = []

    def record(size: int, row: dict) -> None:
        row = {"size": size, "writers": args.writers, **row}
        results.append(row)
        print(json.dumps(row), flush=True)

    for size in args.sizes:
        tag = str(size) if args.writers == 4 else f"{size}-w{args.writers}"  # 4 writers: the logs made so far
        root = f"{args.root}/{tag}"
        names = tuple(HOURS) if size < 10_000_000 else ("reference", "shifted")
        started = time.perf_counter()
        counts = generate(root, size, names, writers=args.writers)
        print(f"log {root}: {counts} ({time.perf_counter() - started:.0f} s)", flush=True)
        for current in [n for n in ("shifted", "quiet") if n in names]:
            if args.drift_sizes is not None and size not in args.drift_sizes:
                continue
            if current == "quiet" and size not in args.quiet_sizes:
                continue
            record(size, run_case("drift", root, current))
            if size in args.full_sizes:
                record(size, run_case("drift", root, current, "full", kill_gb=args.baseline_kill_gb))
            if size in args.baseline_sizes and current == "shifted":
                record(size, run_case("drift", root, current, "baseline", kill_gb=args.baseline_kill_gb))
        if size in args.compacted_sizes:
            compacted = f"{args.root}-compacted-{tag}"
            shutil.rmtree(compacted, ignore_errors=True)
            shutil.copytree(root, compacted, copy_function=os.link)  # the inputs cost no disk; compaction unlinks
            try:
                record(size, {**run_case("compact", compacted), "layout": "compacted"})
                for current in [n for n in ("shifted", "quiet") if n in names]:
                    if current == "shifted" or size in args.quiet_sizes:
                        for pool in args.pools:
                            env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"} if pool == "system" else None
                            record(
                                size,
                                {
                                    **run_case("drift", compacted, current, env=env),
                                    "layout": "compacted",
                                    "arrow_pool": pool,
                                },
                            )
            finally:
                shutil.rmtree(compacted, ignore_errors=True)
        if size in args.keyed_sizes:
            keyed = f"{args.root}-keyed-{tag}"
            shutil.rmtree(keyed, ignore_errors=True)
            try:
                started = time.perf_counter()
                record(
                    size,
                    {
                        "case": "rewrite_keyed",
                        "layout": "keyed",
                        **rewrite_keyed(root, keyed),
                        "rewrite_s": round(time.perf_counter() - started, 1),
                    },
                )
                for current in [n for n in ("shifted", "quiet") if n in names]:
                    if current == "shifted" or size in args.quiet_sizes:
                        record(size, {**run_case("drift", keyed, current), "layout": "keyed"})
            finally:
                shutil.rmtree(keyed, ignore_errors=True)
        if size in args.export_sizes:
            record(size, run_case("export", root))
        if size in args.compaction_sizes:
            scratch = tempfile.mkdtemp(prefix=f"monvol-compact-{size}-", dir="/tmp")
            try:
                _copy_hour(Path(root), scratch, "reference")
                record(size, run_case("compaction", scratch, mode="local"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        if args.s3 and size == min(args.sizes):
            moto, env = _moto(18_733)
            os.environ.update(env)  # this process uploads the hour: signed requests need the credentials here too
            try:
                import boto3

                boto3.client(
                    "s3",
                    endpoint_url=env["AWS_ENDPOINT_URL"],
                    region_name="us-east-1",
                    aws_access_key_id="test",
                    aws_secret_access_key="test",
                ).create_bucket(Bucket="monvol")
                _copy_hour(Path(root), "s3://monvol/log", "reference", env)
                record(size, run_case("compaction", "s3://monvol/log", mode="s3", env=env))
            finally:
                moto.terminate()
                moto.wait()
    report = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "load_avg_1m_at_end": os.getloadavg()[0],
        "sample_rows": SAMPLE_ROWS,
        "export_rows": EXPORT_ROWS,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

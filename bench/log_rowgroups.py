"""The request log's row-group size: bytes on disk, the writer's CPU, and the text a sampled read decodes.

    python bench/log_rowgroups.py [--root /tmp/monvol-log] [--files 12] [--out bench/results/log_rowgroups.json]

Takes ``--files`` files of the reference hour of bench/monitor_volume.py's 1M and 10M logs (written as older
gateways did: one row group a file, time order) and writes each again as the gateway writes files now
(service/requestlog/store.encode: rows in sample-key order, row groups of ``samplekey.ROW_GROUP_ROWS`` rows,
key ranges in the footer) with that constant set to 256 ... 4,096 rows. Per size: bytes against the old file
(baseline, same rows), CPU µs a row to write it (old vs encode, the same run), and the share of rows whose
row group a 10,000-row sample of the hour reads (row groups whose smallest key is under the sample's
threshold, 10,000 / rows-in-the-hour of the key space; the old layout: every file holds sampled rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = (256, 512, 1024, 2048, 4096)
SAMPLE = 10_000


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.volume_log import DAY
    from loragate.common import logschema, samplekey
    from loragate.service.requestlog.store import encode

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/monvol-log")
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("bench/results/log_rowgroups.json"))
    args = parser.parse_args()

    results = []
    for hour_rows in (1_000_000, 10_000_000):
        directory = Path(args.root) / str(hour_rows) / "requests" / f"date={DAY:%Y-%m-%d}"
        files = sorted(directory.glob(f"*-{DAY:%Y%m%d}T10*.parquet"))
        files = files[:: max(1, len(files) // args.files)][: args.files]
        tables = [pq.read_table(f) for f in files]
        rows = sum(t.num_rows for t in tables)
        threshold = int(2**64 * SAMPLE / hour_rows)
        old_bytes, old_cpu = 0, 0.0
        for table in tables:
            repeating = [n for n in table.column_names if n not in logschema.DISTINCT_COLUMNS]
            started = time.process_time()
            buffer = pa.BufferOutputStream()
            pq.write_table(table, buffer, compression="zstd", use_dictionary=repeating, write_statistics=repeating)
            old_cpu += time.process_time() - started
            old_bytes += buffer.getvalue().size
        for size in SIZES:
            samplekey.ROW_GROUP_ROWS = size  # what-if: the writer reads the constant at each call
            new_bytes, new_cpu, read_rows = 0, 0.0, 0
            for table in tables:
                started = time.process_time()
                data = encode(table)
                new_cpu += time.process_time() - started
                new_bytes += data.size
                meta = pq.ParquetFile(pa.BufferReader(data)).metadata
                ranges = samplekey.read_ranges(meta)
                assert ranges is not None
                read_rows += sum(meta.row_group(i).num_rows for i, (low, _) in enumerate(ranges) if low <= threshold)
            row = {
                "hour_rows": hour_rows,
                "files": len(files),
                "rows_per_file": rows // len(files),
                "row_group_rows": size,
                "bytes_old": old_bytes,
                "bytes_new": new_bytes,
                "bytes_ratio": round(new_bytes / old_bytes, 4),
                "write_cpu_us_per_row_old": round(old_cpu / rows * 1e6, 2),
                "write_cpu_us_per_row_new": round(new_cpu / rows * 1e6, 2),
                "text_rows_read_share_new": round(read_rows / rows, 4),
                "text_rows_read_share_old": 1.0,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "script": "bench/log_rowgroups.py",
        "machine": f"{os.cpu_count()} cpus, shared",
        "load_avg_1m_at_end": os.getloadavg()[0],
        "sample": SAMPLE,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

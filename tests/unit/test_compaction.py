"""Compaction of the request log (monitoring/compaction.py) with writers, readers and other compactors running."""

import threading
import time
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from loragate.common.objectstore import filesystem
from loragate.monitoring.compaction import Compactor
from loragate.monitoring.logfiles import COVERS_KEY
from loragate.monitoring.logkeys import sample_keys
from loragate.common.samplekey import read_ranges
from loragate.monitoring.sources import RequestLog, Window
from tests.unit.test_logscan import HOUR, hour_frame, write_files

NOW = (HOUR + timedelta(hours=2)).timestamp()  # the 10:00 hour closed, 12:00 open
WINDOW = Window(HOUR, HOUR + timedelta(hours=1))


def at(frame: pd.DataFrame, moment: datetime) -> pd.DataFrame:
    """The frame's rows a second apart from ``moment`` on."""
    frame = frame.copy()
    frame["timestamp"] = pd.to_datetime([moment + timedelta(seconds=i) for i in range(len(frame))], utc=True)
    return frame


def compactor(root, **options) -> Compactor:
    return Compactor(*filesystem(str(root)), **options)


def ids(root, window=WINDOW) -> list[tuple[str, str]]:
    frame = RequestLog(root).requests(window, columns=("request_id", "timestamp", "role"), role=None)
    return sorted(zip(frame.request_id, frame.role))


def names(root) -> list[str]:
    return sorted(p.name for p in (root / "requests" / "date=2026-11-02").iterdir())


def test_compaction_keeps_every_row_once_is_idempotent_and_keeps_the_sample(tmp_path):
    for writer in range(3):
        write_files(tmp_path, hour_frame(400, writer), writer=f"gw{writer}", flush_s=120)
    before, sample = ids(tmp_path), RequestLog(tmp_path).sample(WINDOW, per_variant=100).frame
    files = len(names(tmp_path))
    results = compactor(tmp_path, row_group_rows=64, buckets=8).run(("requests",), now=NOW)
    done = [r for r in results if r.status == "compacted"]
    assert len(done) == 1 and done[0].inputs == files - 3 and done[0].deleted == files - 3  # 3: flushed at 11:00
    assert len(done[0].outputs) == 3  # one per writer
    assert ids(tmp_path) == before and len(before) == 1200
    after = RequestLog(tmp_path).sample(WINDOW, per_variant=100).frame
    assert list(after.request_id) == list(sample.request_id)  # the same sample from the compacted files
    for name in done[0].outputs:  # every row group holds one sample-key bucket (top 3 bits: 8 buckets)
        reader = pq.ParquetFile(tmp_path / "requests" / "date=2026-11-02" / name)
        buckets = [
            set((sample_keys(reader.read_row_group(i, columns=["request_id"])["request_id"]) >> np.uint64(61)).tolist())
            for i in range(reader.num_row_groups)
        ]
        assert all(len(b) == 1 for b in buckets) and len(buckets) >= 8
        ranges = read_ranges(reader.metadata)  # each row group's key range, as the reader skips by it
        assert ranges is not None and all(reader.metadata.row_group(i).num_rows <= 64 for i in range(len(ranges)))
        assert ranges == [
            (int(k.min()), int(k.max()))
            for k in (
                sample_keys(reader.read_row_group(i, columns=["request_id"])["request_id"])
                for i in range(reader.num_row_groups)
            )
        ]
    again = compactor(tmp_path, row_group_rows=64, buckets=8).run(("requests",), now=NOW)
    assert [r.status for r in again if r.hour == "20261102T10"] == ["skipped"] and ids(tmp_path) == before


def test_sampled_read_of_a_compacted_hour_reads_few_row_groups(tmp_path):
    write_files(tmp_path, hour_frame(4000, 1), flush_s=10)
    compactor(tmp_path, row_group_rows=256, buckets=16).run(("requests",), now=NOW)
    scan = RequestLog(tmp_path).scan(WINDOW, per_variant=100)
    assert sum(t.num_rows for t in scan) == 100
    groups = sum(
        pq.ParquetFile(p).metadata.num_row_groups
        for p in (tmp_path / "requests" / "date=2026-11-02").glob("compacted-*")
    )
    assert scan.stats.row_groups_read <= 2 < groups  # the first bucket's row groups only


def test_late_file_and_crash_leftovers(tmp_path):
    write_files(tmp_path, hour_frame(300, 1), flush_s=60)
    directory = tmp_path / "requests" / "date=2026-11-02"
    keep = {p.name: p.read_bytes() for p in directory.iterdir()}
    compactor(tmp_path).run(("requests",), now=NOW)
    first = [n for n in names(tmp_path) if n.startswith("compacted-")]
    # a crash after the compacted file was written: its inputs are still there -> read once, deleted next run
    for name, data in keep.items():
        (directory / name).write_bytes(data)
    assert len(ids(tmp_path)) == 300
    # a file of the closed hour arriving late (a writer's clock behind): read as it is, merged next run
    write_files(tmp_path, at(hour_frame(5, 2), HOUR + timedelta(minutes=30, seconds=5)), writer="gw0", flush_s=60)
    assert len(ids(tmp_path)) == 305
    compactor(tmp_path).run(("requests",), now=NOW)
    left = names(tmp_path)
    assert len(ids(tmp_path)) == 305 and not any(n.startswith("gw0-20261102T10") for n in left)
    newest = [n for n in left if n.startswith("compacted-")]
    assert newest != first and len(newest) == 1
    covers = pq.ParquetFile(directory / newest[0]).metadata.metadata[COVERS_KEY].decode()
    assert first[0] in covers and all(name in covers for name in keep if "T10" in name)  # transitively


def test_torn_compacted_file_replaces_nothing(tmp_path):
    write_files(tmp_path, hour_frame(200, 1), flush_s=60)
    before = ids(tmp_path)
    (tmp_path / "requests" / "date=2026-11-02" / "compacted-20261102T10-0123456789abcdef0123.parquet").write_bytes(
        b"PAR1 torn upload"
    )
    assert ids(tmp_path) == before


def test_one_compacted_file_per_writer_and_hour(tmp_path):
    for writer in ("gw-a-1", "gw-b-2"):
        write_files(tmp_path, hour_frame(300, len(writer) + ord(writer[3])), writer=writer, flush_s=60)
    before = ids(tmp_path)
    results = compactor(tmp_path).run(("requests",), now=NOW)
    outputs = sorted(o for r in results for o in r.outputs if r.hour == "20261102T10")
    assert [o.split("-", 2)[2].rsplit("-", 1)[0] for o in outputs] == ["gw-a-1", "gw-b-2"]
    assert ids(tmp_path) == before


def test_two_listings_of_one_hour_are_nested_and_the_larger_wins(tmp_path):
    """A compactor that listed before a late file arrived and one that listed after: both files exist for a
    moment; the reader takes the one that names more, and the next round deletes the other."""
    write_files(tmp_path, hour_frame(200, 1), flush_s=60)
    directory = tmp_path / "requests" / "date=2026-11-02"
    saved = {p.name: p.read_bytes() for p in directory.iterdir()}
    compactor(tmp_path).run(("requests",), now=NOW)
    smaller = [p for p in directory.iterdir() if p.name.startswith("compacted-")][0]
    smaller_bytes = smaller.read_bytes()
    for name, data in saved.items():  # as if the second compactor listed these before the first deleted them
        (directory / name).write_bytes(data)
    smaller.unlink()
    write_files(tmp_path, at(hour_frame(3, 2), HOUR + timedelta(minutes=5)), writer="gw0", flush_s=60)
    compactor(tmp_path).run(("requests",), now=NOW)
    smaller.write_bytes(smaller_bytes)  # the first compactor's file, written last
    assert len(ids(tmp_path)) == 203
    compactor(tmp_path).run(("requests",), now=NOW)
    assert not smaller.exists() and len(ids(tmp_path)) == 203


@pytest.mark.slow  # writers, readers and two compactors at once, ~35 s
def test_compaction_with_writers_readers_and_compactors_running(tmp_path):
    """Gateways keep writing the open hour (and a late file into the closed one) while two monitors compact
    and readers read: a reader never sees a row twice or misses one; ids identical before and after."""
    for writer in range(4):
        write_files(tmp_path, hour_frame(250, writer), writer=f"gw{writer}", flush_s=20)
    closed_before = ids(tmp_path)
    open_hour = HOUR + timedelta(hours=2)
    written: list[str] = []
    late: list[str] = []
    stop = threading.Event()
    errors: list[str] = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                import traceback

                errors.append("".join(traceback.format_exception(exc))[-3000:])

        return run

    def writer(n: int):
        seq = 0
        while not stop.is_set() and seq < 150:
            frame = at(hour_frame(20, 10_000 * (n + 1) + seq), open_hour + timedelta(seconds=seq))
            write_files(tmp_path, frame, writer=f"live{n}-{seq}", flush_s=3600)
            written.extend(frame.request_id)
            seq += 1
            time.sleep(0.05)

    def late_writer():
        time.sleep(0.2)
        frame = at(hour_frame(7, 99), HOUR + timedelta(minutes=10))
        write_files(tmp_path, frame, writer="slowupload", flush_s=60)
        late.extend(frame.request_id)

    def compacting():
        for _ in range(4):
            compactor(tmp_path, row_group_rows=128, buckets=4).run(("requests",), now=NOW)

    seen: list[int] = []

    def reading():
        expected = set(closed_before)
        while not stop.is_set():
            got = ids(tmp_path)
            assert len(got) == len(set(got)), "a row read twice"
            assert expected <= set(got), "a row missed"
            assert set(got) <= expected | {(i, "primary") for i in late}
            seen.append(len(got))

    threads = [
        threading.Thread(target=guarded(f))
        for f in (lambda: writer(0), lambda: writer(1), late_writer, reading, reading)
    ]
    compactors = [threading.Thread(target=guarded(compacting)) for _ in range(2)]
    for t in threads + compactors:
        t.start()
    for t in compactors:
        t.join()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, "\n".join(errors)
    assert len(seen) >= 2
    compactor(tmp_path).run(("requests",), now=NOW)  # a last round: the late file is merged too
    assert ids(tmp_path) == sorted(closed_before + [(i, "primary") for i in late])
    open_ids = ids(tmp_path, Window(open_hour, open_hour + timedelta(hours=1)))
    assert sorted(i for i, _ in open_ids) == sorted(written)  # the open hour is never compacted, never lost
    left = names(tmp_path)
    compacted = sorted(n.split("-")[2] for n in left if n.startswith("compacted-20261102T10"))
    assert compacted == ["gw0", "gw1", "gw2", "gw3", "slowupload"]  # one per writer
    assert not [n for n in left if n.startswith(("gw", "slowupload")) and "-20261102T10" in n]


def test_the_monitor_compacts_on_its_own_schedule(tmp_path):
    import asyncio

    from loragate.monitoring.config import MonitorConfig
    from loragate.monitoring.service import Monitor

    write_files(tmp_path / "log", hour_frame(100, 1), flush_s=300)
    config = MonitorConfig.model_validate(
        {
            "request_log": str(tmp_path / "log"),
            "state_file": str(tmp_path / "s"),
            "compaction": {"interval_s": 60, "grace_s": 600, "days": 40},
        }
    )
    monitor = Monitor(config)
    results = asyncio.run(monitor.compact(now=NOW))
    assert [r.status for r in results if r.hour == "20261102T10"] == ["compacted"]
    assert len(ids(tmp_path / "log")) == 100


def test_a_torn_writer_file_is_left_out_and_the_rest_compacted(tmp_path):
    write_files(tmp_path, hour_frame(200, 1), flush_s=300)
    torn = tmp_path / "requests" / "date=2026-11-02" / "gw0-20261102T103000500Z-999999.parquet"
    torn.write_bytes(b"PAR1 half an upload")
    before = ids(tmp_path)
    results = compactor(tmp_path).run(("requests",), now=NOW)
    assert [r.status for r in results if r.hour == "20261102T10"] == ["compacted"]
    assert torn.exists() and ids(tmp_path) == before

"""Bounded window reads (monitoring/logscan.py, logfiles.py): projection, pruning, the deterministic sample."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from loragate.common import logschema, samplekey
from loragate.common.objectstore import filesystem
from loragate.monitoring.logfiles import written_before
from loragate.monitoring.logkeys import sample_keys
from loragate.monitoring.sources import RequestLog, Window
from loragate.service.requestlog.store import encode
from tests.synthetic import requests_frame

HOUR = datetime(2026, 11, 2, 10, tzinfo=timezone.utc)


def write_files(
    root, frame: pd.DataFrame, *, writer: str = "gw0", flush_s: int = 60, table: str = "requests", keyed: bool = False
):
    """Files as the gateway names them: one per writer and flush, stamped with the flush time. ``keyed``: laid
    out as the gateway writes them now (service/requestlog/store.encode); else one row group in time order,
    as older gateways wrote them."""
    frame = frame.sort_values("timestamp")
    flushes = (frame["timestamp"].astype("int64") // 10**6 // (flush_s * 1000) + 1) * flush_s
    for seq, (flush, part) in enumerate(frame.groupby(flushes)):
        stamp = datetime.fromtimestamp(int(flush), timezone.utc)
        directory = root / table / f"date={part['timestamp'].iloc[0]:%Y-%m-%d}"
        directory.mkdir(parents=True, exist_ok=True)
        data = logschema.conform(
            pa.Table.from_pandas(
                part.assign(timestamp=part["timestamp"].astype("datetime64[ms, UTC]")), preserve_index=False
            ),
            table,
        )
        path = directory / f"{writer}-{stamp:%Y%m%dT%H%M%S}000Z-{seq:06d}.parquet"
        if keyed:
            path.write_bytes(encode(data.select(list(logschema.COLUMNS[table]))).to_pybytes())
        else:
            pq.write_table(data.select(list(logschema.COLUMNS[table])), path)


def hour_frame(n: int, seed: int, variant: str = "v1", start: datetime = HOUR) -> pd.DataFrame:
    frame = requests_frame(n, seed=seed, variant=variant, start=start.timestamp(), span_s=3600)
    frame["request_id"] = [f"{seed}-{i:08x}" for i in range(n)]
    return frame


def test_sample_keys_are_stable_uniform_and_hash_the_whole_id():
    ids = pa.array([f"req-{i}" for i in range(200_000)])
    keys = sample_keys(ids)
    assert keys.dtype == np.uint64 and len(np.unique(keys)) == len(keys)
    assert np.array_equal(keys[:5], sample_keys(pa.array(["req-0", "req-1", "req-2", "req-3", "req-4"])))
    # uniform: each of 16 top-bit buckets holds 1/16 of the ids (+- 5 sigma)
    counts = np.bincount((keys >> np.uint64(60)).astype(int), minlength=16)
    assert np.all(np.abs(counts - 12_500) < 5 * np.sqrt(12_500))
    # a fixed value: the sample of a log does not change across versions or machines
    assert int(sample_keys(pa.array(["abc"]))[0]) == int(sample_keys(pa.array(["abc"], pa.large_string()))[0])
    assert sample_keys(pa.array(["abc", "abd", "bbc", "", None])).tolist()[3] == sample_keys(pa.array([""]))[0]
    assert len(set(sample_keys(pa.array(["abc", "abd", "bbc", "acb"])).tolist())) == 4
    # pinned: the keys the logs written so far were sampled and compacted by (the numpy implementation's; the
    # Arrow one the gateway shares gives the same, past the 256-byte position cap too)
    assert sample_keys(pa.array(["abc", "", "x" * 300])).tolist() == [10422987716737944273, 0, 18077049367589235415]
    assert sample_keys(pa.chunked_array([pa.array(["abc"]), pa.array([], pa.string())]).slice(0, 1)).tolist() == [
        10422987716737944273
    ]


def test_sample_is_capped_deterministic_nested_and_counts_the_window(tmp_path):
    write_files(tmp_path, pd.concat([hour_frame(3000, 1), hour_frame(600, 2, "v2")]))
    log = RequestLog(tmp_path)
    window = Window(HOUR, HOUR + timedelta(hours=1))
    a = log.sample(window, "support", per_variant=500)
    b = RequestLog(tmp_path, parallel=1).sample(window, "support", per_variant=500)
    assert a.window_rows == {"v1": 3000, "v2": 600}
    assert a.sampled_rows == {"v1": 500, "v2": 500} and len(a.frame) == 1000
    assert list(a.frame.request_id) == list(b.frame.request_id)  # same rows, same (time) order
    assert a.frame.timestamp.is_monotonic_increasing
    # the sample is the rows of smallest key: exactly what a full read + sort by key gives
    full = log.requests(window, "support")
    for variant in ("v1", "v2"):
        ids = full[full.variant == variant].request_id
        smallest = set(ids.iloc[np.argsort(sample_keys(pa.array(ids)))[:500]])
        assert set(a.frame[a.frame.variant == variant].request_id) == smallest
    bigger = log.sample(window, "support", per_variant=800)
    assert set(a.frame.request_id) <= set(bigger.frame.request_id)  # nested: a larger cap only adds rows
    # one sample for the route: each variant in its share of the window
    mixed = log.sample(window, "support", per_variant=720, by_variant=False)
    assert len(mixed.frame) == 720 and mixed.window_rows == {"v1": 3000, "v2": 600}
    assert 60 <= (mixed.frame.variant == "v2").sum() <= 180  # ~1/6 of 720 = 120
    # uncapped variants are read whole
    assert log.sample(window, "support", "v2", per_variant=5000).sampled_rows == {"v2": 600}


def test_the_gateway_writes_rows_in_key_order_with_each_row_groups_key_range(tmp_path):
    frame = hour_frame(2 * samplekey.ROW_GROUP_ROWS + 300, 20)
    write_files(tmp_path, frame, flush_s=3600, keyed=True)
    (path,) = (tmp_path / "requests" / "date=2026-11-02").iterdir()
    reader = pq.ParquetFile(path)
    sizes = [
        samplekey.FIRST_GROUP_ROWS,
        samplekey.ROW_GROUP_ROWS,
        samplekey.ROW_GROUP_ROWS,
        300 - samplekey.FIRST_GROUP_ROWS,
    ]
    assert [reader.metadata.row_group(i).num_rows for i in range(reader.num_row_groups)] == sizes
    keys = sample_keys(reader.read(columns=["request_id"])["request_id"])
    assert np.all(np.diff(keys.astype(np.float64)) >= 0)  # key order
    starts = np.cumsum([0, *sizes])
    assert samplekey.read_ranges(reader.metadata) == [
        (int(keys[a]), int(keys[b - 1])) for a, b in zip(starts[:-1], starts[1:])
    ]
    assert sorted(reader.read(columns=["request_id"])["request_id"].to_pylist()) == sorted(frame.request_id)


def test_key_ordered_files_give_the_same_sample_and_skip_the_ids_of_most_row_groups(tmp_path):
    """The same rows written in the old layout (one time-ordered row group a file) and in the gateway's
    (key order, key ranges in the footer): the same sample and counts; the new one decodes few ids."""
    frame = pd.concat([hour_frame(12_000, 21), hour_frame(3_000, 22, "v2")])
    window = Window(HOUR, HOUR + timedelta(hours=1))
    scans = {}
    for keyed in (False, True):
        root = tmp_path / str(keyed)
        write_files(root, frame, flush_s=900, keyed=keyed)  # 4 files of ~3,750 rows
        for by_variant in (True, False):
            scan = RequestLog(root).scan(
                window, per_variant=300, by_variant=by_variant, columns=("request_id", "variant", "prompt_text")
            )
            scans[keyed, by_variant] = (sorted(r for t in scan for r in t["request_id"].to_pylist()), scan.stats)
    for by_variant in (True, False):
        (old, old_stats), (new, new_stats) = scans[False, by_variant], scans[True, by_variant]
        assert new == old and len(new) == (600 if by_variant else 300)
        assert new_stats.window_rows == old_stats.window_rows == {"v1": 12_000, "v2": 3_000}
        assert new_stats.sampled_rows == old_stats.sampled_rows
        assert old_stats.row_groups_counted == 0 and old_stats.row_groups_read == 4
        # 4 files x 5 row groups (256 rows, then 1,024s): the text is read from at most two row groups a file
        # (how many are only counted depends on which files finish first: see the next test)
        assert new_stats.row_groups_read <= 8


def test_the_key_pass_only_counts_the_row_groups_above_the_thresholds_it_knows(tmp_path):
    """One keyed file, the window's thresholds given: the row groups whose smallest key is above them are
    counted (every row in the window) but their ids are not decoded; the candidates are exactly the rows under."""
    from loragate.monitoring.logfiles import LogFiles
    from loragate.monitoring.logkeys import Filter, KeyPass

    frame = hour_frame(4_000, 23)
    write_files(tmp_path, frame, flush_s=3600, keyed=True)
    (path,) = (tmp_path / "requests" / "date=2026-11-02").iterdir()
    (file,) = LogFiles(*filesystem(str(tmp_path))).listing([str(path.parent)])
    keys = np.sort(sample_keys(pa.array(frame.request_id)))
    where = Filter(HOUR, HOUR + timedelta(hours=1), role=None)
    ranges = samplekey.read_ranges(pq.ParquetFile(path).metadata)
    for limit in (int(keys[99]), int(keys[2_000]), None):
        known = {} if limit is None else {"v1": limit}  # None: no threshold known yet
        found = KeyPass(pafs.LocalFileSystem(), where, per_variant=100_000, by_variant=True, thresholds=lambda: known)(
            file
        )
        assert found.counts == {"v1": 4_000}
        assert found.counted_only == sum(1 for low, _ in ranges if limit is not None and low > limit)
        expected = 4_000 if limit is None else int(np.sum(keys <= limit))
        assert len(found.keys) == expected and (limit is None or int(found.keys.max()) <= limit)


def test_sample_is_a_fair_sample(tmp_path):
    frame = hour_frame(20_000, 3)
    write_files(tmp_path, frame)
    sample = RequestLog(tmp_path).sample(Window(HOUR, HOUR + timedelta(hours=1)), per_variant=2000).frame
    # every quarter of the hour in its share; latency's mean within 4 standard errors
    quarters = sample.timestamp.dt.minute // 15
    assert all(abs(quarters.value_counts()[q] - 500) < 4 * np.sqrt(500) for q in range(4))
    sd = frame.latency_s.std() / np.sqrt(2000)
    assert abs(sample.latency_s.mean() - frame.latency_s.mean()) < 4 * sd


def test_projection_reads_only_the_columns_asked(tmp_path):
    write_files(tmp_path, hour_frame(200, 4))
    got = RequestLog(tmp_path).sample(
        Window(HOUR, HOUR + timedelta(hours=1)), columns=("request_id", "timestamp", "latency_s")
    )
    assert list(got.frame.columns) == ["request_id", "timestamp", "latency_s"] and len(got.frame) == 200


def test_files_written_before_the_window_are_not_opened_and_late_rows_are_kept(tmp_path):
    write_files(tmp_path, hour_frame(300, 5, start=HOUR - timedelta(hours=1)), flush_s=600)
    write_files(tmp_path, hour_frame(300, 6), flush_s=600)
    directory = tmp_path / "requests" / "date=2026-11-02"
    before = sorted(p for p in directory.iterdir() if written_before(p.name) <= HOUR)
    assert before
    for path in before:  # unreadable: opening one would count it as torn
        path.write_bytes(b"not parquet")
    # a row of the window flushed 5 minutes after the window ended (a long stream) is still read
    late = hour_frame(1, 7, start=HOUR + timedelta(minutes=59, seconds=50))
    late["timestamp"] = pd.Timestamp(HOUR + timedelta(minutes=59, seconds=59))
    data = logschema.conform(
        pa.Table.from_pandas(
            late.assign(timestamp=late["timestamp"].astype("datetime64[ms, UTC]")), preserve_index=False
        ),
        "requests",
    )
    pq.write_table(data, directory / "gw9-20261102T110500000Z-000000.parquet")
    scan = RequestLog(tmp_path).scan(Window(HOUR, HOUR + timedelta(hours=1)))
    rows = sum(t.num_rows for t in scan)
    assert rows == 301 and scan.stats.unreadable == [] and scan.stats.window_rows == {"v1": 301}


def test_ids_filter_and_roles(tmp_path):
    frame = hour_frame(400, 8)
    shadows = frame.iloc[::10].assign(role="shadow", variant="v2")
    write_files(tmp_path, pd.concat([frame.assign(role="primary"), shadows]))
    log, window = RequestLog(tmp_path), Window(HOUR, HOUR + timedelta(hours=1))
    sample = log.sample(window, role="shadow", per_variant=15)
    assert sample.window_rows == {"v2": 40} and len(sample.frame) == 15
    primaries = log.requests(window, ids=frozenset(sample.frame.request_id))
    assert sorted(primaries.request_id) == sorted(sample.frame.request_id)  # every sampled shadow keeps its pair
    assert set(primaries.role) == {"primary"}


@pytest.mark.parametrize("per_variant", [None, 50])
def test_feedback_and_old_files_read(tmp_path, per_variant):
    old = hour_frame(100, 9).drop(columns=["prompt_messages"])
    old["timestamp"] = old["timestamp"].astype("datetime64[ms, UTC]")
    directory = tmp_path / "requests" / "date=2026-11-02"
    directory.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pandas(old.drop(columns=["schema_version"]), preserve_index=False),
        directory / "old-writer.parquet",
    )  # a name without a flush stamp: always opened
    got = RequestLog(tmp_path).sample(Window(HOUR, HOUR + timedelta(hours=1)), per_variant=per_variant)
    assert len(got.frame) == (100 if per_variant is None else 50)
    assert set(got.frame.schema_version) == {1} and set(got.frame.role) == {"primary"}


def test_drift_report_gives_the_window_rows_beside_the_sample(tmp_path, capsys):
    import json

    from loragate.cli import main

    write_files(tmp_path / "log", hour_frame(700, 11))
    write_files(tmp_path / "log", hour_frame(650, 12, start=HOUR + timedelta(hours=1)))
    code = main(
        [
            "drift",
            "--request-log",
            str(tmp_path / "log"),
            "--route",
            "support",
            "--since",
            (HOUR + timedelta(hours=1)).isoformat(),
            "--until",
            (HOUR + timedelta(hours=2)).isoformat(),
            "--sample-rows",
            "200",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ]
    )
    assert code in (0, 1)
    summary = json.loads(capsys.readouterr().out)
    assert (summary["reference_rows"], summary["current_rows"]) == (200, 200)
    assert (summary["reference_window_rows"], summary["current_window_rows"]) == (700, 650)


def test_scans_use_one_thread_a_core_on_local_disk_and_more_on_an_object_store(tmp_path, monkeypatch):
    import os

    from loragate.monitoring.sources import default_parallel

    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert default_parallel(str(tmp_path)) == default_parallel(f"file://{tmp_path}") == 3
    assert default_parallel("s3://bucket/log") == 8  # a file there is requests' latency: overlap them
    assert RequestLog(tmp_path).parallel == 3 and RequestLog(tmp_path, parallel=1).parallel == 1

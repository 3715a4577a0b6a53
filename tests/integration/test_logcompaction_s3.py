"""Compaction and sampled reads of the request log on S3 (a moto server): the same guarantees as on disk."""

from __future__ import annotations

import sys
import threading
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest
from pyarrow.fs import FileSelector

from loragate.common import logschema
from loragate.common.objectstore import S3Options, filesystem
from loragate.monitoring.compaction import Compactor
from loragate.monitoring.sources import RequestLog, Window
from tests.processes import Service, free_port, wait_http
from tests.unit.test_logscan import HOUR, hour_frame

NOW = (HOUR + timedelta(hours=2)).timestamp()
WINDOW = Window(HOUR, HOUR + timedelta(hours=1))
ROOT = "s3://loragate-logs/prod"


@pytest.fixture
def s3(tmp_path, monkeypatch):
    port = free_port()
    service = Service([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], tmp_path / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", service.process, 30, tmp_path / "moto.log")
        for name, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_EC2_METADATA_DISABLED": "true",
            "LORAGATE_REQUEST_LOG_S3_ENDPOINT": endpoint,
            "LORAGATE_REQUEST_LOG_S3_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="loragate-logs")
        yield filesystem(ROOT, S3Options.resolve())[0]
    finally:
        service.stop()


def put_files(fs, frame, writer: str, flush_s: int = 120) -> None:
    """Files as the gateway names them, uploaded (one PUT each)."""
    import pyarrow as pa

    frame = frame.sort_values("timestamp")
    flushes = (frame["timestamp"].astype("int64") // 10**6 // (flush_s * 1000) + 1) * flush_s
    for seq, (flush, part) in enumerate(frame.groupby(flushes)):
        stamp = datetime.fromtimestamp(int(flush), timezone.utc)
        data = logschema.conform(
            pa.Table.from_pandas(
                part.assign(timestamp=part["timestamp"].astype("datetime64[ms, UTC]")), preserve_index=False
            ),
            "requests",
        )
        with fs.open_output_stream(
            f"loragate-logs/prod/requests/date=2026-11-02/{writer}-{stamp:%Y%m%dT%H%M%S}000Z-{seq:06d}.parquet"
        ) as out:
            pq.write_table(data.select(list(logschema.REQUEST_COLUMNS)), out)


def ids() -> list[tuple[str, str]]:
    frame = RequestLog(ROOT).requests(WINDOW, columns=("request_id", "timestamp", "role"), role=None)
    return sorted(zip(frame.request_id, frame.role))


def test_compaction_on_s3_with_readers_running(s3):
    for writer in range(2):
        put_files(s3, hour_frame(300, writer), f"gw{writer}")
    before, sample = ids(), RequestLog(ROOT).sample(WINDOW, per_variant=50).frame
    stop, problems = threading.Event(), []

    def reading():
        while not stop.is_set():
            got = ids()
            if len(got) != len(set(got)) or set(got) != set(before):
                problems.append(len(got))

    reader = threading.Thread(target=reading)
    reader.start()
    try:
        results = Compactor(*filesystem(ROOT, S3Options.resolve()), row_group_rows=64, buckets=4).run(
            ("requests",), now=NOW
        )
    finally:
        stop.set()
        reader.join()
    assert not problems
    done = [r for r in results if r.status == "compacted"]
    assert len(done) == 1 and len(done[0].outputs) == 2
    keys = [
        i.path.rsplit("/", 1)[-1] for i in s3.get_file_info(FileSelector("loragate-logs/prod/requests", recursive=True))
    ]
    assert sum(k.startswith("compacted-20261102T10") for k in keys) == 2
    assert ids() == before
    assert list(RequestLog(ROOT).sample(WINDOW, per_variant=50).frame.request_id) == list(sample.request_id)

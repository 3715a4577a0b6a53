"""Nothing one batch does stops the request log: the stall watchdog, the bounded close, a child that dies with
its gateway (service/requestlog/sink.py, service/requestlog/process.py).

The stall is injected (``stalling_scrub``: a regex that backtracks for hours in C, holding the GIL, on any text
holding STALL), so these hold whatever the scrubber's own speed; tests/integration/test_requestlog.py sends the
real hostile prompt through the real gateway.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from loragate.service.metrics import Metrics
from loragate.service.requestlog import RequestLog
from loragate.service.requestlog.store import ParquetStore, read_table
from tests.unit.test_requestlog import PII, PII_PROMPT, _alive, chat_record, counted
from tests.unit.test_requestlog import _wait_for as _wait_briefly

ROOT = Path(__file__).resolve().parents[2]


def _wait_for(condition, timeout_s: float = 60) -> None:  # a conversion process starts in seconds when loaded
    _wait_briefly(condition, timeout_s)


def stalling_scrub(texts: list[str]) -> list[str]:
    """The real scrubber, except on a text holding STALL: catastrophic backtracking, in C, holding the GIL."""
    if any("STALL" in text for text in texts):
        re.fullmatch(r"(a|aa)+b", "a" * 200)  # 2^100 paths: never ends
    from loragate.service.requestlog.scrub import scrub_many

    return scrub_many(texts)


def stalling_sink(root: Path, metrics: Metrics, **options) -> RequestLog:
    return RequestLog(
        functools.partial(ParquetStore, str(root)),
        metrics,
        convert="process",
        scrub_texts=stalling_scrub,
        **{"flush_interval_s": 0.2, "stall_floor_s": 1.0, **options},
    )


def test_a_stalled_batch_is_written_with_the_stalling_text_withheld_and_later_records_flow(tmp_path, caplog):
    metrics = Metrics()
    sink = stalling_sink(tmp_path, metrics)
    sink.start()
    try:
        _wait_for(lambda: sink.child_pid() is not None)
        first_child = sink.child_pid()
        sink.record(chat_record("before", content=PII_PROMPT))
        sink.record(chat_record("hostile", content="STALL " + PII_PROMPT))
        sink.record(chat_record("after", content=PII_PROMPT, stream=True))
        with caplog.at_level(logging.ERROR, logger="loragate.requestlog"):
            _wait_for(lambda: counted(metrics, "written") + counted(metrics, "text_withheld") == 3)
        assert counted(metrics, "text_withheld") == 1 and counted(metrics, "written") == 2
        assert counted(metrics, "failed") == 0
        assert sink.child_pid() != first_child and not _alive(first_child)  # the stuck one was killed
        assert any("hostile" in message and "withheld" in message for message in caplog.messages), caplog.messages
        # Later records keep flowing, through the replacement conversion process, the fast way again.
        for index in range(3):
            sink.record(chat_record(f"later-{index}", content=PII_PROMPT))
        _wait_for(lambda: counted(metrics, "written") == 5)
    finally:
        sink.close()
    rows = {row["request_id"]: row for row in read_table(str(tmp_path), "requests").to_pylist()}
    assert sorted(rows) == ["after", "before", "hostile", "later-0", "later-1", "later-2"]
    hostile = rows["hostile"]
    assert hostile["prompt_text"] is None and hostile["prompt_messages"] is None and hostile["response_text"] is None
    assert hostile["status"] == 200 and hostile["route"] == "support"  # the record is kept, only its text is not
    for request_id in ("before", "after", "later-0"):  # the others keep their text, scrubbed
        text = rows[request_id]["prompt_text"]
        assert text is not None and "[EMAIL]" in text and PII["email"] not in text
    assert rows["after"]["response_text"] == "hi there "


def test_every_record_of_a_batch_that_stalls_twice_is_withheld_one_by_one(tmp_path):
    metrics = Metrics()
    sink = stalling_sink(tmp_path, metrics)
    for request_id in ("a", "STALL-1", "b", "STALL-2", "c"):
        sink.record(chat_record(request_id, content=request_id))
    sink.start()
    try:
        _wait_for(lambda: counted(metrics, "written") + counted(metrics, "text_withheld") == 5, timeout_s=90)
    finally:
        sink.close()
    assert counted(metrics, "text_withheld") == 2 and counted(metrics, "written") == 3
    rows = {row["request_id"]: row["prompt_text"] for row in read_table(str(tmp_path), "requests").to_pylist()}
    assert rows == {
        "a": "system: be brief\nuser: a",
        "STALL-1": None,
        "b": "system: be brief\nuser: b",
        "STALL-2": None,
        "c": "system: be brief\nuser: c",
    }


def test_close_is_bounded_whatever_the_conversion_process_does(tmp_path):
    metrics = Metrics()
    sink = stalling_sink(tmp_path, metrics, stall_floor_s=300.0, close_timeout_s=2.0)  # the stall is not noticed
    sink.start()
    _wait_for(lambda: sink.child_pid() is not None)
    child = sink.child_pid()
    sink.record(chat_record("ok"))
    _wait_for(lambda: counted(metrics, "written") == 1)
    sink.record(chat_record("stalls", content="STALL"))
    time.sleep(0.5)  # the batch is in the child, which is stuck
    started = time.monotonic()
    sink.close()
    took = time.monotonic() - started
    assert took < 4.0, took
    assert counted(metrics, "failed") == 1  # counted lost (and logged), not waited for
    _wait_for(lambda: not _alive(child), timeout_s=2)


def test_the_conversion_process_dies_with_a_sigkilled_gateway_even_while_stuck(tmp_path):
    """A gateway SIGKILLed from outside its process group, its child stuck in C holding the GIL (where a watch
    thread could not run): the kernel ends the child (PR_SET_PDEATHSIG)."""
    code = (
        "import functools, sys, time\n"
        "from loragate.service.metrics import Metrics\n"
        "from loragate.service.requestlog import RequestLog\n"
        "from loragate.service.requestlog.store import ParquetStore\n"
        "from tests.unit.test_requestlog import chat_record\n"
        "from tests.unit.test_requestlog_stall import stalling_scrub\n"
        "if __name__ == '__main__':\n"
        f"    sink = RequestLog(functools.partial(ParquetStore, {str(tmp_path)!r}), Metrics(), convert='process',\n"
        "                      scrub_texts=stalling_scrub, flush_interval_s=0.1, stall_floor_s=600)\n"
        "    sink.start()\n"
        "    while sink.child_pid() is None: time.sleep(0.05)\n"
        "    sink.record(chat_record('stalls', content='STALL'))\n"
        "    time.sleep(1.0)\n"
        "    print(sink.child_pid(), flush=True)\n"
        "    time.sleep(600)\n"
    )
    gateway = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True
    )  # its own process group: the kill comes from outside
    child = None
    try:
        child = int(gateway.stdout.readline())
        stat = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        assert stat[0] == "R" or float(Path(f"/proc/{child}/schedstat").read_text().split()[0]) > 0  # busy
        assert int(stat[1]) == gateway.pid
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait()
        _wait_for(lambda: not _alive(child), timeout_s=3)
    finally:
        gateway.kill()
        gateway.wait()
        if child is not None and _alive(child):  # the failure this test is about: leave no orphan behind
            os.kill(child, signal.SIGKILL)


def test_a_store_that_hangs_is_retried_not_blamed_on_a_record(tmp_path):
    metrics = Metrics()
    sink = RequestLog(
        functools.partial(HangingOnceStore, str(tmp_path)),
        metrics,
        convert="process",
        flush_interval_s=0.2,
        stall_floor_s=1.0,
    )
    sink.start()
    try:
        sink.record(chat_record("r1"))
        _wait_for(lambda: counted(metrics, "written") == 1)
    finally:
        sink.close()
    assert counted(metrics, "text_withheld") == 0
    rows = read_table(str(tmp_path), "requests").to_pylist()
    assert [row["request_id"] for row in rows] == ["r1"] and rows[0]["prompt_text"] is not None


class HangingOnceStore:
    """A ParquetStore whose first write (in each process: a marker file says which) hangs."""

    def __init__(self, root: str) -> None:
        self.store, self.marker = ParquetStore(root), Path(root) / ".hung"

    def write(self, table, rows):
        if not self.marker.exists():
            self.marker.touch()
            time.sleep(3600)
        return self.store.write(table, rows)

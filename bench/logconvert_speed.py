"""How fast the request log's conversion process turns records into Parquet: the C reader against orjson, in one run.

The records are what bench/features_overhead.py sends through the gateway (a chat request with a system
prompt and a support message holding an e-mail address, a phone number and an order number that changes;
the answer a whole JSON body, or an SSE stream of 16 chunks, a usage event and [DONE]). A batch is
converted and written the way the conversion process does it (service.requestlog.convert.Converter.write into a
ParquetStore, scrubbed text), two ways:

  orjson   every request and answer parsed by orjson (service.requestlog.rows' reading; what an install without
           the C reader does, and the reference the C reader must equal)
  c        the C reader (service/requestlog/_lognative.c) for answers and chat turns, orjson for what it declines

and the batch as it reaches the conversion process (the marshalled records the queue hands over,
service/requestlog/queue.py), through Converter.write_batch, with the C readers, two ways:

  unmarshalled  marshal.loads: a tuple a record, then the columns from them
  columns       the queue's C reader (service/requestlog/_logqueue.c read_columns): the columns straight from the bytes

The tables are checked equal. CPU time (process_time) per record, the best of --repeats batches;
the ratios c / orjson and columns / unmarshalled are measured in the same run.

Run:  .venv/bin/python bench/logconvert_speed.py [--records 5000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from loragate.service import logbatch  # noqa: E402
from loragate.service.requestlog._logqueue import RecordQueue, read_columns  # noqa: E402
from loragate.service.requestlog.convert import Converter  # noqa: E402
from loragate.service.requestlog.rows import RequestRecord  # noqa: E402
from loragate.service.requestlog.store import ParquetStore  # noqa: E402

SYSTEM = "You are a helpful support assistant."
MESSAGE = "I'm jane.doe@example.com, call me on +44 20 7946 0958: my order #{n} has not arrived yet, what can I do?"


def answer(stream: bool) -> bytes:
    if not stream:
        return orjson.dumps({"id": "stub-1", "object": "chat.completion", "created": 1733000000, "model": "support",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok " * 16},
                                          "logprobs": None, "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 7, "completion_tokens": 16, "total_tokens": 23}})
    events = [{"id": "stub-1", "object": "chat.completion.chunk", "created": 1733000000, "model": "support",
               "choices": [{"index": 0, "delta": {"content": "ok "}, "logprobs": None,
                            "finish_reason": None if i < 15 else "length"}]} for i in range(16)]
    events.append({"id": "stub-1", "object": "chat.completion.chunk", "created": 1733000000, "model": "support",
                   "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 16, "total_tokens": 23}})
    return b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events) + b"data: [DONE]\n\n"


def records(count: int, start: int, stream: bool) -> list[RequestRecord]:
    body = answer(stream)
    return [RequestRecord(
        request_id=f"{start + i:032x}", timestamp=1_733_000_000.0 + i / 1000, route="support", variant="v2",
        endpoint="chat/completions", status=200, stream=stream, fallback=None, latency_s=0.01, ttft_s=0.005,
        prompt_tokens=7, completion_tokens=16, cost_usd=1e-5, reference_cost_usd=2e-5,
        payload=orjson.dumps({"model": "support--v2", "max_tokens": 16, "stream": stream, "messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": MESSAGE.format(n=start + i)}]}),
        answer=body) for i in range(count)]


def per_record_us(batches: list[list[RequestRecord]], reader: object, folder: str) -> float:
    logbatch.native = reader  # type: ignore[assignment]
    converter, store = Converter("scrubbed"), ParquetStore(folder)
    best = float("inf")
    for batch in batches:
        started = time.process_time()
        written, unreadable = converter.write(store, "requests", batch)
        best = min(best, time.process_time() - started)
        assert written == len(batch) and unreadable == 0
    return best / len(batches[0]) * 1e6


def batch_us(batches: list[list[RequestRecord]], columns: bool, folder: str) -> float:
    """write_batch of each batch's queued bytes: read into columns by the C reader, or unmarshalled."""
    logbatch.read_columns = read_columns if columns else None  # type: ignore[assignment]
    converter, store = Converter("scrubbed"), ParquetStore(folder)
    best = float("inf")
    for records_ in batches:
        queue = RecordQueue()
        for record in records_:
            queue.append(record)
        batch = queue.take(len(records_))
        started = time.process_time()
        written, unreadable = converter.write_batch(store, "requests", batch)
        best = min(best, time.process_time() - started)
        assert written == len(records_) and unreadable == 0
    logbatch.read_columns = read_columns
    return best / len(batches[0]) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "logconvert_speed.json")
    args = parser.parse_args()
    c_reader = logbatch.native
    if c_reader is None:
        print("the C reader is not built (scripts/setup.sh installs gcc)", file=sys.stderr)
        return 1
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("json", "sse"):
            stream = kind == "sse"
            batches = [records(args.records, k * args.records, stream) for k in range(args.repeats)]
            converter = Converter("scrubbed")
            logbatch.native = None
            expected = converter.convert("requests", batches[0])[0]
            logbatch.native = c_reader
            assert converter.convert("requests", batches[0])[0].equals(expected), f"{kind}: the readers disagree"
            queue = RecordQueue()
            for record in batches[0]:
                queue.append(record)
            assert logbatch.batch_table(queue.take(args.records), "scrubbed", converter._clean_all).equals(expected), \
                f"{kind}: the column reader disagrees"
            us = {"orjson": per_record_us(batches, None, f"{folder}/{kind}-orjson"),
                  "c": per_record_us(batches, c_reader, f"{folder}/{kind}-c"),
                  "batch_unmarshalled": batch_us(batches, False, f"{folder}/{kind}-unmarshalled"),
                  "batch_columns": batch_us(batches, True, f"{folder}/{kind}-columns")}
            logbatch.native = c_reader
            results[kind] = {"records": args.records, "answer_bytes": len(batches[0][0].answer or b""),
                             "us_per_record": {k: round(v, 2) for k, v in us.items()},
                             "c_vs_orjson": round(us["c"] / us["orjson"], 3),
                             "columns_vs_unmarshalled": round(us["batch_columns"] / us["batch_unmarshalled"], 3)}
            print(f"{kind:>4} ({args.records} records, answers of {results[kind]['answer_bytes']} bytes): "
                  f"orjson {us['orjson']:7.2f} us  c {us['c']:7.2f} us per record  | c/orjson {us['c'] / us['orjson']:.3f}")
            print(f"{'':>4} a queued batch: unmarshalled {us['batch_unmarshalled']:7.2f} us  columns "
                  f"{us['batch_columns']:7.2f} us per record  | columns/unmarshalled "
                  f"{us['batch_columns'] / us['batch_unmarshalled']:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

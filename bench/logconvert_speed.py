"""How fast the request log's conversion process turns records into Parquet: the C reader against orjson, in one run.

The records are what bench/features_overhead.py sends through the gateway (a chat request with a system
prompt and a support message holding an e-mail address, a phone number and an order number that changes;
the answer a whole JSON body, or an SSE stream of 16 chunks, a usage event and [DONE]). A batch is
converted and written the way the conversion process does it (service.requestlog.convert.Converter into a
ParquetStore, scrubbed text), two ways:

  orjson   every request and answer parsed by orjson (service.requestlog.rows' reading; what an install
           without the C reader does, and the reference the C reader must equal)
  c        the C reader (service/requestlog/_lognative.c) for answers and chat turns, orjson for what it declines

and the batch as it reaches the conversion process (the marshalled records the queue hands over,
service/requestlog/queue.py) through Converter.write_batch (unmarshalled, then the columns, with the C reader):
what the conversion process pays a record in all.

The tables are checked equal. CPU time (process_time) per record, the best of --repeats batches;
the ratio c / orjson is measured in the same run.

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

from loragate.service.requestlog import columns as logbatch  # noqa: E402
from loragate.service.requestlog._logqueue import RecordQueue  # noqa: E402
from loragate.service.requestlog.convert import Converter  # noqa: E402
from loragate.service.requestlog.records import RequestRecord  # noqa: E402
from loragate.service.requestlog.store import ParquetStore  # noqa: E402

SYSTEM = "You are a helpful support assistant."
MESSAGE = "I'm jane.doe@example.com, call me on +44 20 7946 0958: my order #{n} has not arrived yet, what can I do?"


def answer(stream: bool) -> bytes:
    if not stream:
        return orjson.dumps(
            {
                "id": "stub-1",
                "object": "chat.completion",
                "created": 1733000000,
                "model": "support",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok " * 16},
                        "logprobs": None,
                        "finish_reason": "length",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 16, "total_tokens": 23},
            }
        )
    events = [
        {
            "id": "stub-1",
            "object": "chat.completion.chunk",
            "created": 1733000000,
            "model": "support",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "ok "},
                    "logprobs": None,
                    "finish_reason": None if i < 15 else "length",
                }
            ],
        }
        for i in range(16)
    ]
    events.append(
        {
            "id": "stub-1",
            "object": "chat.completion.chunk",
            "created": 1733000000,
            "model": "support",
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": 16, "total_tokens": 23},
        }
    )
    return b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events) + b"data: [DONE]\n\n"


def records(count: int, start: int, stream: bool) -> list[RequestRecord]:
    body = answer(stream)
    return [
        RequestRecord(
            request_id=f"{start + i:032x}",
            timestamp=1_733_000_000.0 + i / 1000,
            route="support",
            variant="v2",
            endpoint="chat/completions",
            status=200,
            stream=stream,
            fallback=None,
            latency_s=0.01,
            ttft_s=0.005,
            prompt_tokens=7,
            completion_tokens=16,
            cost_usd=1e-5,
            reference_cost_usd=2e-5,
            payload=orjson.dumps(
                {
                    "model": "support--v2",
                    "max_tokens": 16,
                    "stream": stream,
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": MESSAGE.format(n=start + i)},
                    ],
                }
            ),
            answer=body,
        )
        for i in range(count)
    ]


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


def batch_us(batches: list[list[RequestRecord]], folder: str) -> float:
    """write_batch of each batch's queued bytes (unmarshalled, then columns), as the conversion process does."""
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
            us = {
                "orjson": per_record_us(batches, None, f"{folder}/{kind}-orjson"),
                "c": per_record_us(batches, c_reader, f"{folder}/{kind}-c"),
                "queued_batch": batch_us(batches, f"{folder}/{kind}-queued"),
            }
            logbatch.native = c_reader
            results[kind] = {
                "records": args.records,
                "answer_bytes": len(batches[0][0].answer or b""),
                "us_per_record": {k: round(v, 2) for k, v in us.items()},
                "c_vs_orjson": round(us["c"] / us["orjson"], 3),
            }
            print(
                f"{kind:>4} ({args.records} records, answers of {results[kind]['answer_bytes']} bytes): "
                f"orjson {us['orjson']:7.2f} us  c {us['c']:7.2f} us per record  | c/orjson "
                f"{us['c'] / us['orjson']:.3f}"
            )
            print(f"{'':>4} a queued batch (unmarshalled, then columns): {us['queued_batch']:7.2f} us per record")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A request log of realistic shape for bench/monitor_volume.py: real text, many small files from several writers.

Layout and Parquet options are the gateway writer's (service/logstore.py): ``requests/date=D/`` with one file
per writer and flush (10 s by default), named ``<writer>-<flush time>Z-<seq>.parquet``, zstd, dictionary and
statistics for every column but the free-text and id ones. Rows inside a file are in time order (the writer's
batches are). Four writers by default: 1,440 files an hour.

Text: the English ChatterBot corpus (the dev extra; tests.topics). A chat prompt is a system
prompt plus retrieved "context" (sentences of the topic's dialogs) plus a question of the topic; sizes are
log-uniform from 150 B to 8 KB (prompt) and 150 B to 2 KB (answer). Topic ``tech`` is the reference
population; a shifted hour takes a share of its prompts from ``everyday`` instead, with the same size
distribution, so only the content moves. One in twenty primary answers of variant v1 has a shadow answer by
``v2`` (role ``shadow``, same request id), as service/shadow.py logs them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

DAY = datetime(2026, 11, 2, tzinfo=timezone.utc)
HOURS = {"reference": (10, 0.0), "quiet": (11, 0.0), "shifted": (12, 0.5)}  # name -> (UTC hour, shift)
POOL = 4000  # distinct prompts (and answers) per topic
SYSTEM = "You are the support assistant of ACME. Answer from the context; say so when it does not help."


@dataclass(frozen=True)
class Shape:
    rows: int  # per hour
    writers: int = 4
    flush_s: int = 10

    @property
    def files_per_writer(self) -> int:
        return 3600 // self.flush_s


def hour_window(name: str) -> tuple[datetime, datetime]:
    start = DAY + timedelta(hours=HOURS[name][0])
    return start, start + timedelta(hours=1)


def _sentences(topic: str) -> list[str]:
    import yaml

    from tests.topics import TOPICS, corpus_dir

    out = []
    for name in TOPICS[topic]:
        for dialog in yaml.safe_load((corpus_dir() / f"{name}.yml").read_text())["conversations"]:
            out += [" ".join(t.split()) for t in dialog if isinstance(t, str) and t.strip()]
    return out


def _sized(rng, pool: list[str], low: int, high: int) -> str:
    target = math.exp(rng.uniform(math.log(low), math.log(high)))
    parts, size = [], 0
    while size < target:
        text = pool[rng.integers(len(pool))]
        parts.append(text)
        size += len(text) + 1
    return " ".join(parts)[: int(target)]


@lru_cache(maxsize=None)
def pools(topic: str):
    """(prompt_text, prompt_messages, response_text) Arrow arrays of POOL entries for ``topic``."""
    import numpy as np
    import pyarrow as pa

    from loragate.common import logschema
    from tests.topics import prompts

    rng = np.random.default_rng(list(topic.encode()))  # fixed per topic
    sentences, questions = _sentences(topic), list(prompts(topic))
    flat, turns, answers = [], [], []
    for _ in range(POOL):
        question = questions[rng.integers(len(questions))]
        context = _sized(rng, sentences, 150, 8000)
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Context: {context}\n\nQuestion: {question}"},
        ]
        flat.append(logschema.flat_prompt(messages))
        turns.append(messages)
        answers.append(_sized(rng, sentences, 150, 2000))
    schema = logschema.arrow_schema("requests")
    return (
        pa.array(flat, pa.string()),
        pa.array(turns, schema.field("prompt_messages").type),
        pa.array(answers, pa.string()),
    )


def _file_rows(rng, n: int, start_s: float, end_s: float, shift: float):
    import numpy as np
    import pyarrow as pa

    from loragate.common import logschema

    tech, everyday = pools("tech"), pools("everyday")
    flat = pa.chunked_array([tech[0], everyday[0]]).combine_chunks()
    turns = pa.chunked_array([tech[1], everyday[1]]).combine_chunks()
    answers = pa.chunked_array([tech[2], everyday[2]]).combine_chunks()
    pick = rng.integers(POOL, size=n) + np.where(rng.random(n) < shift, POOL, 0)
    answer_pick = rng.integers(POOL, size=n) + np.where(pick >= POOL, POOL, 0)
    ids = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64)
    stamps = np.sort(rng.uniform(start_s, end_s, n))
    variant = np.where(rng.random(n) < 0.9, "v1", "v2")
    status = np.where(rng.random(n) < 0.99, 200, 500).astype("int32")
    prompt_tokens = (pa.compute.utf8_length(flat.take(pick)).to_numpy() / 4).astype("int64")
    completion = (pa.compute.utf8_length(answers.take(answer_pick)).to_numpy() / 4).astype("int64")
    stream = rng.random(n) < 0.5
    latency = rng.gamma(4.0, 0.05, n) + completion * 0.01
    cost = prompt_tokens * 1e-7 + completion * 2e-7
    columns = {
        "request_id": pa.array([f"{a:016x}{b:016x}" for a, b in ids]),
        "timestamp": pa.array((stamps * 1000).astype("int64")).cast(pa.timestamp("ms", tz="UTC")),
        "route": pa.array(["chat"] * n),
        "variant": pa.array(variant),
        "endpoint": pa.array(["chat/completions"] * n),
        "status": pa.array(status),
        "stream": pa.array(stream),
        "fallback": pa.array(np.where(rng.random(n) < 0.02, "upstream_error", None).tolist(), pa.string()),
        "latency_s": pa.array(latency),
        "ttft_s": pa.array(np.where(stream, rng.gamma(4.0, 0.01, n), np.nan)),
        "prompt_tokens": pa.array(prompt_tokens),
        "completion_tokens": pa.array(completion),
        "cost_usd": pa.array(cost),
        "reference_cost_usd": pa.array(cost * 5),
        "finish_reason": pa.array(np.where(rng.random(n) < 0.9, "stop", "length")),
        "prompt_text": flat.take(pick),
        "prompt_messages": turns.take(pick),
        "response_text": answers.take(answer_pick),
        "schema_version": pa.array(np.full(n, logschema.SCHEMA_VERSION, dtype="int32")),
        "role": pa.array(["primary"] * n),
        "priority": pa.array(rng.choice(["critical", "standard", "sheddable"], size=n, p=[0.1, 0.85, 0.05])),
    }
    table = pa.table(columns, schema=logschema.arrow_schema("requests"))
    shadow = np.flatnonzero((variant == "v1") & (rng.random(n) < 0.05))
    if len(shadow):  # the shadow variant's answers to copies of some v1 requests, logged just after them
        copies = table.take(shadow)
        copies = copies.set_column(copies.schema.get_field_index("variant"), "variant", pa.array(["v2"] * len(shadow)))
        copies = copies.set_column(copies.schema.get_field_index("role"), "role", pa.array(["shadow"] * len(shadow)))
        copies = copies.set_column(  # a shadow row has no class (loragate.common.logschema)
            copies.schema.get_field_index("priority"), "priority", pa.nulls(len(shadow), pa.string())
        )
        copies = copies.set_column(
            copies.schema.get_field_index("response_text"),
            "response_text",
            answers.take(rng.integers(POOL, size=len(shadow))),
        )
        table = pa.concat_tables([table, copies]).sort_by("timestamp")
    return table


def write_parquet(table, path: str) -> None:
    """As service/logstore.py writes a batch (one row group; no dictionary or statistics for ids and text)."""
    import pyarrow.parquet as pq

    from loragate.common import logschema

    repeating = [name for name in table.column_names if name not in logschema.DISTINCT_COLUMNS]
    pq.write_table(table, path, compression="zstd", use_dictionary=repeating, write_statistics=repeating)


def _write_file(job: tuple) -> int:
    import numpy as np

    root, name, shape, writer, index = job
    hour, shift = HOURS[name]
    start = DAY + timedelta(hours=hour)
    flush = start + timedelta(seconds=(index + 1) * shape.flush_s)
    rng = np.random.default_rng([shape.rows, hour, writer, index])
    per_file = shape.rows / (shape.writers * shape.files_per_writer)
    n = int(per_file * (index + 1)) - int(per_file * index)  # the hour holds shape.rows rows (+ shadows)
    table = _file_rows(rng, n, flush.timestamp() - shape.flush_s, flush.timestamp(), shift)
    directory = Path(root) / "requests" / f"date={start:%Y-%m-%d}"
    stamp = f"{flush:%Y%m%dT%H%M%S}{flush.microsecond // 1000:03d}Z"
    write_parquet(table, str(directory / f"gw{writer}-{stamp}-{index:06d}.parquet"))
    return table.num_rows


def generate(
    root: str | Path, rows: int, names: tuple[str, ...] = tuple(HOURS), processes: int = 2, writers: int = 4
) -> dict:
    """Write the hours ``names`` of ``rows`` primary requests each, from ``writers`` writers (360 files an hour
    each), under ``root`` (skipped when already there)."""
    from multiprocessing import get_context

    root = Path(root)
    shape = Shape(rows, writers)
    done, counts = root / "done", {}
    for name in names:
        marker = done / f"{name}-{rows}"
        if marker.exists():
            counts[name] = int(marker.read_text())
            continue
        (root / "requests" / f"date={DAY:%Y-%m-%d}").mkdir(parents=True, exist_ok=True)
        jobs = [(str(root), name, shape, w, i) for w in range(shape.writers) for i in range(shape.files_per_writer)]
        with get_context("spawn").Pool(processes) as pool:
            total = sum(pool.imap_unordered(_write_file, jobs, chunksize=8))
        done.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(total))
        counts[name] = total
    return counts


if __name__ == "__main__":
    import sys

    names = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else tuple(HOURS)
    print(generate(sys.argv[1], int(sys.argv[2]), names, processes=int(os.environ.get("PROCESSES", "2"))))


def _rewrite_file(job: tuple[str, str]) -> tuple[int, int]:
    import pyarrow.parquet as pq

    from loragate.service.requestlog.store import encode

    source, target = job
    data = encode(pq.read_table(source))
    Path(target).write_bytes(data.to_pybytes())
    return os.path.getsize(source), data.size


def rewrite_keyed(source: str | Path, target: str | Path, processes: int = 2) -> dict:
    """A copy of the log under ``source`` in the gateway's current layout (service/requestlog/store.encode: rows
    in sample-key order, row groups of samplekey.ROW_GROUP_ROWS, key ranges in the footer); same names.
    Returns the bytes of the files before and after."""
    from multiprocessing import get_context

    source, target = Path(source), Path(target)
    jobs = []
    for path in sorted(source.glob("requests/date=*/*.parquet")):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), str(out)))
    with get_context("spawn").Pool(processes) as pool:
        sizes = pool.map(_rewrite_file, jobs, chunksize=8)
    if (source / "done").exists():
        (target / "done").mkdir(parents=True, exist_ok=True)
        for marker in (source / "done").iterdir():
            (target / "done" / marker.name).write_text(marker.read_text())
    return {"files": len(jobs), "bytes_before": sum(a for a, _ in sizes), "bytes_after": sum(b for _, b in sizes)}

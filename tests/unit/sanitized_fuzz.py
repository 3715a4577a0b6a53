"""Differential fuzz of the request log's C entry points against their Python references, for a sanitized build.

Run by tests/unit/test_sanitizers.py in a child interpreter with AddressSanitizer preloaded, after it built
service/requestlog/_lognative.c and _logqueue.c with -fsanitize=address,undefined into a folder:

    python tests/unit/sanitized_fuzz.py FOLDER SECONDS

The built modules are loaded under their real names before anything imports them, so every call below (and
the batch conversion in service.requestlog.columns) runs the sanitized code. Each property is a hypothesis
test; they are run in turn, again and again, until SECONDS are spent. Any memory error or undefined behaviour
ends the process (the build makes every finding fatal); a differential mismatch raises. Prints
"fuzzed N examples" at the end.
"""

from __future__ import annotations

import importlib.util
import marshal
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _load_sanitized(folder: Path) -> None:
    for name in ("_lognative", "_logqueue"):
        [path] = folder.glob(f"{name}*.so")
        full = f"loragate.service.requestlog.{name}"
        spec = importlib.util.spec_from_file_location(full, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)


def main() -> int:
    folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
    _load_sanitized(folder)

    import orjson
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from loragate.common.logschema import CHAT_ENDPOINT
    from loragate.service.requestlog import _lognative as native
    from loragate.service.requestlog import _logqueue
    from loragate.service.requestlog import columns
    from loragate.service.requestlog.queue import PyRecordQueue
    from loragate.service.requestlog.rows import _body_answer, _stream_answer, answer_of, prompt_of
    from tests.unit import test_lognative as shapes
    from tests.unit.test_logqueue import plain_value
    from tests.unit.test_requestlog import chat_record

    assert str(folder) in native.__file__ and str(folder) in _logqueue.__file__, "not the sanitized build"
    assert columns.native is native
    examples = 0
    fuzz = settings(
        max_examples=150, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck)
    )

    def parses(data: bytes) -> bool:
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        return True

    # Inputs: the generators of tests/unit/test_lognative.py (valid and mutated upstream shapes), or any bytes.
    def shaped(make):
        return st.one_of(st.randoms(use_true_random=False).map(make), st.binary(max_size=300))

    @fuzz
    @given(shaped(shapes._body))
    def body_answer(body: bytes) -> None:
        nonlocal examples
        examples += 1
        got = native.body_answer(body)
        assert got is None or (parses(body) and got == _body_answer(body)), body

    @fuzz
    @given(shaped(shapes._stream))
    def stream_answer(stream: bytes) -> None:
        nonlocal examples
        examples += 1
        got = native.stream_answer(stream)
        assert got is None or got == _stream_answer(stream), stream

    @fuzz
    @given(shaped(shapes._chat_request))
    def chat_turns(body: bytes) -> None:
        nonlocal examples
        examples += 1
        roles, contents = ["before"], ["before"]
        got = native.chat_turns(body, roles, contents)
        if got is None:
            assert roles == ["before"] and contents == ["before"]
            return
        turns, _ = prompt_of(orjson.loads(body), CHAT_ENDPOINT)
        assert got is (turns is not None)
        assert list(zip(roles[1:], contents[1:])) == [(t["role"], t["content"]) for t in turns or ()], body

    @fuzz
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["chat/completions", "completions", ""]),
                shaped(shapes._chat_request),
                st.booleans(),
                st.sampled_from([200, 400]),
                st.one_of(st.none(), shaped(shapes._stream), shaped(shapes._body)),
            ),
            max_size=8,
        ),
        st.booleans(),
    )
    def batch_readers(rows: list, meddle: bool) -> None:
        """read_turns and read_answers over a batch, against the reference record by record; ``meddle``: the
        callback empties the caller's lists of inputs as it runs (the C code must not rely on them)."""
        nonlocal examples
        examples += 1
        endpoints, payloads = [row[0] for row in rows], [row[1] for row in rows]
        streams, statuses, answers = [row[2] for row in rows], [row[3] for row in rows], [row[4] for row in rows]
        records = [
            chat_record(f"r{i}")._replace(endpoint=e, payload=p, stream=s, status=c, answer=a)
            for i, (e, p, s, c, a) in enumerate(rows)
        ]
        expected_answers = [answer_of(record) for record in records]
        inputs = (endpoints, payloads, streams, statuses, answers)
        copies = [list(column) for column in inputs]

        def general_answer(index: int):
            if meddle:
                for column in inputs:
                    column.clear()
            return answer_of(records[index])

        texts, reasons = native.read_answers(streams, statuses, answers, general_answer)
        assert list(zip(texts, reasons)) == expected_answers
        endpoints, payloads, streams, statuses, answers = (list(column) for column in copies)
        inputs = (endpoints, payloads, streams, statuses, answers)
        roles: list[str] = []
        contents: list[str] = []
        offsets = [0]
        no_turns: list[bool] = []

        def general_turns(index: int) -> bool:
            if meddle:
                endpoints.clear()
                payloads.clear()
            try:
                request = orjson.loads(copies[1][index])
            except orjson.JSONDecodeError:
                return False
            if not isinstance(request, dict):
                return False
            turns, _ = prompt_of(request, copies[0][index])
            for turn in turns or ():
                roles.append(turn["role"])
                contents.append(turn["content"])
            return turns is not None

        native.read_turns(endpoints, payloads, roles, contents, offsets, no_turns, general_turns)
        assert len(offsets) == len(rows) + 1 and len(no_turns) == len(rows)
        for index in range(len(rows)):
            got = list(zip(roles[offsets[index] : offsets[index + 1]], contents[offsets[index] : offsets[index + 1]]))
            try:
                request = orjson.loads(copies[1][index])
            except orjson.JSONDecodeError:
                assert got == [] and no_turns[index]
                continue
            turns, _ = prompt_of(request, copies[0][index]) if isinstance(request, dict) else (None, None)
            if copies[0][index] != "chat/completions":
                turns = None  # the reference's completions carry no turns
            assert got == [(t["role"], t["content"]) for t in turns or ()], (copies[0][index], copies[1][index])
            assert no_turns[index] == (turns is None)

    @fuzz
    @given(
        st.lists(st.lists(st.randoms(use_true_random=False).map(plain_value), max_size=20).map(tuple), max_size=30),
        st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=6),
    )
    def queue(records: list[tuple], takes: list[int]) -> None:
        """The C queue against the Python one: the same bytes for every take, take(0) and empty ones included."""
        nonlocal examples
        examples += 1
        native_queue, reference = _logqueue.RecordQueue(), PyRecordQueue()
        native_queue.take(0)
        for record in records:
            native_queue.append(record)
            reference.append(record)
        for limit in takes + [len(records)]:
            got, expected = native_queue.take(limit), reference.take(limit)
            assert got == expected, limit
        assert len(native_queue) == 0 and native_queue.take(5) == marshal.dumps([], 2)

    properties = [body_answer, stream_answer, chat_turns, batch_readers, queue]
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        random.shuffle(properties)
        for prop in properties:
            if time.monotonic() >= deadline:
                break
            prop()
        rounds += 1
    print(f"fuzzed {examples} examples in {rounds} rounds", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

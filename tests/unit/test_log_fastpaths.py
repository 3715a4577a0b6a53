"""The request log's and auth's fast paths give exactly what the plain paths give.

scrub_many (service/requestlog/scrub.py) == scrub text by text; the conversion process's batch
conversion == request_row record by record; the simple-stream parse == sse.json_objects;
the remembered key (its digest, its principal) never outlives a reload that revokes or removes it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from loragate.common.logschema import arrow_schema

from loragate.common.scrub import scrub
from loragate.service.apikeys import KeyStore, hash_key
from loragate.service.auth import Authenticator
from loragate.service.errors import GatewayError
from loragate.service.requestlog.rows import _body_answer, _stream_answer, request_row
from loragate.service.requestlog.scrub import scrub_many
from loragate.service.requestlog._lognative import body_answer, stream_answer
from loragate.service.requestlog import columns as logbatch
from loragate.service.requestlog.columns import requests_table
from loragate.service.requestlog.convert import Converter
from loragate.service.requestlog._logqueue import RecordQueue as NativeRecordQueue
from loragate.service.requestlog import RequestRecord
from tests.unit.test_requestlog import PII_PROMPT, chat_record
from tests.unit.test_scrub import KEPT, PLANTED


def corpus() -> list[str]:
    base = [text for text, *_ in PLANTED] + list(KEPT) + [PII_PROMPT]
    rnd = random.Random(7)
    # Digits, separators, Unicode digits/spaces and case-folding letters (Kelvin sign, long s) at random,
    # and planted texts glued together: where a batch gate that were too narrow would show.
    alphabet = "0123456789 -.:+()@abcXYZ_/=#%\n\t\u00a0\u0660\u0661\u212aK\u017fs"
    noise = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 60))) for _ in range(3000)]
    glued = [" ".join(rnd.choice(base) for _ in range(3)) for _ in range(500)]
    return base + noise + glued


def test_scrub_many_is_scrub_text_by_text() -> None:
    texts = corpus()
    assert scrub_many(texts) == [scrub(text) for text in texts]
    assert scrub_many([]) == []
    assert scrub_many(["\ud800 me@example.com"]) == [scrub("\ud800 me@example.com")]  # not UTF-8: text by text


def batch_records() -> list[RequestRecord]:
    """A batch of the PII corpus in chat requests and answers, JSON and streamed, and records out of the ordinary."""
    texts = corpus()[:400]
    # Timestamps whose milliseconds are a float product to truncate (int(t * 1000)), before and after 1970.
    stamps = [1_700_000_000.0 + i * 0.0013337 if i % 5 else -1.0015 * i for i in range(len(texts))]
    records = [
        chat_record(f"r{i}", content=text, answer=texts[-1 - i], stream=i % 2 == 1, timestamp=stamps[i])
        for i, text in enumerate(texts)
    ]
    completion = RequestRecord(
        request_id="c1",
        timestamp=1_700_000_000.0,
        route="r",
        variant="v",
        endpoint="completions",
        status=200,
        stream=False,
        fallback=None,
        latency_s=0.1,
        ttft_s=None,
        prompt_tokens=1,
        completion_tokens=1,
        cost_usd=0,
        reference_cost_usd=0,
        payload=orjson.dumps({"prompt": ["call +44 20 7946 0958", PII_PROMPT]}),
        answer=orjson.dumps({"choices": [{"index": 0, "text": PII_PROMPT, "finish_reason": "stop"}]}),
    )
    odd = [
        completion,
        completion._replace(request_id="c2", payload=orjson.dumps({"prompt": "one " + PII_PROMPT})),
        completion._replace(request_id="c3", payload=orjson.dumps({"prompt": [1, 2]}), answer=None, status=502),
        chat_record("m1")._replace(payload=orjson.dumps({"messages": "not a list"})),
        chat_record("m2")._replace(payload=orjson.dumps({"messages": []})),
        chat_record("m3")._replace(payload=orjson.dumps({"messages": [7, {"content": [{"text": "a"}, {"x": 1}]}]})),
        chat_record("m4")._replace(payload=b'{"model":"a1","messages":[{"role":"user","content":"caf\xc3\xa9"}]}'),
        *(
            chat_record(f"p{index}")._replace(payload=payload)
            for index, payload in enumerate(random_chat_payloads(300))
        ),
        chat_record("s1", stream=True)._replace(answer=b""),
        chat_record("s2", stream=True)._replace(answer=b'data: {"choices": [{"index": 1}]}\r\n\r\n'),
    ]
    return records + odd


@pytest.mark.parametrize("reader", ["c", "python"])
@pytest.mark.parametrize("mode", ["scrubbed", "full", "none"])
def test_batch_conversion_gives_the_record_by_record_rows(mode, reader, monkeypatch) -> None:
    if reader == "python":  # an install without the C reader (service/requestlog/_lognative.c): the orjson path alone
        monkeypatch.setattr(logbatch, "native", None)
    records = batch_records()
    expected = [request_row(record, mode) for record in records]
    table = requests_table(records, mode, Converter(mode)._clean_all)
    assert table.schema == arrow_schema("requests")
    assert table.to_pylist() == pa.Table.from_pylist(expected, schema=arrow_schema("requests")).to_pylist()
    assert mode != "scrubbed" or "[EMAIL]" in table.column("prompt_text")[400].as_py()
    # The plain tuples a queued batch unmarshals to (service/requestlog/convert.py) give the same table.
    assert requests_table([tuple(record) for record in records], mode, Converter(mode)._clean_all).equals(table)
    # A batch the columnar path cannot take goes record by record, the unreadable record skipped and counted:
    # the rows request_row gives (the columnar path's are compared with them on the whole batch above), so a
    # sample of the batch shows it: the planted PII texts, a tenth of the rest, every record out of the ordinary
    # (the whole batch took a second a pass, three passes a mode and reader).
    odd = [r for r in records if r.request_id[0] in "cms"]
    some = list({r.request_id: r for r in records[:50] + records[50::10] + odd}.values())
    expected = [request_row(record, mode) for record in some]
    broken = chat_record("broken")._replace(timestamp="not a time")  # request_row raises on it
    rows, unreadable = Converter(mode).convert("requests", some + [broken])
    assert unreadable == 1 and rows == expected
    rows, unreadable = Converter(mode).convert("requests", [tuple(record) for record in some + [broken]])
    assert unreadable == 1 and rows == expected
    # Not UTF-8 in a field the typed decoding skips: unreadable, as record by record (orjson), not logged.
    not_utf8 = chat_record("u1")._replace(payload=b'{"model":"a\xff","messages":[{"role":"user","content":"x"}]}')
    rows, unreadable = Converter(mode).convert("requests", some + [not_utf8])
    if mode == "none":  # the request is not read: logged without its text
        assert unreadable == 0 and rows.column("request_id").to_pylist()[-1] == "u1"
        assert rows.num_rows == len(some) + 1
    else:
        assert unreadable == 1 and rows == expected


@pytest.mark.parametrize("mode", ["scrubbed", "full", "none"])
def test_a_queued_batch_gives_the_record_by_record_rows(mode) -> None:
    """The conversion process's path: the batch's bytes (service/requestlog/_logqueue.c) unmarshalled, then columns."""
    records = batch_records()
    queue = NativeRecordQueue()
    for record in records:
        queue.append(record)
    batch = queue.take(len(records))
    table = requests_table(records, mode, Converter(mode)._clean_all)
    store = TablesStore()
    assert Converter(mode).write_batch(store, "requests", batch) == (len(records), 0)
    assert store.tables[0].equals(table)
    # A record the columnar path does not take (a str timestamp): the batch goes record by record, and the one
    # unreadable record is skipped.
    for record in (records[0], chat_record("broken")._replace(timestamp="not a time")):
        queue.append(record)
    odd = queue.take(2)
    assert Converter(mode).write_batch(store, "requests", odd) == (1, 1)
    assert store.tables[-1] == [request_row(records[0], mode)]


class TablesStore:
    def __init__(self) -> None:
        self.tables: list = []

    def write(self, table: str, rows) -> int:
        self.tables.append(rows)
        return 1


def random_chat_payloads(count: int) -> list[bytes]:
    """Chat requests whose messages are what the typed decoding reads, or one thing out of the ordinary."""
    rnd = random.Random(5)
    odd = [None, 0, 7, "", "user", "caf\u00e9", [], {}, [{"type": "text", "text": "a"}], True]

    def message() -> object:
        if rnd.random() < 0.1:
            return rnd.choice([7, "text", None, []])  # not an object
        fields = {}
        if rnd.random() < 0.9:
            fields["role"] = rnd.choice(["user", "system", "assistant"]) if rnd.random() < 0.8 else rnd.choice(odd)
        if rnd.random() < 0.9:
            fields["content"] = (
                rnd.choice(["hi", "call +1 555 123 4567", ""]) if rnd.random() < 0.8 else rnd.choice(odd)
            )
        if rnd.random() < 0.2:
            fields["name"] = "x"
        return fields

    payloads = []
    for _ in range(count):
        request: dict = {"model": "a1", "max_tokens": 5}
        if rnd.random() < 0.9:
            request["messages"] = (
                [message() for _ in range(rnd.randint(0, 3))] if rnd.random() < 0.9 else rnd.choice(odd)
            )
        payloads.append(orjson.dumps(request))
    return payloads


def random_streams(count: int) -> list[bytes]:
    """SSE streams of chat and completion events, most well-formed, many with one thing out of the ordinary."""
    rnd = random.Random(11)
    values = [None, 0, 1, "0", 0.0, True, "", "stop", "x\u00e9", [], {}, "\U0001f600"]

    def choice() -> bytes:
        if usual:  # what vLLM sends
            return (
                b'{"index":0,"delta":{"content":'
                + orjson.dumps(rnd.choice(["a", " b", "\u00fc", "\U0001f600"]))
                + b'},"logprobs":null,"finish_reason":'
                + orjson.dumps(rnd.choice([None, "stop", "length"]))
                + b"}"
            )
        fields = []
        if rnd.random() < 0.8:
            fields.append(b'"index":' + (b"0" if rnd.random() < 0.7 else orjson.dumps(rnd.choice(values))))
        if rnd.random() < 0.7:
            delta = rnd.choice(
                [
                    b"{}",
                    b"null",
                    b'"x"',
                    b'{"role":"assistant"}',
                    b'{"content":' + orjson.dumps(rnd.choice(["a", "b c", "", None, 5, "\u00fc"])) + b"}",
                ]
            )
            fields.append(b'"delta":' + delta)
        if rnd.random() < 0.3:
            fields.append(b'"text":' + orjson.dumps(rnd.choice(["t", None, 3, ""])))
        if rnd.random() < 0.5:
            fields.append(b'"finish_reason":' + orjson.dumps(rnd.choice(values)))
        if rnd.random() < 0.05:
            fields.append(b'"index":1')  # a duplicate key: the last one counts
        return b"{" + b",".join(fields) + b"}"

    def event() -> bytes:
        head = b'{"id":"c-1","object":"chat.completion.chunk","created":1,"model":"m",'
        choices = b"[" + b",".join(choice() for _ in range(rnd.choice([0, 1, 1, 1, 2]))) + b"]"
        body = (
            head + b'"choices":' + (choices if rnd.random() < 0.95 else rnd.choice([b"null", b"{}", b"[null]"])) + b"}"
        )
        if rnd.random() < 0.03:
            body = body.replace(b'"m"', rnd.choice([b'"\xff"', b'"\\ud800"', b'"\\q"', b"01", b'"\\ud83d\\ude00"']))
        return b"data: " + body + b"\n\n"

    streams = []
    for _ in range(count):
        usual = rnd.random() < 0.5
        stream = b"".join(event() for _ in range(rnd.randint(1, 6)))
        stream += rnd.choice([b"data: [DONE]\n\n", b"", b"data: {oops\n\n"])
        if rnd.random() < 0.05:
            stream = stream.replace(b"\n", b"\r\n")
        streams.append(stream)
    return streams


def assert_typed_path_agrees(typed, general, inputs: list[bytes], taken: int, stepped_aside: int) -> None:
    """``typed`` gives ``general``'s answer or None (steps aside), taking more than ``taken`` of ``inputs``
    (the usual ones) and stepping aside for more than ``stepped_aside`` (the odd ones)."""
    decoded = [typed(data) for data in inputs]
    for data, answer in zip(inputs, decoded):
        assert answer is None or answer == general(data), data
    assert sum(answer is not None for answer in decoded) > taken
    assert sum(answer is None for answer in decoded) > stepped_aside


def test_typed_stream_decoding_gives_the_general_parse_or_steps_aside() -> None:
    assert_typed_path_agrees(stream_answer, _stream_answer, random_streams(3000), taken=750, stepped_aside=300)


def random_bodies(count: int) -> list[bytes]:
    """Whole JSON answers, most as vLLM writes them, many with one thing out of the ordinary."""
    rnd = random.Random(13)
    values = [None, 0, 1, "0", 0.0, True, "", "stop", "x\u00e9", [], {}, [{"type": "text", "text": "a"}]]
    bodies = []
    for _ in range(count):
        choices = []
        for _ in range(rnd.choice([0, 1, 1, 1, 2])):
            if rnd.random() < 0.5:  # what vLLM sends
                choices.append(
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": rnd.choice(["a", "\u00fc b"])},
                        "logprobs": None,
                        "finish_reason": rnd.choice(["stop", "length"]),
                    }
                )
                continue
            choice: dict = {}
            for key in ("message", "text", "finish_reason", "index"):
                if rnd.random() < 0.6:
                    choice[key] = rnd.choice(values + [{"content": rnd.choice(values)}, {"role": "assistant"}])
            choices.append(choice if rnd.random() < 0.95 else rnd.choice([None, 3, "x"]))
        answer: object = {
            "id": "c-1",
            "object": "chat.completion",
            "model": "m",
            "choices": choices,
            "usage": {"prompt_tokens": 1},
        }
        if rnd.random() < 0.05:
            answer = rnd.choice([[], {"choices": None}, {"id": "x"}, "text"])
        body = orjson.dumps(answer)
        if rnd.random() < 0.03:
            body = body.replace(b'"m"', rnd.choice([b'"\xff"', b'"\\ud800"', b"01", b'"\\ud83d\\ude00"']))
        bodies.append(body)
    return bodies


def test_typed_body_decoding_gives_the_general_parse_or_steps_aside() -> None:
    assert_typed_path_agrees(body_answer, _body_answer, random_bodies(3000), taken=1000, stepped_aside=300)


def test_a_remembered_key_does_not_survive_a_revoking_reload(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    alice, bob = "lg-alice-secret", "lg-bob-secret"
    keys.write_text(
        f'keys:\n  - {{id: alice, sha256: "{hash_key(alice)}"}}\n  - {{id: bob, sha256: "{hash_key(bob)}"}}\n'
    )
    auth = Authenticator(KeyStore(keys))
    for _ in range(3):  # digests remembered now
        assert auth.authenticate({"authorization": f"Bearer {alice}"}).key_id == "alice"
        assert auth.authenticate({"authorization": f"Bearer {bob}"}).key_id == "bob"
    keys.write_text(f'keys:\n  - {{id: bob, sha256: "{hash_key(bob)}", revoked: true}}\n')
    os.utime(keys, ns=(1, 1))
    assert auth.reload_if_changed()
    for key, message in ((alice, "invalid API key"), (bob, "this API key has been revoked")):
        try:
            auth.authenticate({"authorization": f"Bearer {key}"})
        except GatewayError as exc:
            assert exc.message == message
        else:
            raise AssertionError(f"{key} still accepted after the reload")


def test_a_remembered_principal_is_that_of_its_authorization_header_only(tmp_path: Path) -> None:
    """A Bearer header is remembered with its principal; another scheme's header never is (the key came from
    x-api-key), so the same Basic header with another x-api-key is judged on that key."""
    alice = "lg-alice-secret"
    auth = Authenticator(KeyStore(None, f'keys:\n  - {{id: alice, sha256: "{hash_key(alice)}"}}\n'))
    for _ in range(2):
        assert auth.authenticate({"authorization": "Basic Zm9v", "x-api-key": alice}).key_id == "alice"
        with pytest.raises(GatewayError, match="invalid API key"):
            auth.authenticate({"authorization": "Basic Zm9v", "x-api-key": "lg-mallory"})
        with pytest.raises(GatewayError, match="missing API key"):
            auth.authenticate({"authorization": "Basic Zm9v"})
        assert auth.authenticate({"authorization": f"Bearer {alice}", "x-api-key": "lg-mallory"}).key_id == "alice"
        with pytest.raises(GatewayError, match="invalid API key"):
            auth.authenticate({"authorization": "Bearer lg-mallory"})
    assert list(auth._admitted) == [f"Bearer {alice}"]


def test_every_reader_takes_a_records_fields_by_name() -> None:
    """One definition of the fields (service/requestlog/records.py): each field the schema shares goes to the
    column of its name on every path, and a record of another width is refused, not read shifted."""
    from loragate.service.requestlog.records import columns_of

    record = chat_record("by-name", stream=True)._replace(
        route="route-x",
        variant="variant-y",
        status=200,
        fallback="timeout",
        latency_s=1.25,
        ttft_s=0.75,
        prompt_tokens=11,
        completion_tokens=13,
        cost_usd=0.5,
        reference_cost_usd=2.5,
        role="shadow",
    )
    shared = [name for name in RequestRecord._fields if name in arrow_schema("requests").names and name != "timestamp"]
    assert len(shared) >= 14
    columnar = requests_table([tuple(record)], "scrubbed", Converter("scrubbed")._clean_all).to_pylist()[0]
    reference = request_row(record, "scrubbed")
    for name in shared:
        assert columnar[name] == reference[name] == getattr(record, name), name
    assert columns_of(RequestRecord, [record])["payload"] == (record.payload,)
    with pytest.raises(ValueError):
        columns_of(RequestRecord, [tuple(record)[:-1]])
    rows, unreadable = Converter("scrubbed").convert("requests", [tuple(record)[:-1]])
    assert unreadable == 1 and rows == []

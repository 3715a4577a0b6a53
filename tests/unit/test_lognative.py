"""The request log's JSON reading in C (service/requestlog/_lognative.c) against the reference, service.requestlog.rows.

Generated inputs (seeded) cover what the C code must read exactly or leave to the reference: escapes,
surrogates, non-ASCII, keys given twice, odd types in every field the log reads, numbers orjson
might read as infinity, whitespace, stream framing, and bytes mutated into invalid JSON. Where the C
code answers, its answer must be the reference's; where the reference cannot parse, it must not answer.
"""

from __future__ import annotations

import random

import orjson
import pytest

from loragate.common.logschema import CHAT_ENDPOINT
from loragate.service.requestlog import columns as logbatch
from loragate.service.requestlog.rows import _body_answer, _stream_answer, prompt_of

from loragate.service.requestlog import _lognative as native  # must be built (setup.py): a missing module fails

CASES = 4000


# --- a JSON writer that can also write what orjson.dumps never does ---------------------------------


def _string(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.3:
        return rng.choice(["", "ok", "stop", "length", "user", "assistant", "system", "hello world"])
    alphabet = 'abc xyz"\\/\n\t\x00\x1f\x7féü€😀\u2028'
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def _encode_string(text: str, rng: random.Random) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20:
            out.append(rng.choice(["\\u%04x" % code, {"\n": "\\n", "\t": "\\t"}.get(char, "\\u%04X" % code)]))
        elif rng.random() < 0.1:  # any character may be escaped
            if code > 0xFFFF:
                high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
                out.append("\\u%04x\\u%04x" % (high, low))
            else:
                out.append("\\u%04x" % code if char != "/" else "\\/")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _number(rng: random.Random) -> str:
    return rng.choice(
        [
            "0",
            "-0",
            "1",
            "-1",
            "0.0",
            "2.5",
            "1e2",
            "1E+2",
            "-0e-5",
            "1e400",
            "1e-400",
            "1e99",
            "123456789012345678901234567890",
            "0.000",
            "9" * 250,
            "1.5e-07",
            "01",
            "1.",
            "-",
            "1e",
        ]
    )


def _value(rng: random.Random, depth: int = 0) -> object:
    """A JSON value as a tree of ('obj', [(key, value)]) / ('arr', [...]) / raw JSON text."""
    pick = rng.random()
    if depth > 3 or pick < 0.35:
        return _encode_string(_string(rng), rng)
    if pick < 0.5:
        return _number(rng)
    if pick < 0.6:
        return rng.choice(["true", "false", "null"])
    if pick < 0.8:
        return ("arr", [_value(rng, depth + 1) for _ in range(rng.randrange(0, 3))])
    return ("obj", [(_key(rng, "xyz"), _value(rng, depth + 1)) for _ in range(rng.randrange(0, 3))])


def _key(rng: random.Random, name: str) -> str:
    if rng.random() < 0.03:  # a key written with an escape: the same key to orjson
        return '"\\u%04x%s"' % (ord(name[0]), name[1:])
    return '"%s"' % name


def _write(tree: object, rng: random.Random) -> str:
    space = lambda: rng.choice(["", "", "", " ", "\t"])
    if isinstance(tree, str):
        return tree
    kind, items = tree  # type: ignore[misc]
    if kind == "arr":
        return "[" + space() + ",".join(_write(item, rng) + space() for item in items) + "]"
    return "{" + space() + ",".join(key + space() + ":" + space() + _write(value, rng) for key, value in items) + "}"


def _field(rng: random.Random, typical: object) -> object:
    """The value of a field the log reads: usually what upstreams send, sometimes any JSON value."""
    return typical if rng.random() < 0.75 else _value(rng, 2)


def _object(rng: random.Random, fields: list[tuple[str, object]]) -> tuple[str, list]:
    members = [(_key(rng, name), value) for name, value in fields if rng.random() < 0.9]
    members += [('"other"', _value(rng)) for _ in range(rng.randrange(0, 2))]
    rng.shuffle(members)
    if members and rng.random() < 0.05:  # a key given twice: orjson keeps the last
        members.append((members[0][0], _value(rng)))
    return ("obj", members)


def _choice(rng: random.Random, chat: bool, body: bool) -> object:
    text = _encode_string(_string(rng), rng)
    inner = "message" if body else "delta"
    fields = [
        ("index", _field(rng, rng.choice(["0", "0", "1"]))),
        ("finish_reason", _field(rng, rng.choice(["null", '"stop"', '""']))),
    ]
    if chat:
        fields.append((inner, _field(rng, _object(rng, [("content", _field(rng, text)), ("role", '"assistant"')]))))
    else:
        fields.append(("text", _field(rng, text)))
    return _field(rng, _object(rng, fields))


def _mutate(data: bytes, rng: random.Random) -> bytes:
    if not data or rng.random() < 0.85:
        return data
    at = rng.randrange(len(data))
    return data[:at] + bytes([rng.randrange(256)]) * rng.randrange(0, 2) + data[at + rng.randrange(0, 2) :]


def _body(rng: random.Random) -> bytes:
    choices = ("arr", [_choice(rng, rng.random() < 0.7, True) for _ in range(rng.randrange(0, 3))])
    return _mutate(_write(_object(rng, [("id", '"x"'), ("choices", _field(rng, choices))]), rng).encode(), rng)


def _stream(rng: random.Random) -> bytes:
    chat = rng.random() < 0.7
    events = [
        _write(
            _object(
                rng,
                [("choices", _field(rng, ("arr", [_choice(rng, chat, False) for _ in range(rng.randrange(0, 3))])))],
            ),
            rng,
        )
        for _ in range(rng.randrange(1, 5))
    ]
    framing = rng.random()
    if framing < 0.8:
        text = "".join(f"data: {event}\n\n" for event in events) + rng.choice(["data: [DONE]\n\n", "", "data: [DONE]"])
    else:
        separator = rng.choice(["\r\n\r\n", "\n", "\n\n\n", "\n\n: keep-alive\n\n"])
        text = separator.join(f"data: {event}" for event in events) + rng.choice(["\n\n", "", "\n\ndata: [DONE]x"])
    return _mutate(text.encode(), rng)


def _chat_request(rng: random.Random) -> bytes:
    def message() -> object:
        content: object = _encode_string(_string(rng), rng)
        if rng.random() < 0.2:  # content parts
            content = (
                "arr",
                [
                    _field(
                        rng,
                        _object(rng, [("type", '"text"'), ("text", _field(rng, _encode_string(_string(rng), rng)))]),
                    )
                    for _ in range(rng.randrange(0, 3))
                ],
            )
        role = _encode_string(rng.choice(["user", "system", "assistant", "tool", ""]), rng)
        return _field(rng, _object(rng, [("role", _field(rng, role)), ("content", _field(rng, content))]))

    messages = ("arr", [message() for _ in range(rng.randrange(0, 4))])
    request = _field(rng, _object(rng, [("model", '"m"'), ("messages", _field(rng, messages))]))
    return _mutate(_write(request, rng).encode(), rng)


def _parses(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


# --- the comparisons ----------------------------------------------------------------------------------


def test_body_answer_is_the_reference_or_declines() -> None:
    rng = random.Random(13)
    answered = 0
    for _ in range(CASES):
        body = _body(rng)
        got = native.body_answer(body)
        if got is None:
            continue
        answered += 1
        assert _parses(body), body
        assert got == _body_answer(body), body
    assert answered > CASES // 3  # the common shapes are read natively


def test_stream_answer_is_the_reference_or_declines() -> None:
    rng = random.Random(17)
    answered = 0
    for _ in range(CASES):
        stream = _stream(rng)
        got = native.stream_answer(stream)
        if got is None:
            continue
        answered += 1
        assert got == _stream_answer(stream), stream
    assert answered > CASES // 4


def test_chat_turns_are_the_reference_or_decline() -> None:
    rng = random.Random(19)
    answered = 0
    for _ in range(CASES):
        body = _chat_request(rng)
        roles: list[str] = ["before"]
        contents: list[str] = ["before"]
        got = native.chat_turns(body, roles, contents)
        if got is None:
            assert roles == ["before"] and contents == ["before"]  # nothing of a declined request stays
            continue
        answered += 1
        request = orjson.loads(body)  # what the C code read, orjson reads
        turns, _ = prompt_of(request, CHAT_ENDPOINT)
        assert got is (turns is not None), body
        assert list(zip(roles[1:], contents[1:])) == [(turn["role"], turn["content"]) for turn in turns or ()], body
    assert answered > CASES // 3


@pytest.mark.parametrize(
    "data",
    [
        b'{"choices":[{"index":0,"text":"a"}],"choices":[]}',  # a key given twice
        b'{"\\u0063hoices":[]}',  # a key written with an escape
        b'{"choices":[],"n":1e400}',  # infinity to orjson
        b'{"choices":[]} x',  # trailing bytes
        b'{"choices":["\\ud800"]}',  # a lone surrogate
        b'{"choices":["\xed\xa0\x80"]}',  # a surrogate in UTF-8
        b'{"choices":["\xc0\xaf"]}',  # an overlong encoding
        b'{"choices":[{"finish_reason":5}]}',  # a finish reason that is not a string
    ],
)
def test_declines_what_only_the_reference_can_decide(data: bytes) -> None:
    assert native.body_answer(data) is None
    assert native.stream_answer(b"data: " + data + b"\n\n") is None


def test_typical_upstream_answers_are_read_natively() -> None:
    body = orjson.dumps(
        {
            "id": "1",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": 'h\u00e9 "x"\n'},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )
    assert native.body_answer(body) == ('h\u00e9 "x"\n', "stop")
    events = [
        {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": reason}]}
        for piece, reason in (("a", None), ("\U0001f600", None), ("", "length"))
    ]
    stream = b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events) + b"data: [DONE]\n\n"
    assert native.stream_answer(stream) == ("a\U0001f600", "length")
    roles: list[str] = []
    contents: list[str] = []
    assert native.chat_turns(orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}), roles, contents) is True
    assert (roles, contents) == (["user"], ["hi"])


def test_the_batch_uses_it() -> None:
    assert logbatch.native is native


def test_every_special_byte_is_seen_wherever_it_falls_in_a_word() -> None:
    # Strings are scanned 8 bytes at a time: an escape, a quote, a control byte or a non-ASCII character at
    # each offset of a word, and at the end of the string, must read as the reference reads it.
    for special in ('\\"', "\\\\", "\\n", "\\u00e9", "\u00e9", "\U0001f600", "\x7f", "\x01", "\x1f"):
        for before in range(0, 18):
            for after in (0, 1, 7, 8, 9):
                text = "a" * before + special + "b" * after
                body = ('{"choices":[{"message":{"content":"' + text + '"},"finish_reason":"stop"}]}').encode()
                got = native.body_answer(body)
                if not _parses(body):
                    assert got is None, body
                    continue
                assert got == _body_answer(body), body

"""Time-bounded fuzzing of the two wire parsers with server bytes: generated, mutated and random, in random pieces.

- RESP (service/resp.py RespReader): a generated reply stream reads back as what was encoded, however it is cut;
  mutated or random bytes end in replies or RespProtocolError (nothing else), the same however they are cut.
- HTTP (service/httpclient.py's connection, driven with a stand-in transport: no sockets, so many cases a second):
  a generated answer (content-length, chunked or until the close; 1xx before it) reads back whole however it is
  cut; mutated bytes end in an answer or one of service/transport.py's errors, never another exception, and a
  connection is pooled only reading, idle and between messages.
Each test stops drawing work after its example budget or FUZZ_S seconds, whichever comes first (about 20-30 s a
test on a loaded 2-core machine, together under 2 minutes).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loragate.service.httpclient import HttpClient, Response, _Connection
from loragate.service.resp import RedisReplyError, RespProtocolError, RespReader
from loragate.service.transport import TransportError

pytestmark = pytest.mark.slow  # time-bounded fuzzing of both wire readers, ~30 s in all
FUZZ_S = 15.0
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None)


class Budget:
    """Skips what is left of a test's examples once FUZZ_S has passed (hypothesis has no time budget)."""

    def __init__(self) -> None:
        self.started: float | None = None

    def spent(self) -> bool:
        if self.started is None:  # from the test's first example
            self.started = time.monotonic()
        return time.monotonic() - self.started > FUZZ_S


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a] or [data]


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, at, byte in edits:
        at = at % (len(out) + 1)
        if kind == 0 and at < len(out):
            out[at] = byte
        elif kind == 1:
            out.insert(at, byte)
        elif kind == 2 and at < len(out):
            del out[at]
        else:  # a run of one byte: long lines, big numbers
            out[at:at] = bytes([byte]) * (byte * 37)
    return bytes(out)


EDITS = st.lists(
    st.tuples(
        st.integers(0, 3), st.integers(0, 1 << 16), st.sampled_from([*b"\r\n:$*+-0123456789_ ", 0, 255, *b"aZ%?"])
    ),
    max_size=6,
)
POINTS = st.lists(st.integers(0, 1 << 16), max_size=12)

# --- RESP ---

replies = st.recursive(
    st.one_of(
        st.integers(-(1 << 63) + 1, (1 << 63) - 1),
        st.binary(max_size=40),
        st.none(),
        st.text(alphabet="abcXYZ ", max_size=10).map(lambda t: ("simple", t.encode())),
        st.text(alphabet="abc ", max_size=10).map(lambda t: ("error", t)),
    ),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
)


def resp_encode(reply: object) -> bytes:
    if isinstance(reply, bool):
        raise TypeError
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, tuple):
        return (b"+%s\r\n" % reply[1]) if reply[0] == "simple" else b"-%s\r\n" % reply[1].encode()
    return b"*%d\r\n" % len(reply) + b"".join(resp_encode(r) for r in reply)  # type: ignore[arg-type]


def resp_expected(reply: object) -> object:
    if isinstance(reply, tuple):
        return reply[1] if reply[0] == "simple" else ("error", reply[1])
    if isinstance(reply, list):
        return [resp_expected(r) for r in reply]
    return reply


def resp_read(pieces: list[bytes]) -> object:
    reader, out = RespReader(), []
    try:
        for piece in pieces:
            reader.feed(piece)
            while (reply := reader.gets()) is not False:
                out.append(reply)
    except RespProtocolError:
        return ("protocol error", out)
    return out


def comparable(value: object) -> object:
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, tuple):
        return tuple(comparable(v) for v in value)
    return ("error", str(value)) if isinstance(value, RedisReplyError) else value


RESP_BUDGET = Budget()


@FUZZ
@given(st.lists(replies, min_size=1, max_size=4), POINTS)
def test_resp_generated_replies_read_back_however_cut(stream: list[object], points: list[int]) -> None:
    if RESP_BUDGET.spent():
        return
    data = b"".join(resp_encode(r) for r in stream)
    assert comparable(resp_read(cut(data, points))) == [resp_expected(r) for r in stream]


MUTATED_BUDGET = Budget()


@FUZZ
@given(st.lists(replies, min_size=1, max_size=3), EDITS, POINTS, st.binary(max_size=64))
def test_resp_mutated_and_random_bytes(stream: list[object], edits: list, points: list[int], noise: bytes) -> None:
    if MUTATED_BUDGET.spent():
        return
    for data in (mutate(b"".join(resp_encode(r) for r in stream), edits), noise):
        whole = comparable(resp_read([data]))  # only replies or RespProtocolError come out
        assert comparable(resp_read(cut(data, points))) == whole


# --- HTTP ---


class StandInTransport:
    """What a _Connection calls on its transport, recorded."""

    def __init__(self) -> None:
        self.reading = True
        self.closing = False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def write(self, _data: bytes) -> None:
        pass


def http_read(pieces: list[bytes], read_whole: bool) -> tuple[object, _Connection, HttpClient]:
    """Feed the pieces to a fresh connection, then the server's close: the body, or the error's type."""

    async def main() -> tuple[object, _Connection, HttpClient]:
        client = HttpClient()
        connection = _Connection(client, ("stand-in", 80), asyncio.get_running_loop())
        connection.connection_made(StandInTransport())  # type: ignore[arg-type]
        response = Response(connection)
        response.whole = read_whole
        connection.response, connection.in_head = response, True
        for piece in pieces:
            if connection.response is not response:
                break  # ended (or failed): the connection was put back or closed
            connection.data_received(piece)
            if response.paused:
                response._take()  # the reader catches up
        pooled = client.idle.get(("stand-in", 80), [])
        assert all(c.reusable() and not c.in_head and not c.head for c in pooled), "a doubtful pooled connection"
        if connection.response is response:
            connection.connection_lost(None)
        outcome: object = type(response.error) if response.error is not None else b"".join(response.buffer)
        if response.error is None:
            assert response.complete
        return outcome, connection, client

    with asyncio.Runner() as runner:
        return runner.run(main())


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """An answer's bytes, its body, and whether its connection may be kept."""
    body = draw(st.binary(max_size=300))
    informational = b"".join(
        draw(
            st.lists(
                st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"]),
                max_size=2,
            )
        )
    )
    extra = b"".join(
        b"x-h%d: %s\r\n" % (i, b"v" * n) for i, n in enumerate(draw(st.lists(st.integers(0, 200), max_size=5)))
    )
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    status = draw(st.sampled_from([200, 201, 400, 404, 500]))
    head = b"HTTP/1.1 %d X\r\n%s" % (status, extra)
    if framing == "length":
        return informational + head + b"content-length: %d\r\n\r\n" % len(body) + body, body, True
    if framing == "chunked":
        sizes = draw(st.lists(st.integers(1, 64), max_size=8))
        pieces, at = [], 0
        for size in sizes:
            if at < len(body):
                pieces.append(body[at : at + size])
                at += size
        if at < len(body):
            pieces.append(body[at:])
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
        return informational + head + b"transfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n", body, True
    return informational + head + b"connection: close\r\n\r\n" + body, body, False


HTTP_BUDGET = Budget()


@FUZZ
@given(answers(), POINTS, st.booleans())
def test_http_generated_answers_read_back_however_cut(
    answer: tuple[bytes, bytes, bool], points: list[int], read_whole: bool
) -> None:
    if HTTP_BUDGET.spent():
        return
    data, body, keep = answer
    outcome, connection, client = http_read(cut(data, points), read_whole)
    assert outcome == body
    if keep:
        assert client.idle[("stand-in", 80)] == [connection], "a whole kept-alive answer frees its connection"


HTTP_MUTATED_BUDGET = Budget()


@FUZZ
@given(answers(), EDITS, POINTS, st.binary(max_size=64))
def test_http_mutated_and_random_bytes(
    answer: tuple[bytes, bytes, bool], edits: list, points: list[int], noise: bytes
) -> None:
    if HTTP_MUTATED_BUDGET.spent():
        return
    for data in (mutate(answer[0], edits), noise, answer[0] + noise):
        outcome, _connection, _client = http_read(cut(data, points), False)
        assert isinstance(outcome, bytes) or issubclass(outcome, TransportError), outcome  # type: ignore[arg-type]

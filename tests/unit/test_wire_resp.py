"""Hostile-server conformance of the Redis client (service/resp.py): its reply reader, and the client against
scripted loopback servers (tests/wire_peers.py), on asyncio and uvloop.

Each server case ends in the right reply or RedisUnavailable within the timeout, the client's next command gets
its own reply (never another's: a connection in a doubtful state is dropped), no data_received call takes 10 ms
of CPU, and the loop's longest CPU stretch stays under 50 ms (tests/wire_peers.py). The reader's cases run on
RespReader and on hiredis.Reader (the C reader redis-py uses); where hiredis differs is HIREDIS_DIFFERS
(bench/limiter_overhead.py measures the two):

| bytes                      | RespReader                  | hiredis.Reader 3.x                            |
|----------------------------|-----------------------------|-----------------------------------------------|
| ``$3\\r\\nabcXY``          | RespProtocolError           | ``b"abc"`` (the terminator is not checked)    |
| RESP3 types (``%``, ``_``) | RespProtocolError           | parsed (a map, None)                          |
| arrays 33 deep             | RespProtocolError (32 max)  | parsed (its own, deeper limit)                |
| a 70 KB line, no CRLF      | RespProtocolError (64 KB)   | waits for the rest (no line limit)            |
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable

import hiredis
import pytest
import uvloop

from loragate.service.resp import (
    MAX_DEPTH,
    RedisReplyError,
    RedisUnavailable,
    RespClient,
    RespProtocolError,
    RespReader,
    _Protocol,
    encode,
)
from tests.wire_peers import CLOSE, RESET, Script, StallWatch, parser_watch, play

STALL_S = 0.010  # the longest data_received call (the reader's own stall), thread CPU time
LOOP_STALL_S = 0.050  # the loop's longest busy stretch, whatever ran in it (see tests/wire_peers.py)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
Error = RespProtocolError

READER_CASES: list[tuple[str, bytes, list[object] | type[Exception]]] = [
    ("simple", b"+OK\r\n", [b"OK"]),
    ("integer", b":1000\r\n", [1000]),
    ("negative integer", b":-12\r\n", [-12]),
    ("bulk", b"$3\r\nabc\r\n", [b"abc"]),
    ("empty bulk", b"$0\r\n\r\n", [b""]),
    ("null bulk", b"$-1\r\n", [None]),
    ("null array", b"*-1\r\n", [None]),
    ("empty array", b"*0\r\n", [[]]),
    ("the limiter's reply", b"*2\r\n:0\r\n:1500\r\n", [[0, 1500]]),
    ("nested", b"*2\r\n*1\r\n$1\r\na\r\n*0\r\n", [[[b"a"], []]]),
    ("several", b"+A\r\n:1\r\n*1\r\n:2\r\n", [b"A", 1, [2]]),
    ("bulk with CRLF inside", b"$4\r\na\r\nb\r\n", [b"a\r\nb"]),
    ("bulk terminator wrong", b"$3\r\nabcXY", Error),
    ("bulk longer than said", b"$3\r\nabcd\r\n", Error),
    ("integer with underscore", b":1_000\r\n", Error),
    ("integer with plus", b":+1\r\n", Error),
    ("integer with spaces", b": 1\r\n", Error),
    ("empty integer", b":\r\n", Error),
    ("integer of 30 digits", b":" + b"9" * 30 + b"\r\n", Error),
    ("bulk length -2", b"$-2\r\n", Error),
    ("array length -2", b"*-2\r\n", Error),
    ("bulk length not a number", b"$x\r\n", Error),
    ("unknown type", b"?x\r\n", Error),
    ("RESP3 map", b"%1\r\n:1\r\n:2\r\n", Error),
    ("RESP3 null", b"_\r\n", Error),
    ("nested too deep", b"*1\r\n" * (MAX_DEPTH + 1) + b":1\r\n", Error),
    ("nested 100000 deep", b"*1\r\n" * 100_000 + b":1\r\n", Error),
    ("a line over the limit", b"+" + b"x" * 70_000, Error),
]
HIREDIS_DIFFERS: dict[str, object] = {
    "bulk terminator wrong": [b"abc"],
    "RESP3 map": [{1: 2}],
    "RESP3 null": [None],
    "integer of 30 digits": Error,
    "a line over the limit": [],  # no limit on a line: it waits for the end
    "nested too deep": [functools.reduce(lambda inner, _: [inner], range(MAX_DEPTH + 1), 1)],  # its limit is deeper
}


def hiredis_reader() -> hiredis.Reader:
    return hiredis.Reader(protocolError=RespProtocolError, replyError=RedisReplyError)


def read_all(reader: object, data: bytes, piece: int) -> list[object] | type[Exception]:
    replies: list[object] = []
    try:
        for at in range(0, len(data), piece):
            reader.feed(data[at : at + piece])  # type: ignore[attr-defined]
            while (reply := reader.gets()) is not False:  # type: ignore[attr-defined]
                replies.append(reply)
    except RespProtocolError:
        return RespProtocolError
    return replies


def normal(replies: object) -> object:
    if isinstance(replies, list):
        return [normal(r) for r in replies]
    return ("error", str(replies)) if isinstance(replies, RedisReplyError) else replies


@pytest.mark.parametrize("name, data, expected", READER_CASES, ids=[c[0] for c in READER_CASES])
@pytest.mark.parametrize("piece", [1, 3, 1 << 20])
def test_reader(name: str, data: bytes, expected: object, piece: int) -> None:
    assert read_all(RespReader(), data, piece) == expected


@pytest.mark.parametrize("name, data, expected", READER_CASES, ids=[c[0] for c in READER_CASES])
def test_hiredis_reader_where_it_differs(name: str, data: bytes, expected: object) -> None:
    assert normal(read_all(hiredis_reader(), data, 1 << 20)) == HIREDIS_DIFFERS.get(name, expected)


def test_a_large_array_in_pieces_is_read_in_linear_time() -> None:
    """Re-parsing a large incomplete array from its start on every read blocked the loop for hundreds of ms."""
    count = 200_000
    data = b"*%d\r\n" % count + b":1\r\n" * count
    started = time.thread_time()
    reader = RespReader()
    reader.feed(data)
    assert reader.gets() == [1] * count
    whole_s = time.thread_time() - started
    reader, longest, replies = RespReader(), 0.0, []
    started = time.thread_time()
    for at in range(0, len(data), 1024):
        step = time.thread_time()
        reader.feed(data[at : at + 1024])
        while (reply := reader.gets()) is not False:
            replies.append(reply)
        longest = max(longest, time.thread_time() - step)
    pieces_s = time.thread_time() - started
    assert replies == [[1] * count]
    assert pieces_s < 3 * whole_s + 0.05, (pieces_s, whole_s)
    assert longest < STALL_S


# --- the client against scripted servers ---


class RedisPeer:
    """A scripted RESP server on loopback: each command read gets ``script(number)`` (numbered from 0 across
    connections); ``PING`` after the first ``scripted`` commands gets ``+PONG``, ``ECHO x`` gets ``x``."""

    def __init__(self, script: Callable[[int], Script], scripted: int = 1) -> None:
        self.script = script
        self.scripted = scripted
        self.commands = 0
        self.connections = 0
        self.played = asyncio.Event()  # set when a scripted reply has been played to its end

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                count = int((await reader.readuntil(b"\r\n"))[1:-2])
                parts = []
                for _ in range(count):
                    size = int((await reader.readuntil(b"\r\n"))[1:-2])
                    parts.append((await reader.readexactly(size + 2))[:-2])
                number, self.commands = self.commands, self.commands + 1
                if number < self.scripted:
                    try:
                        done = await play(writer, self.script(number))
                    finally:
                        self.played.set()
                    if not done:
                        return
                elif parts[0] == b"ECHO":
                    writer.write(b"$%d\r\n%s\r\n" % (len(parts[1]), parts[1]))
                else:
                    writer.write(b"+PONG\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
        finally:
            server.close()


SERVER_CASES: list[tuple[str, Script, object]] = [
    ("the reply", [b"+PONG\r\n"], b"PONG"),
    ("dribbled", [b"*2\r\n", 0.01, b":0\r", 0.01, b"\n:15", 0.01, b"00\r\n"], [0, 1500]),
    ("an unsolicited reply after the reply", [b"+PONG\r\n+EXTRA\r\n"], b"PONG"),
    ("two replies in one go", [b"+PONG\r\n:1\r\n"], b"PONG"),
    ("a late reply, after the timeout", [0.3, b"+LATE\r\n"], RedisUnavailable),
    ("bulk terminator wrong", [b"$3\r\nabcXY"], RedisUnavailable),
    ("integer with underscore", [b":1_000\r\n"], RedisUnavailable),
    ("nested 100000 deep", [b"*1\r\n" * 100_000 + b":1\r\n"], RedisUnavailable),
    ("garbage", [b"HTTP/1.1 400 Bad Request\r\n\r\n"], RedisUnavailable),
    ("closed mid-reply", [b"*2\r\n:1\r\n", CLOSE], RedisUnavailable),
    ("reset", [RESET], RedisUnavailable),
    ("closed before the reply", [CLOSE], RedisUnavailable),
    ("silence", [1.0], RedisUnavailable),
    ("an error reply", [b"-ERR nope\r\n"], RedisReplyError),
]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name, script, expected", SERVER_CASES, ids=[c[0] for c in SERVER_CASES])
def test_client_against_scripted_servers(name: str, script: Script, expected: object, loop: str) -> None:
    async def main() -> None:
        peer = RedisPeer(lambda _n: script)
        async with peer.running() as url:
            client = RespClient(url, timeout_s=0.15)
            with StallWatch() as stalls, parser_watch(_Protocol) as parsing:
                started = time.perf_counter()
                try:
                    outcome: object = await client.call("PING")
                except (RedisUnavailable, RedisReplyError) as exc:
                    outcome = type(exc)
                assert outcome == expected or (
                    isinstance(expected, type) and isinstance(outcome, type) and issubclass(outcome, expected)
                ), f"{name}: {outcome!r}"
                assert time.perf_counter() - started < 1.0  # the timeout is 0.15 s; a loaded machine
                await asyncio.wait_for(peer.played.wait(), 5)  # the script has sent all it sends ...
                await asyncio.sleep(0.05)  # ... and it has arrived (was a fixed 0.2 s, 0.9 s for silence)
                # Every later command gets its own reply: none shifted by what came before.
                for attempt in range(3):
                    try:
                        replies = await asyncio.gather(*(client.call("ECHO", f"n{i}") for i in range(20)))
                        break
                    except RedisUnavailable:  # the connection was dropped under the first batch: reconnects
                        assert attempt < 2
                assert replies == [f"n{i}".encode() for i in range(20)], name
            await client.close()
            assert parsing[0] < STALL_S, f"{name}: one data_received took {parsing[0] * 1000:.1f} ms"
            assert stalls.longest_s < LOOP_STALL_S, f"{name}: the loop was busy {stalls.longest_s * 1000:.1f} ms"

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


def test_encode_is_what_redis_reads() -> None:
    reader = RespReader()
    reader.feed(encode(b"EVALSHA", b"abc", b"1", b"k"))
    assert reader.gets() == [b"EVALSHA", b"abc", b"1", b"k"]
